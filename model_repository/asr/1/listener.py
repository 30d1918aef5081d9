"""One call's ear: voice activity, turn endpointing and transcribing while the caller speaks.

A plain state machine (no threads, no Triton), so the whole story of a turn
reads in one place:

* every 32 ms window gets a Silero speech probability; `min_speech_ms` of
  speech in a row is `speech_start` (reported at the onset), `min_silence_ms`
  of silence is `speech_stop` (reported where the silence began);
* while the caller speaks, a `partial` transcript `first_partial_ms` after
  the onset (enough to tell "uh-huh" from a real interruption), again every
  `first_partial_ms` for the turn's first second, then every
  `partial_interval_ms`, as long as the client wants them (`partials`: the
  edge does while the agent speaks, whose interruption waits on the words).
  None is begun in silence that may be becoming a `speech_stop`: a call runs
  one transcription at a time, and the one the endpoint waits on would wait
  behind it;
* at each `speech_stop` the turn so far is transcribed at once, in the
  background, so by the time the endpoint silence has passed the final text
  is usually ready: the final costs nothing after the endpoint;
* the endpoint is `endpoint_silence_complete_ms` of silence when that text
  reads as a finished sentence, `endpoint_silence_ms` otherwise;
* a long turn is committed at a pause once its untranscribed part reaches
  `commit_after_s`: later jobs transcribe only the audio after it, with the
  committed text as Whisper's prompt, so no job grows with the turn;
* decisions are taken in the call's audio time, never in the transcriber's:
  audio that comes while the turn's end waits on its transcript waits too
  (`waiting`), so a sender faster than real time, or a transcriber behind,
  never lets the next turn's speech run into this one.

`feed()` takes audio and returns events; `next_job()` hands out the one
transcription this call should run now (at most one at a time);
`done()` takes its result and returns events; `finish()` ends the call.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512  # Silero's window at 16 kHz: 32 ms
EARLY_PARTIALS_MS = 1000  # partials come every first_partial_ms this long after a turn's onset


def ms(samples: int) -> int:
    return int(round(samples * 1000 / SAMPLE_RATE))


def samples(milliseconds: float) -> int:
    return int(round(milliseconds * SAMPLE_RATE / 1000))


@dataclass(frozen=True)
class Settings:
    vad_threshold: float = 0.5
    min_speech_ms: int = 64
    min_silence_ms: int = 96
    endpoint_silence_ms: int = 800
    endpoint_silence_complete_ms: int = 350
    first_partial_ms: int = 300
    partial_interval_ms: int = 600
    speech_pad_ms: int = 500
    commit_after_s: float = 7.0
    max_segment_s: float = 25.0


@dataclass(frozen=True)
class Job:
    """A transcription to run: `audio` is samples [start, end) of the call, `kind` partial|pause|commit."""

    kind: str
    turn: int
    start: int
    end: int
    audio: np.ndarray
    prompt: str

    @property
    def urgent(self) -> bool:
        """Work the turn's end waits for goes before partials."""
        return self.kind != "partial"


@dataclass
class Turn:
    number: int
    start: int  # onset of its first speech
    committed_until: int  # transcribed audio before this is `committed_text` and is not transcribed again
    committed_text: str = ""
    speech_end: int | None = None  # where the latest silence began; None while the caller speaks
    heard_until: int = -1  # latest transcript covers [committed_until, heard_until)
    heard_text: str = ""
    heard_at_pause: bool = False
    next_partial: int = 0
    last_partial: str = ""

    def text(self) -> str:
        return " ".join(t for t in (self.committed_text, self.heard_text) if t)


_CONTINUES = {"and", "but", "so", "or", "because", "the", "a", "an", "to", "of", "with", "that", "if", "um", "uh",
              "my", "your", "is", "are", "i", "for", "in", "on", "at"}


def reads_complete(text: str) -> bool:
    """A finished sentence: ends with ? or !, or with . (not an ellipsis) after three words or more and not on
    a word that asks for more.

    Whisper ends most segments with a period, so a period after "and"/"the"/"to" proves nothing; a question
    mark does ("Which folder should I save it to?")."""
    text = text.strip()
    if text.endswith(("?", "!")):
        return True
    if not text.endswith(".") or text.endswith("..."):
        return False
    words = re.findall(r"[a-z']+", text.lower())
    # a lone word ("Weasels.") is as often the start of a sentence after a breath as a whole answer
    return len(words) >= 3 and words[-1] not in _CONTINUES


class AudioBuffer:
    """The call's recent audio as float32, addressed by sample index from the call's first sample."""

    def __init__(self):
        self.data = np.zeros(SAMPLE_RATE * 4, np.float32)
        self.start = 0  # call sample index of data[0]
        self.size = 0

    @property
    def end(self) -> int:
        return self.start + self.size

    def append(self, audio: np.ndarray) -> None:
        if self.size + len(audio) > len(self.data):
            grown = np.zeros(max(2 * len(self.data), self.size + len(audio)), np.float32)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:self.size + len(audio)] = audio
        self.size += len(audio)

    def slice(self, start: int, end: int) -> np.ndarray:
        start, end = max(start, self.start), min(end, self.end)
        return self.data[start - self.start:end - self.start].copy()

    def discard_before(self, index: int) -> None:
        drop = min(max(index - self.start, 0), self.size)
        if drop:
            self.data[:self.size - drop] = self.data[drop:self.size]
            self.size -= drop
            self.start += drop


