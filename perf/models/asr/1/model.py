"""MEASUREMENT-ONLY asr stand-in (perf/models/README.md): energy decides speech, the transcript is fixed.

Same tensors and events as model_repository/asr (its README is the contract):
one long stream per call (string sequence id, START/END controls), events
`speech_start`, `partial`, `speech_stop`, `final`, and `end` on the FINAL
response of the `sequence_end` request. Each request is answered at once: its
events, then a flags-only FINAL (which the asyncio client never sees).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
RATE = 16000
WINDOW = RATE * 20 // 1000  # 20 ms


class Listener:
    """One call: a plain energy state machine over 20 ms windows."""

    def __init__(self, model):
        self.m = model
        self.audio_ms = 0.0
        self.speaking = False
        self.loud_ms = self.quiet_ms = 0.0
        self.onset_ms = None  # start of the current loud run (before speech_start)
        self.segment_ms = None  # onset of the current speech stretch
        self.partial_sent = False
        self.turn_start_ms = None  # first onset of the turn (until its final)
        self.speech_end_ms = None

    def feed(self, audio: np.ndarray) -> list:
        events = []
        for i in range(0, len(audio), WINDOW):
            window = audio[i:i + WINDOW]
            dur = len(window) * 1000 / RATE
            loud = float(np.sqrt(np.mean(np.square(window, dtype=np.float32)))) > self.m.threshold
            self.audio_ms += dur
            if loud:
                self.loud_ms += dur
                self.quiet_ms = 0.0
                if self.onset_ms is None:
                    self.onset_ms = self.audio_ms - dur
                if not self.speaking and self.loud_ms >= self.m.min_speech_ms:
                    self.speaking, self.segment_ms, self.partial_sent = True, self.onset_ms, False
                    if self.turn_start_ms is None:
                        self.turn_start_ms = self.onset_ms
                    events.append({"type": "speech_start", "audio_ms": round(self.onset_ms)})
                if self.speaking and not self.partial_sent and self.audio_ms - self.segment_ms >= self.m.first_partial_ms:
                    self.partial_sent = True
                    events.append({"type": "partial", "text": self.m.text, "audio_ms": round(self.audio_ms)})
            else:
                self.quiet_ms += dur
                self.loud_ms, self.onset_ms = 0.0, None
                if self.speaking and self.quiet_ms >= self.m.min_silence_ms:
                    self.speaking = False
                    self.speech_end_ms = self.audio_ms - self.quiet_ms
                    events.append({"type": "speech_stop", "audio_ms": round(self.speech_end_ms),
                                   "endpoint_ms": [round(self.speech_end_ms + self.m.endpoint_ms)]})
                if not self.speaking and self.turn_start_ms is not None and self.quiet_ms >= self.m.endpoint_ms:
                    events.append(self._final())
        return events

    def _final(self) -> dict:
        event = {"type": "final", "text": self.m.text, "speech_start_ms": round(self.turn_start_ms),
                 "speech_end_ms": round(self.speech_end_ms if self.speech_end_ms is not None else self.audio_ms),
                 "audio_ms": round(self.audio_ms)}
        self.turn_start_ms = self.speech_end_ms = None
        return event

    def finish(self) -> list:
        if self.turn_start_ms is None:
            return []
        if self.speaking:
            self.speech_end_ms = self.audio_ms
        return [self._final()]


def _event(event: dict):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("EVENT", np.array([json.dumps(event).encode()], dtype=np.object_))])


def _error(message: str, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.threshold = float(params.get("rms_threshold", 300))
        self.min_speech_ms = float(params.get("min_speech_ms", 60))
        self.min_silence_ms = float(params.get("min_silence_ms", 100))
        self.endpoint_ms = float(params.get("endpoint_silence_ms", 400))
        self.first_partial_ms = float(params.get("first_partial_ms", 300))
        self.text = params.get("text", "I have a question about my order.")
        self.calls = {}

    @staticmethod
    def _control(request, name: str) -> bool:
        t = pb_utils.get_input_tensor_by_name(request, name)
        return t is not None and bool(t.as_numpy().reshape(-1)[0])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._serve(request, sender)
            except Exception as e:  # this request fails, the model serves on
                sender.send(_error(f"asr failed: {e}", pb_utils.TritonError.INTERNAL), flags=FINAL)
        return None

    def _serve(self, request, sender) -> None:
        tensor = pb_utils.get_input_tensor_by_name(request, "AUDIO")
        audio = tensor.as_numpy() if tensor is not None else None
        start, end = self._control(request, "START"), self._control(request, "END")
        call_id = request.correlation_id()
        if audio is None or audio.dtype != np.int16 or audio.ndim != 1 or (audio.size == 0 and not end):
            sender.send(_error("AUDIO must be a non-empty one-dimensional INT16 tensor",
                               pb_utils.TritonError.INVALID_ARG), flags=FINAL)
            return
        if start or call_id not in self.calls:
            if not start:
                sender.send(_error(f"call {call_id!r} has no asr state; start a new stream",
                                   pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
                return
            self.calls[call_id] = Listener(self)
        listener = self.calls[call_id]
        events = listener.feed(audio) if audio.size else []
        if end:
            events += listener.finish()
            del self.calls[call_id]
        for event in events:
            sender.send(_event(event))
        if end:
            sender.send(_event({"type": "end", "audio_ms": round(listener.audio_ms)}), flags=FINAL)
        else:
            sender.send(flags=FINAL)

    def finalize(self):
        self.calls.clear()
