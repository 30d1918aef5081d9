"""A Twilio call simulator: plays Twilio's side of a Media Stream against the edge, and times it.

    python -m edge.simulate --url ws://127.0.0.1:8080/media --wav a.wav --wav b.wav
    python -m edge.simulate --twiml-url http://127.0.0.1:8080/twiml --auth-token ... --wav a.wav

Like Twilio it (optionally) fetches the TwiML from the signed webhook, opens the
signed WebSocket, sends `connected` and `start`, then one 20 ms `media` frame
of caller audio every 20 ms on an absolute clock (speech or line silence, with
--line-noise-dbfs background noise under both; never a gap, unless --speech-only
makes it a test caller that sends nothing between its turns), and plays the
agent's audio back in real time: a playback buffer drained at 8000 samples/s,
each `mark` echoed once the audio queued before it has played (never, with
--no-mark-echo, as a test caller may), `clear` dropping the buffer and echoing
pending marks at once.
The caller speaks its turns after the agent's reply has finished (plus a pause),
after fixed gaps, or N ms into the reply (barge-in). Everything is timed on one
clock: seconds since the `start` message. `run_call()` is the API the tests
and the load generator use; the CLI prints `CallReport.summary()` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import wave
import xml.etree.ElementTree as ET
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import aiohttp
import numpy as np

from edge import audio, protocol
from edge.signature import SIGNATURE_HEADER, sign, sign_websocket

FRAME = audio.FRAME_BYTES  # 160 mu-law bytes = 20 ms
FRAME_S = audio.FRAME_MS / 1000
UNDERRUN_TICKS = 3  # 60 ms of silence the agent did not send: as long as perf's glitch gap
SILENCE = bytes([audio.MULAW_SILENCE]) * FRAME
SPEECH_RANGE_DB = 30  # a caller frame this far below the turn's loudest is its line noise, not speech


@dataclass
class CallerTurn:
    """What the caller says in one turn, and when it says it."""
    audio: np.ndarray  # 8 kHz int16
    name: str = ""
    barge_in_ms: float | None = None  # start this long after the agent's reply is first heard (interrupting it)
    pause_ms: float | None = None  # overrides run_call's pause_ms for this turn
    dtmf: str = ""  # digits pressed as the turn starts


class LineNoise:
    """A phone line's background noise (street, car, a fan): white noise at `dbfs` RMS under the caller's
    speech and in every pause, as 20 ms mu-law frames. Speech is still told by the clean recording."""

    def __init__(self, dbfs: float, seed: int = 0, seconds: float = 10.0):
        rms = 32768 * 10 ** (dbfs / 20)
        self._noise = np.random.default_rng(seed).normal(0, rms, int(seconds * audio.TWILIO_RATE))
        self.frames = _frames(self._noise.clip(-32768, 32767).astype(np.int16))[0]
        self._next = 0

    def under(self, samples: np.ndarray) -> np.ndarray:
        """`samples` with the line's noise added."""
        noise = np.resize(self._noise, len(samples))
        return (samples.astype(np.float64) + noise).clip(-32768, 32767).astype(np.int16)

    def frame(self) -> bytes:
        """The next frame of the line when the caller says nothing."""
        self._next = (self._next + 1) % len(self.frames)
        return self.frames[self._next]


TurnLike = Union[CallerTurn, np.ndarray, str, Path]


@dataclass
class Frame:
    """One agent `media` message as it arrived."""
    t: float
    nbytes: int
    audible: bool
    buffered_ms: float  # audio queued for playback once it arrived (how far ahead of real time the edge is)


@dataclass
class MarkEcho:
    t: float
    name: str
    played: bool  # False: echoed because a clear dropped the audio before it


