"""tts: text in, int16 audio chunks out as soon as each is synthesized (contract: ../../README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))

import numpy as np  # noqa: E402
from streaming import RequestError, StreamingModel, required, scalar, text  # noqa: E402

MAX_TEXT_CHARS = 2000


class TritonPythonModel(StreamingModel):
    def setup(self, params):
        engine = required(params, "engine")
        if engine == "piper":
            from piper_engine import PiperEngine

            self.engine = PiperEngine(required(params, "voice"))
        elif engine == "csm":
            from csm_engine import CsmEngine

            self.engine = CsmEngine.from_params(params)
        else:
            raise ValueError(f"tts: unknown engine {engine!r} (piper, csm)")

    def parse(self, request):
        words = text(request, "TEXT").strip()
        if not words:
            raise RequestError("TEXT is empty")
        if len(words) > MAX_TEXT_CHARS:
            raise RequestError(f"TEXT has {len(words)} characters, more than {MAX_TEXT_CHARS}; send it by sentence")
        voice = text(request, "VOICE", optional=True)
        if voice and voice != self.engine.voice_name:
            raise RequestError(f"VOICE {voice!r} is not served here; this instance speaks {self.engine.voice_name!r}")
        return words, scalar(request, "RATE", float, 1.0, low=0.5, high=2.0)

    def stream(self, job, is_cancelled):
        words, rate = job
        for audio in self.engine.synthesize(words, rate, is_cancelled):
            yield {"AUDIO": audio.astype(np.int16), "SAMPLE_RATE": np.array([self.engine.sample_rate], np.int32)}

    def closing_outputs(self, job, reason):
        return {"AUDIO": np.zeros(0, np.int16), "SAMPLE_RATE": np.array([self.engine.sample_rate], np.int32)}