@dataclass
class Listener:
    settings: Settings
    vad: object  # callable: float32 samples -> speech probability per completed 32 ms window
    audio: AudioBuffer = field(default_factory=AudioBuffer)
    turn: Turn | None = None
    job: Job | None = None  # the transcription running now
    ending: bool = False  # the call ended: close the turn as soon as its transcript is in
    partials: bool = True  # the client wants partials while the caller speaks (the pauses' come always)
    waiting: list[np.ndarray] = field(default_factory=list)  # audio received past a decision that awaits a job

    def __post_init__(self):
        s = self.settings
        self.threshold, self.neg_threshold = s.vad_threshold, max(s.vad_threshold - 0.15, 0.01)
        self.onset_windows = max(1, -(-samples(s.min_speech_ms) // WINDOW))
        self.hangover_windows = max(1, -(-samples(s.min_silence_ms) // WINDOW))
        self.hangover = self.hangover_windows * WINDOW
        self.pad = samples(s.speech_pad_ms)
        # a speech_stop found in a slice this long is never more than one endpoint back: no slice runs past
        # the decision point it makes
        self.slice = max(WINDOW, samples(s.endpoint_silence_complete_ms) - self.hangover)
        self.n = 0  # samples listened to: received, less those `waiting`
        self.vad_at = 0  # start of the next VAD window
        self.speaking = False
        self.run = 0  # consecutive windows against the current state (speech while silent, or silence)
        self.run_start = 0
        self.turns = 0
        self.recent = collections.deque(maxlen=int(10 * SAMPLE_RATE / WINDOW))  # (window start, probability)

    @property
    def audio_ms(self) -> int:
        return ms(self.n)

    @property
    def idle(self) -> bool:
        """Nothing left to say: no turn open, no transcription running and no audio waiting."""
        return self.turn is None and self.job is None and not self.waiting

    # -- audio in -------------------------------------------------------------
    def feed(self, pcm: np.ndarray) -> list[dict]:
        """Listen to the next audio of the call, up to a point where the endpoint needs the transcript that
        is still being made (`_decision_point`); what comes after it waits for `done()`."""
        if self.waiting:
            self.waiting.append(pcm)
            return []
        events = []
        while len(pcm):
            point = self._decision_point()
            if point is not None and point <= self.n:
                self.waiting.append(pcm)
                break
            size = min(len(pcm), self.slice if point is None else min(self.slice, point - self.n))
            events += self._listen(pcm[:size])
            pcm = pcm[size:]
        return events

    def _decision_point(self) -> int | None:
        """Where the turn may end (its shorter endpoint, which needs the text) while its transcript is not in."""
        turn = self.turn
        if turn is None or self.speaking or turn.speech_end is None or self._heard_all(turn):
            return None
        return turn.speech_end + samples(self.settings.endpoint_silence_complete_ms)

    def _listen(self, pcm: np.ndarray) -> list[dict]:
        """VAD and turn logic, window by window: a decision is taken at the end of the window that brings it."""
        self.audio.append(pcm)
        end = self.n + len(pcm)
        events = []
        for p in self.vad(pcm):
            start = self.vad_at
            self.vad_at = self.n = start + WINDOW
            events += self._window(float(p), start)
        self.n = end
        events += self._endpoint()  # audio that completes no VAD window may still reach an endpoint_ms
        if self.turn is None and not self.speaking:
            self.audio.discard_before(self.vad_at - self.run * WINDOW - self.pad)
        return events

    def _window(self, p: float, start: int) -> list[dict]:
        events = []
        self.recent.append((start, p))
        if not self.speaking:
            if p >= self.threshold:
                if self.run == 0:
                    self.run_start = start
                self.run += 1
                if self.run >= self.onset_windows:
                    events += self._speech_started(self.run_start)
            else:
                self.run = 0
        else:
            if p < self.neg_threshold:
                if self.run == 0:
                    self.run_start = start
                self.run += 1
                if self.run >= self.hangover_windows:
                    events += self._speech_stopped(self.run_start)
            else:
                self.run = 0
        return events + self._endpoint()

    def _speech_started(self, onset: int) -> list[dict]:
        self.speaking, self.run = True, 0
        if self.turn is None:
            self.turns += 1
            self.turn = Turn(self.turns, onset, committed_until=max(self.audio.start, onset - self.pad))
        turn = self.turn
        turn.speech_end = None
        turn.next_partial = onset + samples(self.settings.first_partial_ms)
        self._commit_if_long()
        return [{"type": "speech_start", "audio_ms": ms(onset)}]

    def _speech_stopped(self, silence: int) -> list[dict]:
        self.speaking, self.run = False, 0
        self.turn.speech_end = silence
        waits = (self.settings.endpoint_silence_complete_ms, self.settings.endpoint_silence_ms)
        return [{"type": "speech_stop", "audio_ms": ms(silence),
                 "endpoint_ms": sorted(ms(silence + samples(wait)) for wait in waits)}]

    # -- the endpoint -----------------------------------------------------------
    def _heard_all(self, turn: Turn) -> bool:
        """The latest transcript covers the turn's speech and the silence that ended it."""
        return turn.speech_end is not None and turn.heard_until >= min(turn.speech_end + self.hangover, self.n)

    def _endpoint(self) -> list[dict]:
        turn = self.turn
        if turn is None or self.speaking or not self._heard_all(turn):
            return []
        text = turn.text()
        wait = self.settings.endpoint_silence_complete_ms if reads_complete(text) else self.settings.endpoint_silence_ms
        # counted to the nearest ms: a client's streaming resampler may hold back a few samples of what it sent
        if not self.ending and ms(self.n - turn.speech_end) < wait:
            return []
        self.turn = None
        self.audio.discard_before(self.n - self.pad)
        if not text:
            return []  # noise: no final
        return [{"type": "final", "text": text, "speech_start_ms": ms(turn.start),
                 "speech_end_ms": ms(turn.speech_end), "audio_ms": ms(self.n)}]

    def finish(self) -> list[dict]:
        """The call ended: a speech_stop if the caller was still speaking; the final follows once transcribed.
        (With audio waiting, `done()` finishes once it has been listened to.)"""
        self.ending = True
        if self.waiting:
            return []
        events = self._speech_stopped(self.n) if self.speaking else []
        return events + self._endpoint()

    # -- transcription ----------------------------------------------------------
    def next_job(self) -> Job | None:
        """The transcription to run now, if any; the caller must hand its result to `done()`."""
        turn = self.turn
        if self.job is not None or turn is None:
            return None
        if not self.speaking:
            if self._heard_all(turn):
                return None
            end = min(self.n, turn.speech_end + 3 * self.hangover, self.run_start if self.run else self.n)
            self.job = self._job("pause", turn.committed_until, end)
        elif self.n - turn.committed_until > samples(self.settings.max_segment_s * 1000):
            self.job = self._job("commit", turn.committed_until, self._quietest_point())
        elif self.partials and self.n >= turn.next_partial and not self.run:
            # in the turn's first second look again soon: a barge-in waits on the first words that are not "um"
            early = self.n - turn.start < samples(EARLY_PARTIALS_MS)
            interval = self.settings.first_partial_ms if early else self.settings.partial_interval_ms
            turn.next_partial = self.n + samples(interval)
            self.job = self._job("partial", turn.committed_until, self.n)
        return self.job

    def _job(self, kind: str, start: int, end: int) -> Job:
        return Job(kind, self.turn.number, start, end, self.audio.slice(start, end), self.turn.committed_text)

    def _quietest_point(self) -> int:
        """Where to cut a turn that has gone on too long without a pause: its least speech-like recent window."""
        turn = self.turn
        late = [(p, s) for s, p in self.recent if s > turn.committed_until + samples(self.settings.max_segment_s * 500)]
        return min(late)[1] + WINDOW if late else self.n

    def done(self, job: Job, text: str) -> list[dict]:
        """The result of `job`: events, and those of the audio that waited on it."""
        events = self._done(job, text)
        if self.waiting and self._decision_point() is None:
            waited, self.waiting = np.concatenate(self.waiting), []
            events += self.feed(waited)
            if self.ending:
                events += self.finish()
        return events

    def _done(self, job: Job, text: str) -> list[dict]:
        self.job = None
        turn = self.turn
        if turn is None or job.turn != turn.number or job.start != turn.committed_until:
            return []  # the turn it was for is over, or was committed meanwhile
        if job.kind == "commit":
            turn.committed_text = " ".join(t for t in (turn.committed_text, text) if t)
            turn.committed_until = job.end
            turn.heard_until, turn.heard_text = -1, ""
            self.audio.discard_before(job.end)
            return []
        turn.heard_until, turn.heard_text, turn.heard_at_pause = job.end, text, job.kind == "pause"
        events = []
        if text and (turn.text() != turn.last_partial or job.kind == "pause"):
            # at a pause always: the edge starts its reply on it (speculatively) before the endpoint
            turn.last_partial = turn.text()
            events.append({"type": "partial", "text": turn.last_partial, "audio_ms": ms(job.end)})
        self._commit_if_long()
        return events + self._endpoint()

    def _commit_if_long(self) -> None:
        """Speech resumed after a transcribed pause: fix the text so far if the turn has grown long."""
        turn = self.turn
        if (self.speaking and turn.heard_at_pause and turn.heard_text
                and turn.heard_until - turn.committed_until >= samples(self.settings.commit_after_s * 1000)):
            turn.committed_text, turn.committed_until = turn.text(), turn.heard_until
            turn.heard_until, turn.heard_text, turn.heard_at_pause = -1, "", False
            self.audio.discard_before(turn.committed_until)