@dataclass
class TurnReport:
    index: int
    name: str
    started_at: float
    ended_at: float | None = None
    speech_start: float | None = None  # send time of the turn's first frame of speech (`_frames`)
    speech_end: float | None = None  # end of the turn's last frame of speech (the caller's last syllable)
    barge_in: bool = False  # the agent was audible when the turn started
    reply_first_frame_at: float | None = None  # arrival of the agent's first audible frame after speech_end
    reply_first_heard_at: float | None = None  # when that audio was played to the caller
    voice_to_voice_ms: float | None = None  # speech_end -> reply_first_frame_at (what the edge controls)
    heard_voice_to_voice_ms: float | None = None  # speech_end -> reply_first_heard_at (what the caller hears)
    reply_frames: int = 0
    reply_audio_ms: float = 0.0
    reply_max_gap_ms: float | None = None  # largest inter-arrival gap of the reply's frames
    reply_underruns: int = 0  # times Twilio's buffer ran dry for UNDERRUN_TICKS+ while the reply still came in
    clears: int = 0
    clear_after_speech_ms: float | None = None  # barge-in: caller speech onset -> first clear
    silent_after_speech_ms: float | None = None  # barge-in: caller speech onset -> the agent went quiet (heard)
    marks_echoed: int = 0


@dataclass
class CallReport:
    url: str
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    started_unix: float = 0.0
    duration: float = 0.0
    turns: list[TurnReport] = field(default_factory=list)
    greeting_first_frame_at: float | None = None
    frames: list[Frame] = field(default_factory=list)
    marks_received: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: list[MarkEcho] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed_by: str = "caller"
    max_tick_lag_ms: float = 0.0  # the simulator's own lateness: large values make its timings unreliable
    heard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # the agent as heard, 8 kHz
    starved: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per tick: the buffer had no full frame
    caller: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # the caller's line, 8 kHz (what
    # it sent, and silence where it sent nothing)

    def loud_ticks(self) -> np.ndarray:
        """One flag per 20 ms tick of the call: the agent's voice was playing to the caller."""
        played = self.heard[:len(self.heard) // audio.FRAME_BYTES * audio.FRAME_BYTES].reshape(-1, audio.FRAME_BYTES)
        return np.abs(played.astype(np.int32)).max(axis=1) > audio.SOUND_THRESHOLD

    def agent_heard(self, start: float, end: float) -> bool:
        """Whether the caller heard the agent's voice between `start` and `end` (s from the call's start)."""
        loud = self.loud_ticks()
        return bool(loud[max(int(start / FRAME_S), 0):max(int(np.ceil(end / FRAME_S)), 0)].any())

    def summary(self) -> dict:
        gaps = np.diff([f.t for f in self.frames]) * 1000 if len(self.frames) > 1 else np.zeros(0)
        return {
            "url": self.url, "stream_sid": self.stream_sid, "call_sid": self.call_sid,
            "duration_s": round(self.duration, 3), "closed_by": self.closed_by,
            "greeting_first_frame_at": _round(self.greeting_first_frame_at),
            "turns": [{k: _round(v) for k, v in t.__dict__.items()} for t in self.turns],
            "frames": len(self.frames),
            "frame_bytes": dict(Counter(f.nbytes for f in self.frames)),
            "frame_gap_ms": _stats(gaps),
            "max_buffered_ms": _round(max((f.buffered_ms for f in self.frames), default=0.0)),
            "marks_received": len(self.marks_received),
            "marks_echoed_played": sum(m.played for m in self.marks_echoed),
            "marks_echoed_cleared": sum(not m.played for m in self.marks_echoed),
            "clears": len(self.clears),
            "max_tick_lag_ms": _round(self.max_tick_lag_ms),
            "errors": self.errors,
        }

    def write_wav(self, path: str | Path) -> None:
        """The agent's audio as the caller heard it (silence where nothing played), 8 kHz mono."""
        _write_wav(path, self.heard[:, None])

    def write_conversation_wav(self, path: str | Path) -> None:
        """Both sides on one timeline: caller left, agent right, 8 kHz stereo."""
        n = max(len(self.heard), len(self.caller))
        both = np.zeros((n, 2), np.int16)
        both[:len(self.caller), 0], both[:len(self.heard), 1] = self.caller, self.heard
        _write_wav(path, both)


def _caller_frame_sent(call, report: "TurnReport", sounding: bool, frames: int, t: float) -> None:
    """Account for the caller frame just sent at `t` (a `_Call`, or perf/swarm.py's lean caller): speech
    start and end of the turn, when to start waiting for the reply, and the move to the next turn."""
    if sounding:
        if report.speech_start is None:
            report.speech_start = t
        report.speech_end = t + FRAME_S
        # a reply only counts once the caller has finished: start over if speech resumes
        call.wait_ref, call.reply_heard_at, report.reply_first_heard_at = report.speech_end, None, None
    call.frame_index += 1
    if call.frame_index == frames:
        report.ended_at = t + FRAME_S
        if report.speech_end is None:  # a silent turn: wait for whatever the agent says next
            call.wait_ref = report.ended_at
        call.prev_end = report.ended_at
        call.frame_index, call.turn_index = -1, call.turn_index + 1


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2),
            "max": round(float(values.max()), 2)}


