"""Tools for barge-in tests and benchmarks: the sounds a caller makes over the agent, a simulated caller
that hangs up once the last reply has started, a watch on the edge's `Call`, and a watch on Triton's
cancellation metrics.

Shared by tests/test_barge_in.py and perf/bargein.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from edge import audio, simulate
from edge.simulate import CallReport
from edge.triton import Triton
from tests.conftest import EdgeServer, edge_settings
from tests.metrics import scrape
from tests.speech import recording

#: a system prompt that makes even the CPU profile's small llm talk on and on, so a reply is still being
#: generated and synthesized when the caller interrupts it
LONG_REPLIES_PROMPT = ("You are a storyteller on the phone. Whatever the caller says, reply with a long story "
                       "about a lighthouse keeper, at least twenty sentences long.")



async def storyteller_edge(triton, **settings) -> EdgeServer:
    """An edge whose llm tells long stories (temperature 0): a reply is still being written and spoken when the
    caller talks over it or hangs up."""
    server = await EdgeServer(edge_settings(triton, llm_temperature=0.0, system_prompt=LONG_REPLIES_PROMPT,
                                            **settings)).start()
    await server.phrases_ready()
    return server

#: recordings that interrupt (Asterisk prompts: short, clear, each a different sentence)
INTERRUPTIONS = ("please-try-call-later", "pls-hold-while-try", "privacy-incorrect", "tt-monkeysintro",
                 "vm-nobodyavail", "tt-weasels", "vm-sorry", "demo-nomatch")


# ------------------------------------------------------------------ sounds (8 kHz int16)

def caller(name: str) -> np.ndarray:
    """A shared recording as the caller's 8 kHz audio."""
    samples, rate = recording(name).samples()
    return audio.resample(samples, rate, audio.TWILIO_RATE)


def speech_level(samples: np.ndarray) -> float:
    """RMS of the active part of speech: 20 ms frames within 30 dB of the loudest frame."""
    frames = samples[:len(samples) // 160 * 160].astype(np.float64).reshape(-1, 160)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    active = rms[rms > rms.max() / 31.6]
    return float(np.sqrt((active ** 2).mean()))


def white_noise(ms: float, level: float, seed: int = 0) -> np.ndarray:
    """A burst of white noise with `level` RMS, 5 ms fades at both ends (no clicks)."""
    n = int(ms * audio.TWILIO_RATE / 1000)
    noise = np.random.default_rng(seed).normal(0.0, level, n)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * audio.TWILIO_RATE))
    return np.clip(noise * fade, -32768, 32767).astype(np.int16)


async def synthesize(triton_url: str, text: str) -> np.ndarray:
    """`text` said by the project's own tts model (through Triton), as 8 kHz caller audio."""
    client = Triton(triton_url)
    try:
        pieces, rate = [], audio.TWILIO_RATE
        async for samples, rate in client.tts(text):
            pieces.append(samples)
    finally:
        await client.close()
    return audio.resample(np.concatenate(pieces), rate, audio.TWILIO_RATE)


def with_silence(*parts: np.ndarray | float) -> np.ndarray:
    """Concatenate sounds; a number is that many ms of silence."""
    return np.concatenate([np.zeros(int(p * audio.TWILIO_RATE / 1000), np.int16) if isinstance(p, (int, float))
                           else p.astype(np.int16) for p in parts])


# ------------------------------------------------------------------ the simulated caller

class _HangsUpEarly(simulate._Call):
    """The simulator's caller, but after its last turn it hangs up `hangup_s` after the reply is first heard
    (not once the reply ends: with long replies that would take minutes)."""

    hangup_s: float | None = None

    def ready(self, t: float) -> bool:
        if self.hangup_s is not None and self.turn_index == len(self.turns) and self.reply_heard_at is not None:
            return t >= self.reply_heard_at + self.hangup_s
        return super().ready(t)


async def run_call(url: str, turns, *, hangup_after_reply_ms: float | None = None, **kwargs) -> CallReport:
    """`edge.simulate.run_call`; with `hangup_after_reply_ms`, the caller hangs up that long after the last
    reply is first heard."""
    if hangup_after_reply_ms is None:
        return await simulate.run_call(url, turns, **kwargs)
    caller_class = type("_HangsUp", (_HangsUpEarly,), {"hangup_s": hangup_after_reply_ms / 1000})
    original = simulate._Call
    simulate._Call = caller_class
    try:
        return await simulate.run_call(url, turns, **kwargs)
    finally:
        simulate._Call = original


