"""What every model of ours shares: decoupled streaming, cancellation, bad-input errors, metrics.

Each model file says only what is particular to it. It subclasses
`StreamingModel`, validates one request in `parse()` (raising `RequestError`
for bad input) and yields output dicts from `stream()`. This module:

* hands each request to a worker thread with its response sender, so
  `execute` returns at once and one slow request never blocks another;
* polls the response sender's `is_cancelled()` between outputs and closes the
  engine's generator, so a cancelled request stops the engine's work, not just
  the client's reading. Never `request.is_cancelled()` outside `execute`: the
  Python backend releases every request when `execute` returns, and asking a
  released request crashed tritonserver 2.51 (the sender lives until FINAL);
* puts FINAL on a response that carries data (`closing_outputs()`), because
  an empty final response never reaches the asyncio gRPC client;
* turns bad input into an INVALID_ARG error for that request alone and any
  engine failure into an INTERNAL error, so the instance keeps serving;
* counts requests, outputs and cancellations in Triton's own /metrics.

The contract these models serve is written down in ../README.md.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
MAX_TEXT_BYTES = 64 * 1024

log = logging.getLogger("voice_models")


class RequestError(ValueError):
    """Input that breaks the contract: answered with INVALID_ARG for this request only."""


def parameters(model_config: dict) -> dict[str, str]:
    """The `parameters { key: ... value { string_value: ... } }` of a config, as a plain dict."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def required(params: dict[str, str], key: str) -> str:
    """A parameter the model cannot start without: fail at load time, not at the first call."""
    value = params.get(key, "").strip()
    if not value:
        raise pb_utils.TritonModelException(f"config parameter '{key}' is required")
    return value


def tensor(request, name: str, *, optional: bool = False) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if optional:
            return None
        raise RequestError(f"input '{name}' is required")
    return t.as_numpy()


def text(request, name: str, *, optional: bool = False, max_bytes: int = MAX_TEXT_BYTES) -> str | None:
    """One UTF-8 string from a BYTES tensor of one element."""
    array = tensor(request, name, optional=optional)
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one string, got {array.size}")
    raw = array.reshape(-1)[0]
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, (bytes, np.bytes_)):
        raise RequestError(f"input '{name}' must be BYTES")
    if len(raw) > max_bytes:
        raise RequestError(f"input '{name}' is {len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"input '{name}' is not valid UTF-8: {e}") from None


def scalar(request, name: str, kind: type, default, *, low=None, high=None):
    """One number from a one-element tensor, range-checked; `default` when absent."""
    array = tensor(request, name, optional=True)
    if array is None:
        return default
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got {array.size}")
    value = kind(array.reshape(-1)[0])
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"input '{name}' = {value} is outside [{low}, {high}]")
    return value