def _write_wav(path: str | Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(audio.TWILIO_RATE)
        w.writeframes(samples.astype(np.int16).tobytes())


def read_wav_8k(path: str | Path) -> np.ndarray:
    """A 16-bit mono WAV as 8 kHz int16 (resampled with soxr when needed)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono")
        samples, rate = np.frombuffer(w.readframes(w.getnframes()), np.int16), w.getframerate()
    return audio.resample(samples, rate, audio.TWILIO_RATE)


def _caller_turn(turn: TurnLike, index: int) -> CallerTurn:
    if isinstance(turn, CallerTurn):
        return turn
    if isinstance(turn, (str, Path)):
        return CallerTurn(read_wav_8k(turn), name=Path(turn).stem)
    return CallerTurn(np.asarray(turn, np.int16), name=f"turn{index}")


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class _Playback:
    """Twilio's outbound buffer: audio and marks in arrival order, drained 160 bytes per 20 ms tick."""

    def __init__(self):
        self.buffer = bytearray()
        self.queued = 0  # bytes ever queued
        self.consumed = 0  # bytes played or dropped by a clear
        self.marks: deque[tuple[int, str]] = deque()

    def add(self, mulaw: bytes) -> None:
        self.buffer += mulaw
        self.queued += len(mulaw)

    def mark(self, name: str) -> bool:
        """Queue a mark; True when nothing is ahead of it, so it is echoed at once."""
        if self.queued <= self.consumed and not self.marks:
            return True
        self.marks.append((self.queued, name))
        return False

    def clear(self) -> list[str]:
        self.buffer.clear()
        self.consumed = self.queued
        names = [name for _, name in self.marks]
        self.marks.clear()
        return names

    def tick(self) -> tuple[bytes, list[str]]:
        """The next 20 ms the caller hears, and the marks whose audio has now all played."""
        chunk = bytes(self.buffer[:FRAME])
        del self.buffer[:FRAME]
        self.consumed += len(chunk)
        due = []
        while self.marks and self.marks[0][0] <= self.consumed:
            due.append(self.marks.popleft()[1])
        return chunk + SILENCE[len(chunk):], due

    @property
    def buffered_ms(self) -> float:
        return len(self.buffer) / audio.TWILIO_RATE * 1000


class _Call:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, report: CallReport, turns: list[CallerTurn], *,
                 wait_for_greeting: bool, wait_for_reply: bool, pause_ms: float, barge_in_ms: float | None,
                 reply_timeout_s: float, tail_ms: float, line_noise: LineNoise | None = None,
                 speech_only: bool = False, echo_marks: bool = True):
        self.ws, self.report, self.turns = ws, report, turns
        self.line_noise, self.speech_only, self.echo_marks = line_noise, speech_only, echo_marks
        self.wait_for_greeting, self.wait_for_reply = wait_for_greeting, wait_for_reply
        self.pause_ms, self.barge_in_ms = pause_ms, barge_in_ms
        self.reply_timeout_s, self.tail_ms = reply_timeout_s, tail_ms
        self.playback = _Playback()
        self.loop = asyncio.get_running_loop()
        self.t0 = 0.0
        self.seq = 0
        self.chunk = 0
        self.heard: list[bytes] = []
        self.starved: list[bool] = []
        self.sent: list[bytes] = []
        self.last_audible_heard: float | None = None
        # the caller's side: which turn, which frame, and what the caller is waiting for
        self.turn_index = 0
        self.frame_index = -1  # -1: waiting to start turn_index
        # before the clock starts: no work at a turn's start (what is speech is told from the clean recording)
        self.prepared = [_frames(turn.audio) for turn in turns]
        if line_noise:
            self.prepared = [(_frames(line_noise.under(turn.audio))[0], sounding)
                             for turn, (_, sounding) in zip(turns, self.prepared)]
        self.frames: list[bytes] = []
        self.sounding: list[bool] = []
        self.wait_ref = 0.0  # the agent's audio heard from this time on answers the caller (0: the greeting)
        self.prev_end = 0.0  # when the caller's previous turn ended
        self.reply_heard_at: float | None = None
        self.done_at: float | None = None

    def now(self) -> float:
        return self.loop.time() - self.t0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def send(self, text: str) -> bool:
        """Send unless the edge has gone (it may hang up at any moment)."""
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(text)
            return True
        except ConnectionError:
            return False

    async def run(self) -> None:
        r = self.report
        await self.send(protocol.connected_message())
        self.t0 = self.loop.time()
        r.started_unix = time.time()
        await self.send(protocol.start_message(self.next_seq(), r.account_sid, r.stream_sid, r.call_sid,
                                                      r.custom_parameters))
        receiver = asyncio.create_task(self.receive())
        try:
            await self.line()
            self.done_at = self.now()
        finally:
            await self.send(protocol.stop_message(self.next_seq(), r.stream_sid, r.account_sid, r.call_sid))
            await self.ws.close()
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            r.duration = self.now()
            r.heard = audio.mulaw_to_pcm(b"".join(self.heard))
            r.starved = np.asarray(self.starved, bool)
            r.caller = audio.mulaw_to_pcm(b"".join(self.sent))
            _finish_turns(r)

    async def receive(self) -> None:
        r = self.report
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type == aiohttp.WSMsgType.ERROR:
                    r.errors.append(f"websocket error: {self.ws.exception()}")
                continue
            t = self.now()
            try:
                m = protocol.parse_outbound(msg.data)
            except protocol.ProtocolError as e:
                r.errors.append(str(e))
                continue
            if m.stream_sid != r.stream_sid:
                r.errors.append(f"{m.event} for stream {m.stream_sid!r}, not {r.stream_sid!r}")
                continue
            if m.event == "media":
                payload = m.media.payload
                self.playback.add(payload)
                r.frames.append(Frame(t, len(payload), audio.mulaw_has_sound(payload),
                                      self.playback.buffered_ms))
            elif m.event == "mark":
                r.marks_received.append((t, m.mark.name))
                if self.playback.mark(m.mark.name):
                    await self.echo(m.mark.name, played=True)
            else:
                r.clears.append(t)
                for name in self.playback.clear():
                    await self.echo(name, played=False)
        if self.done_at is None:
            self.report.closed_by = "edge"

    async def echo(self, name: str, played: bool) -> None:
        if not self.echo_marks:
            return
        self.report.marks_echoed.append(MarkEcho(self.now(), name, played))
        await self.send(protocol.mark_echo_message(self.next_seq(), self.report.stream_sid, name))

    async def line(self) -> None:
        """The 20 ms clock: each tick sends one frame of the caller and plays one frame of the agent."""
        tick = 0
        while not self.ws.closed:
            target = self.t0 + tick * FRAME_S
            delay = target - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.report.max_tick_lag_ms = max(self.report.max_tick_lag_ms, -delay * 1000)
            t = tick * FRAME_S  # the tick's nominal time: frames carry it as their timestamp
            if not await self.speak(t):
                return
            await self.play(t)
            tick += 1

    async def play(self, t: float) -> None:
        self.starved.append(len(self.playback.buffer) < FRAME)
        chunk, due = self.playback.tick()
        self.heard.append(chunk)
        if chunk != SILENCE and audio.mulaw_has_sound(chunk):
            self.last_audible_heard = t + FRAME_S  # the end of this audible frame
            if self.reply_heard_at is None and t >= self.wait_ref:
                self.reply_heard_at = t
                if self.report.turns:
                    self.report.turns[-1].reply_first_heard_at = t
        for name in due:
            await self.echo(name, played=True)

    async def speak(self, t: float) -> bool:
        """Send the caller's frame for tick time `t`; False once the call is over."""
        r = self.report
        if self.frame_index < 0 and self.ready(t):
            if self.turn_index == len(self.turns):
                return False
            turn = self.turns[self.turn_index]
            self.frames, self.sounding = self.prepared[self.turn_index]
            audible_now = self.last_audible_heard is not None and t - self.last_audible_heard < 0.08
            r.turns.append(TurnReport(self.turn_index, turn.name, t, barge_in=audible_now))
            self.wait_ref, self.reply_heard_at = float("inf"), None
            for digit in turn.dtmf:
                await self.send(protocol.dtmf_message(self.next_seq(), r.stream_sid, digit))
            self.frame_index = 0
        if self.frame_index >= 0:
            frame, k = self.frames[self.frame_index], self.frame_index
            _caller_frame_sent(self, r.turns[-1], self.sounding[k], len(self.frames), t)
        else:
            frame = self.line_noise.frame() if self.line_noise else SILENCE
            if self.speech_only:
                self.sent.append(SILENCE)
                return True
        self.chunk += 1
        self.sent.append(frame)
        return await self.send(protocol.caller_media_message(self.next_seq(), r.stream_sid, self.chunk,
                                                             round(t * 1000), frame))

    def ready(self, t: float) -> bool:
        """Whether the caller starts its next turn (or, after the last one, hangs up) at `t`."""
        last = self.turn_index == len(self.turns)
        turn = None if last else self.turns[self.turn_index]
        pause = (turn.pause_ms if turn and turn.pause_ms is not None else self.pause_ms) / 1000
        if last:
            pause = max(pause, self.tail_ms / 1000)
        first = self.turn_index == 0
        waits_for_agent = self.wait_for_greeting if first else self.wait_for_reply
        if not waits_for_agent:
            return t >= self.prev_end + (0.0 if first else pause)
        barge_in = None if last else (turn.barge_in_ms if turn.barge_in_ms is not None else self.barge_in_ms)
        if self.reply_heard_at is None:  # the agent has not answered (yet)
            return t >= self.wait_ref + self.reply_timeout_s
        if barge_in is not None and not first:
            return t >= self.reply_heard_at + barge_in / 1000
        quiet = t - (self.last_audible_heard or 0.0)  # since the agent was last heard
        return self.playback.buffered_ms == 0 and quiet >= pause