def clear_unix(report: CallReport, t: float) -> float:
    """A simulator time (seconds since `start`) as Unix time."""
    return report.started_unix + t


def frames_between(report: CallReport, start: float, end: float, audible: bool = False) -> int:
    return sum(start < f.t <= end and (f.audible or not audible) for f in report.frames)


# ------------------------------------------------------------------ watching the edge

@dataclass
class CallWatch:
    """Holds on to the edge's `Call` of the one call in progress, and every reply (`Turn`) it makes, so a test
    can read the chunks (mark name, text) each reply played and the history the call kept."""

    calls: set
    call: object | None = None
    turns: list = field(default_factory=list)
    _task: asyncio.Task | None = None
    _before: set = field(default_factory=set)

    def start(self) -> "CallWatch":
        self._before = set(self.calls)  # a call still ending from before is not ours
        self._task = asyncio.create_task(self._watch())
        return self

    async def _watch(self) -> None:
        while True:
            if self.call is None:
                self.call = next(iter(self.calls - self._before), None)
            if self.call is not None:
                for turn in (self.call.turn, self.call.speculation):
                    if turn is not None and all(turn is not t for t in self.turns):
                        self.turns.append(turn)
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def interrupted(self) -> list:
        return [t for t in self.turns if t.interrupted]


@dataclass
class Sample:
    sent: float  # Unix time the scrape was asked for: the values are from after it...
    at: float  # ...and from before this, when it was answered
    cancelled: dict[str, float]
    active: dict[str, float]
    last_stop: dict[str, float]


class CancelWatch:
    """Scrapes Triton's /metrics every `interval` s while a call runs, so each cancellation's engine stop time
    (`voice_last_cancel_stop_seconds`, overwritten by the next one) is seen before it is overwritten."""

    MODELS = ("llm", "tts")

    def __init__(self, metrics_url: str, interval: float = 0.04):
        self.url, self.interval = metrics_url, interval
        self.samples: list[Sample] = []
        self._task: asyncio.Task | None = None

    async def scrape(self) -> Sample:
        sent = time.time()
        m = await asyncio.to_thread(scrape, self.url)
        sample = Sample(sent, time.time(), *({k: m.value(name, model=k) for k in self.MODELS} for name in
                                       ("voice_requests_cancelled_total", "voice_requests_active",
                                        "voice_last_cancel_stop_seconds")))
        self.samples.append(sample)
        return sample

    def start(self) -> "CancelWatch":
        self._task = asyncio.create_task(self._watch())
        return self

    async def start_now(self) -> "CancelWatch":
        """Start, with a first scrape taken before returning (the baseline of what follows)."""
        await self.scrape()
        return self.start()

    async def _watch(self) -> None:
        while True:
            await self.scrape()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.scrape()

    def _before(self, unix_t: float) -> Sample:
        before = [s for s in self.samples if s.at <= unix_t]
        return before[-1] if before else self.samples[0]

    def in_flight_at(self, model: str, unix_t: float) -> bool:
        """Whether `model` was working on a request at `unix_t`: at the last scrape before it, and still at the
        first scrape after it or cancelled since. tts requests are short (one clause, synthesized just in time),
        so the one seen at the last scrape can end by itself before `unix_t`: that one had nothing to cancel."""
        after = next((s for s in self.samples if s.sent > unix_t), None)
        return self._before(unix_t).active[model] > 0 and (
            (after is not None and after.active[model] > 0) or self.cancelled_since(model, unix_t) > 0)

    def cancelled_since(self, model: str, unix_t: float) -> float:
        """Requests of `model` cancelled from `unix_t` to the last scrape."""
        return self.samples[-1].cancelled[model] - self._before(unix_t).cancelled[model]

    def stop_after(self, model: str, unix_t: float, within: float = 5.0) -> float | None:
        """Unix time at which `model`'s engine stopped the first request cancelled after `unix_t` (the first new
        value of its last-stop gauge scraped after `unix_t`), None if none was cancelled within `within` s. A
        scrape can read the counter after a cancel and the gauge before it (the backend sets them one after the
        other): such a sample still holds the previous stop and is passed over."""
        base = self._before(unix_t)
        for s in self.samples:
            if (unix_t < s.sent <= unix_t + within and s.cancelled[model] > base.cancelled[model]
                    and s.last_stop[model] != base.last_stop[model]):
                return s.last_stop[model]
        return None
