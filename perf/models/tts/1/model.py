"""MEASUREMENT-ONLY tts stand-in (perf/models/README.md): a fixed tone of `clause_ms` per request, at once.

Same tensors as model_repository/tts: AUDIO (INT16) pieces with SAMPLE_RATE,
then a FINAL response with empty AUDIO.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.rate = int(params.get("sample_rate", 24000))
        clause_s = float(params.get("clause_ms", 600)) / 1000
        t = np.arange(int(self.rate * clause_s)) / self.rate
        fade = np.minimum(1.0, np.minimum(t, clause_s - t) / 0.01)  # 10 ms ramps: no clicks
        tone = (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 660 * t)) * fade * 6000
        self.pieces = np.array_split(tone.astype(np.int16), max(1, int(params.get("pieces", 1))))
        self.sample_rate = np.array([self.rate], np.int32)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            if text is None or not bytes(text.as_numpy().reshape(-1)[0]).strip():
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "TEXT is empty", pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
                continue
            cancelled = False
            for piece in self.pieces:
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
