"""The shared recordings of real human speech, as a phone delivers them, and word error rate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge import audio

ROOT = Path(__file__).resolve().parents[1]


def _audio_dir() -> Path:
    """`SHARED_AUDIO`, else the `shared/audio` beside this checkout, else beside the checkout it was cloned
    from (a scratch clone in a temporary folder has no `shared/` beside it)."""
    if os.environ.get("SHARED_AUDIO"):
        return Path(os.environ["SHARED_AUDIO"])
    candidates = [ROOT.parent / "shared" / "audio"]
    origin = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"], capture_output=True, text=True)
    if origin.returncode == 0 and Path(origin.stdout.strip()).is_dir():
        candidates.append(Path(origin.stdout.strip()).resolve().parent / "shared" / "audio")
    return next((c for c in candidates if (c / "transcripts.json").exists()), candidates[0])


AUDIO_DIR = _audio_dir()


@dataclass(frozen=True)
class Recording:
    name: str
    transcript: str
    path: Path

    def samples(self) -> tuple[np.ndarray, int]:
        return read_wav(self.path)

    def phone_pcm16k(self) -> np.ndarray:
        """16 kHz int16 after the trip a phone call gives it: 8 kHz mu-law and back."""
        samples, rate = self.samples()
        return audio.resample(audio.mulaw_to_pcm(audio.phone_line(samples, rate)), audio.TWILIO_RATE, audio.ASR_RATE)


def recordings() -> list[Recording]:
    entries = json.loads((AUDIO_DIR / "transcripts.json").read_text())
    return [Recording(e["file"].removesuffix(".wav"), e["transcript"], AUDIO_DIR / e["file"]) for e in entries]


def recording(name: str) -> Recording:
    return next(r for r in recordings() if r.name == name)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono")
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())


_NUMBERS = {"10": "ten", "33": "thirty three", "4": "four", "6": "six", "92": "ninety two"}


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, so transcripts compare by what was said."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]", " ", text)
    out = []
    for w in text.split():
        out += _NUMBERS.get(w, w).split()
    return out


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, words in the reference)."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    errors, n = word_errors(reference, hypothesis)
    return errors / max(n, 1)
