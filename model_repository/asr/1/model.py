"""asr: one long stream per call; caller audio in, speech events and transcripts out (contract: ../../README.md).

What happens in a turn lives in listener.py; this file is the plumbing around
it. Each call keeps its most recent request open and every event goes out on
it the moment it exists, from the request thread (VAD, endpointing) or from a
transcription worker, under the call's lock. The next chunk finishes the
previous request with a flags-only FINAL (the client never sees those); the
`sequence_end` request gets the last events and then a FINAL `end` event.
A watcher drops a call whose client cancelled the stream or went idle.
"""

import itertools
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from listener import Listener, Settings  # noqa: E402
from streaming import FINAL, RequestError, StreamingModel, error, required, response, tensor  # noqa: E402

log = logging.getLogger("voice_models")

MAX_CHUNK_SAMPLES = 16000 * 30
WATCH_INTERVAL_S = 0.1


def number(params: dict, key: str, default: float, low: float, high: float) -> float:
    """A numeric config parameter, range-checked: a bad config fails the load, not the first call."""
    raw = params.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise pb_utils.TritonModelException(f"config parameter '{key}' = {raw!r} is not a number") from None
    if not low <= value <= high:
        raise pb_utils.TritonModelException(f"config parameter '{key}' = {value} is outside [{low}, {high}]")
    return value


class Call:
    """One call's listener and the request its events go out on."""

    def __init__(self, call_id, listener: Listener):
        self.id = call_id
        self.listener = listener
        self.lock = threading.Lock()
        self.sender = None  # of the call's newest request, held open for its events
        self.last_seen = time.monotonic()
        self.closed = False


class Workers:
    """Transcription threads shared by every call; work a turn's end waits for runs before partials."""

    def __init__(self, count: int, run):
        self._queue = queue.PriorityQueue()
        self._order = itertools.count()
        self._run = run
        self._threads = [threading.Thread(target=self._loop, name=f"asr-{i}", daemon=True) for i in range(count)]
        for t in self._threads:
            t.start()

    def submit(self, urgent: bool, *args) -> None:
        self._queue.put((0 if urgent else 1, next(self._order), args))

    def _loop(self) -> None:
        while True:
            _, _, args = self._queue.get()
            if args is None:
                return
            try:
                self._run(*args)
            except Exception:
                log.exception("asr: transcription worker")

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((2, next(self._order), None))
        for t in self._threads:
            t.join(timeout=30)