def _frames(samples: np.ndarray) -> tuple[list[bytes], list[bool]]:
    """A turn as the 20 ms mu-law frames the caller sends, and which of them carry speech: sound (a peak above
    SOUND_THRESHOLD) within SPEECH_RANGE_DB of the turn's loudest frame. The fixed threshold alone takes a
    recording's noise for speech: on ps_something its hiss ran the speech on 660 ms past the last word, and a
    reply that began before that read as 10 ms voice-to-voice."""
    mulaw = audio.pcm_to_mulaw(samples)
    mulaw += SILENCE[: -len(mulaw) % FRAME]
    frames = [mulaw[i:i + FRAME] for i in range(0, len(mulaw), FRAME)]
    padded = np.zeros(len(frames) * FRAME, np.int32)
    padded[:len(samples)] = np.abs(np.asarray(samples, np.int32))
    peaks = padded.reshape(-1, FRAME).max(axis=1) if frames else padded
    floor = max(audio.SOUND_THRESHOLD, int(peaks.max(initial=0) * 10 ** (-SPEECH_RANGE_DB / 20)))
    return frames, [bool(p > floor) for p in peaks]


QUIET_TICKS = 20  # 400 ms without the agent's voice: it stopped (pauses inside its speech are shorter)


def _quiet_after(loud: np.ndarray, t: float) -> float | None:
    """ms from `t` to the first played tick that starts QUIET_TICKS of silence (`loud`: one flag per tick)."""
    tick = int(np.ceil(t / FRAME_S))
    if len(loud) - tick < QUIET_TICKS:
        return None
    quiet = np.lib.stride_tricks.sliding_window_view(~loud[tick:], QUIET_TICKS).all(axis=1)
    return ((int(np.argmax(quiet)) + tick) * FRAME_S - t) * 1000 if quiet.any() else None


