"""MEASUREMENT-ONLY llm stand-in (perf/models/README.md): a fixed reply in a few deltas, at once.

Same tensors as model_repository/llm: TEXT deltas, FINISH_REASON on the FINAL
(last data) response. MAX_TOKENS caps the number of deltas.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _strings(**outputs):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor(k, np.array([v.encode()], dtype=np.object_)) for k, v in outputs.items()])


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.deltas = [d for d in params.get("reply", "Sure, I can help with that.").split("|") if d]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            messages = pb_utils.get_input_tensor_by_name(request, "MESSAGES")
            try:
                json.loads(messages.as_numpy().reshape(-1)[0]) if messages is not None else None
            except ValueError:
                messages = None
            if messages is None:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "MESSAGES must be one JSON string", pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
                continue
            limit = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
            n = max(1, min(len(self.deltas), int(limit.as_numpy().reshape(-1)[0]) if limit is not None else 1 << 30))
            for i, delta in enumerate(self.deltas[:n]):
                if request.is_cancelled():
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        "request cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
                    break
                last = i == n - 1
                reason = ("stop" if n == len(self.deltas) else "length") if last else ""
                sender.send(_strings(TEXT=delta, FINISH_REASON=reason), flags=FINAL if last else 0)
        return None
