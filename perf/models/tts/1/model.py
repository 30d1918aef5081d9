"""MEASUREMENT-ONLY tts stand-in (perf/models/README.md): a tone as long as the text would take to say, at once.

Same tensors as model_repository/tts: AUDIO (INT16) pieces with SAMPLE_RATE,
then a FINAL response with empty AUDIO.
"""

import functools
import json

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.rate = int(params.get("sample_rate", 24000))
        self.ms_per_char = float(params.get("ms_per_char", 50))
        self.pieces = max(1, int(params.get("pieces", 1)))
        self.sample_rate = np.array([self.rate], np.int32)

    @functools.cache  # the same few clauses come back all the time
    def tone(self, chars: int) -> list:
        seconds = max(chars * self.ms_per_char / 1000, 0.2)
        t = np.arange(int(self.rate * seconds)) / self.rate
        fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)  # 10 ms ramps: no clicks
        tone = (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 660 * t)) * fade * 6000
        return np.array_split(tone.astype(np.int16), self.pieces)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            text = bytes(text.as_numpy().reshape(-1)[0]).strip() if text is not None else b""
            if not text:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "TEXT is empty", pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
                continue
            cancelled = False
            for piece in self.tone(len(text.decode(errors="replace"))):
                if request.is_cancelled():
                    cancelled = True
                    break
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("AUDIO", piece), pb_utils.Tensor("SAMPLE_RATE", self.sample_rate)]))
            if cancelled:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "request cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("AUDIO", np.zeros(0, np.int16)),
                    pb_utils.Tensor("SAMPLE_RATE", self.sample_rate)]), flags=FINAL)
        return None