def _finish_turns(r: CallReport) -> None:
    """Attribute the agent's frames, clears and marks to the turn they answer (up to the next turn's start)."""
    bounds = [t.started_at for t in r.turns] + [float("inf")]
    loud = r.loud_ticks()
    audible = [f for f in r.frames if f.audible]
    r.greeting_first_frame_at = next((f.t for f in audible if f.t < bounds[0]), None)
    for i, turn in enumerate(r.turns):
        end = turn.speech_end if turn.speech_end is not None else turn.ended_at
        if end is None:
            continue
        window = [f for f in r.frames if end <= f.t < bounds[i + 1]]
        first = next((f for f in window if f.audible), None)
        if first is not None:
            turn.reply_first_frame_at = first.t
            turn.voice_to_voice_ms = (first.t - end) * 1000
        if turn.reply_first_heard_at is not None:
            turn.heard_voice_to_voice_ms = (turn.reply_first_heard_at - end) * 1000
        turn.reply_frames = len(window)
        turn.reply_audio_ms = sum(f.nbytes for f in window) / audio.TWILIO_RATE * 1000
        if len(window) > 1:
            turn.reply_max_gap_ms = float(np.diff([f.t for f in window]).max() * 1000)
        if turn.reply_first_heard_at is not None:
            turn.reply_underruns = _underruns(r.starved, turn.reply_first_heard_at, window[-1].t)
        clears = [c for c in r.clears if turn.started_at <= c < bounds[i + 1]]
        turn.clears = len(clears)
        if turn.speech_start is not None:
            after = [c for c in clears if c >= turn.speech_start]
            if after:
                turn.clear_after_speech_ms = (after[0] - turn.speech_start) * 1000
            if turn.barge_in:
                turn.silent_after_speech_ms = _quiet_after(loud, turn.speech_start)
        turn.marks_echoed = sum(turn.started_at <= m.t < bounds[i + 1] for m in r.marks_echoed)