def response(outputs: dict[str, Any]) -> "pb_utils.InferenceResponse":
    tensors = []
    for name, value in outputs.items():
        if isinstance(value, str):
            value = np.array([value.encode()], dtype=np.object_)
        tensors.append(pb_utils.Tensor(name, np.asarray(value)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class _Serialized:
    """A custom metric whose updates never overlap: the Python backend of tritonserver 2.51 crashed
    (SIGSEGV in Metric::Increment) when a model's threads updated its metrics at the same time."""

    def __init__(self, metric, lock: threading.Lock):
        self._metric, self._lock = metric, lock

    def increment(self, value: float) -> None:
        with self._lock:
            self._metric.increment(value)

    def set(self, value: float) -> None:
        with self._lock:
            self._metric.set(value)


class Metrics:
    """Counters in Triton's /metrics (port 8002), labelled by model: the server-side proof of work done."""

    def __init__(self, model: str):
        self._families = []  # a MetricFamily must outlive its Metrics
        lock = threading.Lock()

        def metric(name, doc, kind):
            family = pb_utils.MetricFamily(name=name, description=doc, kind=kind)
            self._families.append(family)
            return _Serialized(family.Metric(labels={"model": model}), lock)

        def counter(name, doc):
            return metric(name, doc, pb_utils.MetricFamily.COUNTER)

        def gauge(name, doc):
            return metric(name, doc, pb_utils.MetricFamily.GAUGE)

        self.requests = counter("voice_requests_total", "Requests accepted by the model")
        self.outputs = counter("voice_outputs_total", "Data responses sent (llm: text deltas, tts: audio chunks)")
        self.cancelled = counter("voice_requests_cancelled_total", "Requests stopped because the client cancelled")
        self.failed = counter("voice_requests_failed_total", "Requests answered with an error")
        self.active = gauge("voice_requests_active", "Requests whose engine work is running now")
        self.last_stop = gauge("voice_last_cancel_stop_seconds",
                               "Unix time at which the engine last stopped work for a cancelled request")


class StreamingModel:
    """Base of our decoupled models; see the module docstring for what it does for them."""

    #: default size of the worker pool; config parameter `max_concurrency` overrides it
    max_concurrency = 4

    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.params = parameters(self.model_config)
        nice = int(self.params.get("nice", 0) or 0)
        if nice > 0:  # before the engine and the pool start their threads: they inherit it (Linux)
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        self.metrics = Metrics(self.name)
        workers = int(self.params.get("max_concurrency", self.max_concurrency))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=self.name)
        self._lanes: dict[Any, collections.deque] = {}
        self._lanes_lock = threading.Lock()
        self.setup(self.params)

    # -- what a model provides -------------------------------------------------
    def setup(self, params: dict[str, str]) -> None:
        """Load the engine named by the config; raise to fail the load."""

    def parse(self, request) -> Any:
        """Validate one request into a job; raise RequestError for bad input."""
        raise NotImplementedError

    def lane(self, job) -> Any:
        """Jobs with the same lane run one after another, in arrival order; None: no ordering."""
        return None

    def stream(self, job, is_cancelled: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        """Yield the outputs of each data response; stop when the generator is closed."""
        raise NotImplementedError

    def closing_outputs(self, job, reason: str) -> dict[str, Any] | None:
        """Outputs of the FINAL response (reason: 'stop'|'cancelled'); None: a flags-only final."""
        return None

    def shutdown(self) -> None:
        """Release the engine."""

    # -- Triton's entry points -------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self.parse(request)
            except RequestError as e:
                self.metrics.failed.increment(1)
                sender.send(error(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
                continue
            self.metrics.requests.increment(1)
            key = self.lane(job)
            if key is None:
                self._pool.submit(self._serve, sender, job)
            else:
                self._enqueue(key, (sender, job))
        return None

    def finalize(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.shutdown()

    # -- the machinery ---------------------------------------------------------
    def _enqueue(self, key, item) -> None:
        with self._lanes_lock:
            queue = self._lanes.get(key)
            if queue is not None:
                queue.append(item)
                return
            self._lanes[key] = collections.deque([item])
        self._pool.submit(self._drain, key)

    def _drain(self, key) -> None:
        while True:
            with self._lanes_lock:
                queue = self._lanes[key]
                if not queue:
                    del self._lanes[key]
                    return
                sender, job = queue.popleft()
            self._serve(sender, job)

    def _serve(self, sender, job) -> None:
        self.metrics.active.increment(1)
        reason = "stop"
        outputs = self.stream(job, sender.is_cancelled)
        try:
            for out in outputs:
                if sender.is_cancelled():
                    reason = "cancelled"
                    break
                sender.send(response(out))
                self.metrics.outputs.increment(1)
            else:
                if sender.is_cancelled():
                    reason = "cancelled"
        except RequestError as e:
            self.metrics.failed.increment(1)
            sender.send(error(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
            return
        except Exception as e:  # engine failure: this request fails, the instance lives on
            log.exception("%s: request failed", self.name)
            self.metrics.failed.increment(1)
            sender.send(error(f"{self.name} failed: {e}", pb_utils.TritonError.INTERNAL), flags=FINAL)
            return
        finally:
            outputs.close()
            self.metrics.active.increment(-1)
        if reason == "cancelled":
            self.metrics.cancelled.increment(1)
            self.metrics.last_stop.set(time.time())
            log.info("%s: request cancelled, engine stopped", self.name)
            sender.send(error("request cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
            return
        closing = self.closing_outputs(job, reason)
        sender.send(response(closing) if closing else None, flags=FINAL)