class TritonPythonModel(StreamingModel):
    def initialize(self, args):
        self.device_index = int(args.get("model_instance_device_id") or 0)
        super().initialize(args)

    def setup(self, params):
        engine = required(params, "engine")
        if engine != "faster_whisper":
            raise pb_utils.TritonModelException(f"asr: unknown engine {engine!r} (faster_whisper)")
        from whisper_engine import SileroVad, Transcriber

        endpoint = int(number(params, "endpoint_silence_ms", 800, 100, 5000))
        self.settings = Settings(
            vad_threshold=number(params, "vad_threshold", 0.5, 0.05, 0.95),
            min_speech_ms=int(number(params, "min_speech_ms", 64, 0, 1000)),
            min_silence_ms=int(number(params, "min_silence_ms", 96, 32, 1000)),
            endpoint_silence_ms=endpoint,
            endpoint_silence_complete_ms=int(number(params, "endpoint_silence_complete_ms", 350, 50, endpoint)),
            first_partial_ms=int(number(params, "first_partial_ms", 300, 64, 5000)),
            partial_interval_ms=int(number(params, "partial_interval_ms", 600, 100, 10000)),
            speech_pad_ms=int(number(params, "speech_pad_ms", 500, 0, 2000)),
            commit_after_s=number(params, "commit_after_s", 7, 2, 25),
        )
        if self.settings.min_silence_ms >= self.settings.endpoint_silence_complete_ms:
            raise pb_utils.TritonModelException("asr: min_silence_ms must be below endpoint_silence_complete_ms")
        workers = int(number(params, "max_concurrency", 2, 1, 64))
        self.transcriber = Transcriber(
            required(params, "model"), device=required(params, "device"), compute_type=required(params, "compute_type"),
            device_index=self.device_index, cpu_threads=int(number(params, "cpu_threads", 0, 0, 256)),
            workers=workers, min_window_s=number(params, "min_window_s", 30, 1, 30))
        self.vad = SileroVad()
        self.transcriber.transcribe(np.zeros(16000, np.float32))  # the first run allocates; not on a caller's time
        self.calls: dict = {}
        self.calls_lock = threading.Lock()
        idle_us = self.model_config.get("sequence_batching", {}).get("max_sequence_idle_microseconds")
        self.idle_s = int(idle_us) / 1e6 if idle_us else 120.0
        self.workers = Workers(workers, self._transcribe)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="asr-watch", daemon=True)
        self._watcher.start()

    # -- requests ----------------------------------------------------------------
    def parse(self, request):
        audio = tensor(request, "AUDIO")
        if audio.dtype != np.int16:
            raise RequestError(f"AUDIO must be INT16, got {audio.dtype}")
        if audio.ndim != 1:
            raise RequestError(f"AUDIO must be one-dimensional, got shape {list(audio.shape)}")
        if audio.size > MAX_CHUNK_SAMPLES:
            raise RequestError(f"AUDIO has {audio.size} samples, more than {MAX_CHUNK_SAMPLES} (30 s) in one request")
        start, end = self._control(request, "START"), self._control(request, "END")
        if audio.size == 0 and not end:
            raise RequestError("AUDIO is empty; only the sequence_end request may be")
        call_id = request.correlation_id()
        if call_id in ("", 0):
            raise RequestError("asr needs a sequence id: the call id")
        partials = tensor(request, "PARTIALS", optional=True)  # (its shape [1] Triton checks)
        return call_id, audio, start, end, None if partials is None else bool(partials.reshape(-1)[0])

    @staticmethod
    def _control(request, name: str) -> bool:
        value = tensor(request, name, optional=True)
        return bool(value is not None and value.size and value.reshape(-1)[0])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                call_id, audio, start, end, partials = self.parse(request)
            except RequestError as e:
                self.metrics.failed.increment(1)
                sender.send(error(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
                if self._control(request, "END"):
                    self._drop(request.correlation_id(), None)
                continue
            self.metrics.requests.increment(1)
            self._accept(sender, call_id, audio, start, end, partials)
        return None

    def _accept(self, sender, call_id, audio, start, end, partials) -> None:
        with self.calls_lock:
            call = self.calls.get(call_id)
        if call is not None and start:
            self._close(call, None)  # a new call reusing the id: the old one is over
            call = None
        if call is None and not start:  # its stream was cancelled, or it idled out
            sender.send(error(f"call {call_id!r} has no asr state (cancelled or idle); start a new stream",
                              pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
            return
        if call is None:
            call = Call(call_id, Listener(self.settings, self.vad.stream()))
            with self.calls_lock:
                self.calls[call_id] = call
            self.metrics.active.increment(1)
        with call.lock:
            if call.closed:
                sender.send(error(f"call {call_id!r} was dropped; start a new stream",
                                  pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
                return
            previous, call.sender, call.last_seen = call.sender, sender, time.monotonic()
            try:
                if previous is not None:
                    previous.send(flags=FINAL)
                if partials is not None:
                    call.listener.partials = partials
                self._emit(call, call.listener.feed(audio.astype(np.float32) / 32768.0))
                if end:
                    self._emit(call, call.listener.finish())
                self._next(call)
            except Exception as e:  # a bug or a dead stream: this call fails, the others go on
                log.exception("asr: call %s failed", call.id)
                self._fail(call, e)

    # -- under the call's lock -----------------------------------------------------
    def _emit(self, call: Call, events: list[dict]) -> None:
        for event in events:
            call.sender.send(response({"EVENT": json.dumps(event)}))
            self.metrics.outputs.increment(1)

    def _fail(self, call: Call, e: Exception) -> None:
        self.metrics.failed.increment(1)
        if call.sender is not None:
            try:
                call.sender.send(error(f"asr failed: {e}", pb_utils.TritonError.INTERNAL), flags=FINAL)
            except Exception:
                log.debug("asr: could not report the failure of call %s", call.id, exc_info=True)
            call.sender = None
        self._forget(call)

    def _next(self, call: Call) -> None:
        """Start the call's next transcription, or answer the end request once nothing is left to say."""
        job = call.listener.next_job()
        if job is not None:
            self.workers.submit(job.urgent, call, job)
        elif call.listener.ending and call.listener.idle:
            sender, call.sender = call.sender, None
            self._forget(call)  # first: once the client reads `end`, the call's state (and metric) is gone
            sender.send(response({"EVENT": json.dumps({"type": "end", "audio_ms": call.listener.audio_ms})}),
                        flags=FINAL)
            self.metrics.outputs.increment(1)

    def _forget(self, call: Call) -> None:
        if call.closed:
            return
        call.closed = True
        with self.calls_lock:
            if self.calls.get(call.id) is call:
                del self.calls[call.id]
        self.metrics.active.increment(-1)

    # -- transcription workers -------------------------------------------------------
    def _transcribe(self, call: Call, job) -> None:
        if call.closed:
            return
        try:
            text = self.transcriber.transcribe(job.audio, job.prompt).text
        except Exception as e:  # engine failure: this call's stream fails, the instance lives on
            log.exception("asr: transcription failed for call %s", call.id)
            with call.lock:
                self._fail(call, e)
            return
        with call.lock:
            if call.closed:
                return
            try:
                self._emit(call, call.listener.done(job, text))
                self._next(call)
            except Exception as e:
                log.exception("asr: call %s failed", call.id)
                self._fail(call, e)

    # -- cancelled and idle calls ----------------------------------------------------
    def _close(self, call: Call, answer) -> None:
        """Finish the call's open request (with `answer`, or a flags-only FINAL) and drop its state."""
        with call.lock:
            if call.sender is not None:
                try:
                    call.sender.send(answer, flags=FINAL)
                except Exception:  # the request may already be gone with its stream
                    log.debug("asr: could not finish the open request of call %s", call.id, exc_info=True)
                call.sender = None
            self._forget(call)

    def _drop(self, call_id, answer) -> None:
        with self.calls_lock:
            call = self.calls.get(call_id)
        if call is not None:
            self._close(call, answer)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self._sweep()
            except Exception:
                log.exception("asr: watcher")

    def _sweep(self) -> None:
        with self.calls_lock:
            calls = list(self.calls.values())
        for call in calls:
            with call.lock:
                # the sender, not the request: Triton releases a request when execute returns
                cancelled = call.sender is not None and call.sender.is_cancelled()
            if cancelled:
                self.metrics.cancelled.increment(1)
                self._close(call, error("request cancelled", pb_utils.TritonError.CANCELLED))
                self.metrics.last_stop.set(time.time())
                log.info("asr: call %s cancelled, its state dropped", call.id)
            elif time.monotonic() - call.last_seen > self.idle_s:
                self._close(call, error(f"no audio for {self.idle_s:.0f} s; this call's asr state was dropped",
                                        pb_utils.TritonError.UNAVAILABLE))
                log.info("asr: call %s idle, its state dropped", call.id)

    def finalize(self):
        self._stop.set()
        self._watcher.join(timeout=5)
        with self.calls_lock:
            calls = list(self.calls.values())
        for call in calls:
            self._close(call, None)
        self.workers.close()