def _underruns(starved: np.ndarray, first_heard: float, last_arrival: float) -> int:
    """Runs of UNDERRUN_TICKS or more ticks with Twilio's buffer dry between a reply's first heard tick and the
    arrival of its last frame: silence the caller hears that the agent did not send. Unlike gaps between
    arrivals, this does not depend on how much audio each message carries (our edge sends 20 ms a message,
    some agents larger ones, ahead of time)."""
    span = starved[int(round(first_heard / FRAME_S)):int(np.ceil(last_arrival / FRAME_S))].astype(np.int8)
    edges = np.diff(np.concatenate(([0], span, [0])))
    lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return int((lengths >= UNDERRUN_TICKS).sum())


async def fetch_twiml(session: aiohttp.ClientSession, twiml_url: str, auth_token: str | None,
                      form: dict[str, str]) -> tuple[str, dict[str, str]]:
    """POST Twilio's voice webhook (signed like Twilio) -> the <Connect><Stream> url and its <Parameter>s."""
    headers = {SIGNATURE_HEADER: sign(auth_token, twiml_url, form)} if auth_token else {}
    async with session.post(twiml_url, data=form, headers=headers) as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"webhook {twiml_url} answered {response.status}: {body[:200]}")
    stream = ET.fromstring(body).find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise RuntimeError(f"webhook {twiml_url} returned no <Connect><Stream url>: {body[:200]}")
    params = {p.get("name"): p.get("value", "") for p in stream.findall("Parameter") if p.get("name")}
    return stream.get("url"), params


