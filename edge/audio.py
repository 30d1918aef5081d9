"""Telephone audio: G.711 mu-law <-> 16-bit PCM, and resampling with soxr.

Twilio Media Streams carry 8 kHz mu-law in 20 ms frames (160 bytes). The asr
model takes 16 kHz int16; the tts model returns int16 at its own rate. The
mu-law codec is two lookup tables (ITU-T G.711), so a frame costs one numpy
indexing operation.
"""

from __future__ import annotations

import collections

import numpy as np
import soxr

TWILIO_RATE = 8000
ASR_RATE = 16000
FRAME_MS = 20
FRAME_BYTES = TWILIO_RATE * FRAME_MS // 1000  # 160 mu-law bytes per 20 ms frame
MULAW_SILENCE = 0xFF

_BIAS = 0x84


def _decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _encode_table() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # G.711 works on 14-bit magnitudes
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + 0x21
    segment = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), magnitude)
    code = np.where(segment > 7, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


_DECODE = _decode_table()
_ENCODE = _encode_table()
SOUND_THRESHOLD = 300  # |sample| above this is sound, not line noise
_LOUD = bytes(int(abs(int(v)) > SOUND_THRESHOLD) for v in _DECODE)  # mu-law byte -> 1 if above the threshold


def mulaw_to_pcm(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 samples at the same rate."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def pcm_to_mulaw(samples: np.ndarray) -> bytes:
    """int16 samples -> mu-law bytes at the same rate."""
    return _ENCODE[samples.astype(np.int32) + 32768].tobytes()


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """One-shot resampling of a whole int16 clip (for streams use `Resampler`)."""
    if from_rate == to_rate:
        return samples.astype(np.int16)
    return soxr.resample(samples.astype(np.int16), from_rate, to_rate)


class Resampler:
    """Streaming int16 resampler: keeps its filter state across chunks, so chunk edges do not click.

    soxr's default quality (HQ) releases its output in blocks of ~100 ms; `quality="QQ"` returns each
    20 ms frame at once, which is what the caller's audio on its way to the asr needs (8 kHz phone audio
    has nothing above 4 kHz for a sharper filter to keep)."""

    def __init__(self, from_rate: int, to_rate: int, quality: str = "HQ"):
        self.identity = from_rate == to_rate
        self._stream = None if self.identity else soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16",
                                                                      quality=quality)

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self.identity:
            return samples.astype(np.int16)
        return self._stream.resample_chunk(samples.astype(np.int16), last=last)


def phone_line(samples: np.ndarray, rate: int) -> bytes:
    """What a caller's audio becomes on a phone line: 8 kHz mu-law (tests and the call simulator use it)."""
    return pcm_to_mulaw(resample(samples, rate, TWILIO_RATE))


#: mu-law byte -> its magnitude code, 0 (silence) to 127 (full scale): G.711 is logarithmic, so above the
#: lowest segments a code is ~0.4 dB (16 codes double the amplitude)
_MAGNITUDE = bytes((~b) & 0x7F for b in range(256))
_ABOVE = [bytes(int(m > code) for m in _MAGNITUDE) for code in range(128)]  # code -> byte -> 1 if louder
_SOUND_CODE = max(_MAGNITUDE[b] for b in range(256) if abs(int(_DECODE[b])) <= SOUND_THRESHOLD)


class SoundGate:
    """Tells a caller's frame with sound from the line's own noise.

    A real line is seldom digital silence: street, car and fan noise on a mobile call is louder than
    SOUND_THRESHOLD, and a fixed threshold would call every frame of it sound. A frame is sound when its peak
    passes SOUND_THRESHOLD and the line's noise floor by `margin_codes` (24: ~9 dB); the floor is the quietest
    frame's peak in the last `window_s` (minimum statistics: speech comes in bursts with quieter frames
    between them, noise is always there). On digital silence it is `mulaw_has_sound`, and so it is for a
    call's first `window_s` + a block, until it has heard the line: a caller who talks at once is never taken
    for noise. It runs on every frame, so a frame is one or two C passes over its bytes; its exact peak is
    taken only when it is the quietest of its block so far."""

    def __init__(self, margin_codes: int = 24, window_s: float = 1.5, blocks: int = 3):
        self.margin = margin_codes
        self._block_frames = max(1, round(window_s * 1000 / FRAME_MS / blocks))
        self._minima: collections.deque[int] = collections.deque(maxlen=blocks)  # of the last whole blocks
        self._window_min = 127
        self._block_min, self._in_block = 0, 0  # as if the line had been digital silence

    def __call__(self, frame: bytes) -> bool:
        if self._block_min and b"\x01" not in frame.translate(_ABOVE[self._block_min - 1]):
            self._block_min = max(frame.translate(_MAGNITUDE))
        threshold = max(_SOUND_CODE, min(self._block_min, self._window_min) + self.margin)
        self._in_block += 1
        if self._in_block == self._block_frames:
            self._minima.append(self._block_min)
            self._window_min = min(self._minima)
            self._block_min, self._in_block = 127, 0
        return threshold < 127 and b"\x01" in frame.translate(_ABOVE[threshold])


def mulaw_has_sound(frame: bytes) -> bool:
    """True when a mu-law frame is more than line noise (a sample's peak above ~1% of full scale, SOUND_THRESHOLD):
    one C pass over the bytes and no arrays, as it runs on every frame."""
    return b"\x01" in frame.translate(_LOUD)