async def run_call(url: str | None, turns: Sequence[TurnLike], *, auth_token: str | None = None,
                   twiml_url: str | None = None, signed_url: str | None = None,
                   params: dict[str, str] | None = None, wait_for_greeting: bool = True,
                   wait_for_reply: bool = True, pause_ms: float = 800, barge_in_ms: float | None = None,
                   reply_timeout_s: float = 20.0, tail_ms: float = 300, timeout_s: float = 600.0,
                   line_noise_dbfs: float | None = None, speech_only: bool = False,
                   echo_marks: bool = True, call_sid: str | None = None, stream_sid: str | None = None,
                   from_number: str = "+15005550006", to_number: str = "+15005550001",
                   session: aiohttp.ClientSession | None = None) -> CallReport:
    """Place one simulated call and return what happened on it.

    `url` is the WebSocket to connect to; with `twiml_url`, the webhook is
    fetched first (signed) and its <Stream url> is used unless `url` overrides
    where to connect. The upgrade is signed over `signed_url`, else the
    <Stream url>, else `url`. `turns` are 8 kHz int16 arrays, WAV paths or
    `CallerTurn`s. Waiting: with `wait_for_reply` each turn starts once the
    agent's reply has been heard and then `pause_ms` of quiet passed (or
    `reply_timeout_s` went by without a reply); otherwise `pause_ms` after the
    previous turn ended. `barge_in_ms` starts turns (after the first) that long
    after the reply is first heard. The call hangs up after the last reply
    (plus `tail_ms`). `line_noise_dbfs` puts that much background noise on
    the caller's line (`LineNoise`); None: digital silence between words.
    `speech_only`: between its turns the caller sends nothing, not silence (Twilio never stops sending; a test
    caller that streams only its recordings does). `echo_marks=False`: a test caller that never echoes the
    edge's marks (Twilio always does). `call_sid` and `stream_sid` replace the fresh random ones
    (Twilio never reuses them; a test caller may).
    """
    caller_turns = [_caller_turn(t, i) for i, t in enumerate(turns)]
    account_sid, call_sid, stream_sid = _sid("AC"), call_sid or _sid("CA"), stream_sid or _sid("MZ")
    own_session = session is None
    session = session or aiohttp.ClientSession()
    try:
        custom = dict(params or {})
        stream_url = None
        if twiml_url:
            form = {"AccountSid": account_sid, "CallSid": call_sid, "From": from_number, "To": to_number,
                    "Caller": from_number, "Called": to_number, "CallStatus": "ringing", "Direction": "inbound",
                    "ApiVersion": "2010-04-01"}
            stream_url, twiml_params = await fetch_twiml(session, twiml_url, auth_token, form)
            custom = {**twiml_params, **custom}
        connect_url = url or stream_url
        if not connect_url:
            raise ValueError("run_call needs url or twiml_url")
        headers = {SIGNATURE_HEADER: sign_websocket(auth_token, signed_url or stream_url or connect_url)} \
            if auth_token else {}
        report = CallReport(connect_url, stream_sid, call_sid, account_sid, custom)
        async with session.ws_connect(connect_url, headers=headers, autoping=True, heartbeat=None) as ws:
            call = _Call(ws, report, caller_turns, wait_for_greeting=wait_for_greeting,
                         wait_for_reply=wait_for_reply, pause_ms=pause_ms, barge_in_ms=barge_in_ms,
                         reply_timeout_s=reply_timeout_s, tail_ms=tail_ms,
                         line_noise=None if line_noise_dbfs is None
                         else LineNoise(line_noise_dbfs, seed=int(call_sid[2:], 16)), speech_only=speech_only,
                         echo_marks=echo_marks)
            try:
                await asyncio.wait_for(call.run(), timeout_s)
            except asyncio.TimeoutError:
                report.errors.append(f"call did not finish within {timeout_s} s")
        return report
    finally:
        if own_session:
            await session.close()


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants key=value, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="WebSocket URL of the edge's /media (default ws://127.0.0.1:$EDGE_PORT/media)")
    ap.add_argument("--twiml-url", help="fetch the TwiML from this webhook first, like Twilio does")
    ap.add_argument("--signed-url", help="URL the upgrade is signed over (default: the <Stream url>, else --url)")
    ap.add_argument("--wav", action="append", default=[], help="a caller turn (16-bit mono WAV); repeat for more")
    ap.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN") or None,
                    help="sign requests like Twilio (default $TWILIO_AUTH_TOKEN; unset: unsigned)")
    ap.add_argument("--param", action="append", default=[], type=_parse_param, help="customParameters key=value")
    ap.add_argument("--pause-ms", type=float, default=800, help="quiet after the reply before the next turn")
    ap.add_argument("--fixed-gaps", action="store_true", help="do not wait for replies: pause-ms between turns")
    ap.add_argument("--barge-in-ms", type=float, help="interrupt each reply this long after it is first heard")
    ap.add_argument("--no-greeting", action="store_true", help="speak first instead of waiting for a greeting")
    ap.add_argument("--reply-timeout", type=float, default=20.0, help="seconds to wait for a reply")
    ap.add_argument("--tail-ms", type=float, default=300, help="quiet after the last reply before hanging up")
    ap.add_argument("--line-noise-dbfs", type=float, help="background noise on the caller's line (e.g. -50)")
    ap.add_argument("--speech-only", action="store_true",
                    help="send nothing between turns (a test caller), not Twilio's continuous frames")
    ap.add_argument("--no-mark-echo", action="store_true", help="never echo marks (a test caller), unlike Twilio")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up on a call after this many seconds")
    ap.add_argument("--calls", type=int, default=1, help="concurrent calls")
    ap.add_argument("--out", help="write the agent's audio as heard to this WAV (call N>1: suffix _N)")
    ap.add_argument("--conversation", help="write caller (left) and agent (right) to this stereo WAV")
    args = ap.parse_args(argv)
    if not args.wav:
        ap.error("give at least one --wav")
    url = args.url or (None if args.twiml_url else f"ws://127.0.0.1:{os.environ.get('EDGE_PORT', '8080')}/media")

    async def one(i: int) -> CallReport:
        return await run_call(url, args.wav, auth_token=args.auth_token, twiml_url=args.twiml_url,
                              signed_url=args.signed_url, params=dict(args.param),
                              wait_for_greeting=not args.no_greeting, wait_for_reply=not args.fixed_gaps,
                              pause_ms=args.pause_ms, barge_in_ms=args.barge_in_ms,
                              reply_timeout_s=args.reply_timeout, tail_ms=args.tail_ms, timeout_s=args.timeout,
                              line_noise_dbfs=args.line_noise_dbfs, speech_only=args.speech_only,
                              echo_marks=not args.no_mark_echo)

    async def calls() -> list[CallReport]:
        return await asyncio.gather(*(one(i) for i in range(args.calls)))

    try:
        reports = asyncio.run(calls())
    except (aiohttp.ClientError, RuntimeError, OSError) as e:
        print(f"call failed: {e}", file=sys.stderr)
        return 2
    for i, report in enumerate(reports):
        suffix = f"_{i}" if len(reports) > 1 else ""
        if args.out:
            report.write_wav(_suffixed(args.out, suffix))
        if args.conversation:
            report.write_conversation_wav(_suffixed(args.conversation, suffix))
    summaries = [r.summary() for r in reports]
    json.dump(summaries[0] if len(summaries) == 1 else summaries, sys.stdout, indent=2)
    print()
    return 1 if any(r.errors for r in reports) else 0


def _suffixed(path: str, suffix: str) -> Path:
    p = Path(path)
    return p.with_name(p.stem + suffix + p.suffix)


if __name__ == "__main__":
    sys.exit(main())
