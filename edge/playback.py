"""What the caller hears: outbound audio paced in 20 ms frames, with a mark after each chunk.

Frames leave on an absolute clock (frame n at start + n * 20 ms, minus a small
lead), so there is no drift and Twilio never holds more than the lead: a
`clear` then has little to throw away. Each chunk (the audio of one clause)
is followed by a `mark` whose name we remember with the chunk's text; when
Twilio echoes the mark, the chunk was played. Marks echoed after a `clear`
were not played. That is how `heard()` knows exactly what the caller heard.

Every call's pacer (and every call's watch) waits on one `FrameClock` per
process: its 20 ms ticks wake them all in the same turn of the event loop,
where a timer per call woke the loop once per call and frame (each wake-up is
a system call and a turn of the loop: perf/README.md "Edge alone").
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from edge.audio import FRAME_BYTES, FRAME_MS, MULAW_SILENCE

#: how long after its mark was sent a chunk whose echo has not come is still taken as playing: long once
#: the peer has echoed a mark (Twilio does; a missing echo is a late one), short before (a test caller
#: that never echoes must not leave the agent "speaking", and talking over nothing, for seconds)
MARK_GRACE_S = 2.0
FIRST_ECHO_GRACE_S = 0.5
#: uvloop's timers count whole milliseconds: a shorter wait wakes at once, and a loop waiting for a moment would
#: spin (8 wake-ups a frame instead of 1, measured). A frame due this soon goes now; a sleep gets it added.
TIMER_SLACK_S = 0.001


class FrameClock:
    """Ticks every 20 ms, on a grid of the monotonic clock, while anything waits for a tick. One for the whole
    process: the waits of every call end in the same turn of the loop."""

    def __init__(self, period_s: float = FRAME_MS / 1000):
        self.period = period_s
        self._waiting: dict[int, list[asyncio.Future]] = {}  # tick number -> its waiters
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick = 0

    def align(self, t: float) -> float:
        """The tick nearest the monotonic time `t`."""
        return round(t / self.period) * self.period

    async def sleep(self, seconds: float) -> None:
        """Until the first tick at least `seconds` from now."""
        await self.until(time.monotonic() + seconds)

    async def until(self, t: float) -> None:
        """Until the first tick at or after the monotonic time `t` (a tick's own time counts as that tick)."""
        loop = asyncio.get_running_loop()
        tick = math.ceil(t / self.period - 1e-3)
        waiter = loop.create_future()  # one each: a waiter cancelled cancels only its own future
        self._waiting.setdefault(tick, []).append(waiter)
        if self._timer is None or tick < self._timer_tick:
            self._schedule(loop)
        await waiter

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_tick = min(self._waiting)
        # ticks are on time.monotonic(), which no event loop promises its own clock to be
        self._timer = loop.call_later(self._timer_tick * self.period - time.monotonic(), self._tick)

    def _tick(self) -> None:
        self._timer = None
        for tick in [tick for tick in self._waiting if tick <= self._timer_tick]:
            for waiter in self._waiting.pop(tick):
                if not waiter.done():
                    waiter.set_result(None)
        if self._waiting:
            self._schedule(asyncio.get_running_loop())


@dataclass
class Chunk:
    """The audio of one clause, as mu-law frames, and what it says."""

    text: str
    frames: list[bytes] = field(default_factory=list)
    mark: str = ""
    complete: bool = False  # all its audio is queued; the mark follows its last frame
    first_sent: float | None = None  # monotonic time its first frame left
    mark_sent: float | None = None
    played: bool = False
    _tail: bytes = b""  # mu-law bytes short of a whole frame, waiting for more

    @property
    def seconds(self) -> float:
        return len(self.frames) * FRAME_MS / 1000


@dataclass
class Heard:
    """What the caller heard of the chunks queued so far: whole chunks and the start of the one cut."""

    text: str
    cut: Chunk | None = None
    unplayed: list[Chunk] = field(default_factory=list)


def frames_of(mulaw: bytes) -> list[bytes]:
    """Split mu-law audio into 160-byte frames; the last is padded with silence."""
    frames = [mulaw[i:i + FRAME_BYTES] for i in range(0, len(mulaw), FRAME_BYTES)]
    if frames and len(frames[-1]) < FRAME_BYTES:
        frames[-1] = frames[-1] + bytes([MULAW_SILENCE]) * (FRAME_BYTES - len(frames[-1]))
    return frames


class Playback:
    """The outbound queue of one call and its pacer task."""

    def __init__(self, send_media: Callable[[bytes], Awaitable[None]], send_mark: Callable[[str], Awaitable[None]],
                 clock: FrameClock, lead_ms: float = 80.0, on_frame: Callable[[float], None] | None = None):
        self._send_media, self._send_mark = send_media, send_mark
        self.clock = clock
        self.lead = lead_ms / 1000
        self._on_frame = on_frame
        self._chunks: list[Chunk] = []  # queued or playing, in order; played ones drop off the front
        self._next = 0  # index in _chunks of the chunk being sent
        self._frame = 0  # next frame inside that chunk
        self._run_start: float | None = None  # monotonic time frame 0 of the current run is due
        self._sent_in_run = 0
        self._wake = asyncio.Event()
        self._epoch = 0  # bumped by clear(), so a send in flight does not move the emptied queue
        self._names = itertools.count(1)
        self._recent: collections.deque[Chunk] = collections.deque(maxlen=3)  # last chunks played
        self.last_echo: float | None = None  # when Twilio last proved playback progress
        self.held = False  # paused: nothing is sent until release() (the caller may be interrupting)
        self.idle = asyncio.Event()
        self.idle.set()

    # -- queueing ------------------------------------------------------------------
    def start(self, text: str) -> Chunk:
        """Open a chunk for a clause whose audio is still being synthesized."""
        chunk = Chunk(text, mark=f"m{next(self._names)}")
        self._chunks.append(chunk)
        self.idle.clear()
        return chunk

    def extend(self, chunk: Chunk, mulaw: bytes) -> None:
        data = chunk._tail + mulaw
        whole = len(data) - len(data) % FRAME_BYTES
        chunk.frames.extend(data[i:i + FRAME_BYTES] for i in range(0, whole, FRAME_BYTES))
        chunk._tail = data[whole:]
        self._wake.set()

    def finish(self, chunk: Chunk) -> None:
        """No more audio for this chunk: pad its last frame and let its mark follow."""
        if chunk._tail:
            chunk.frames.extend(frames_of(chunk._tail))
            chunk._tail = b""
        chunk.complete = True
        self._wake.set()

    def enqueue(self, text: str, mulaw: bytes) -> Chunk:
        """A chunk whose audio is all here (cached phrases)."""
        chunk = self.start(text)
        self.extend(chunk, mulaw)
        self.finish(chunk)
        return chunk

    def queued_seconds(self) -> float:
        """Audio queued and not sent yet: how far synthesis is ahead of the caller's ear."""
        frames = sum(len(c.frames) for c in self._chunks[self._next:]) - self._frame
        return max(frames, 0) * FRAME_MS / 1000

    async def below(self, seconds: float) -> None:
        """Wait until less than `seconds` of audio is queued (it leaves in real time)."""
        while (excess := self.queued_seconds() - seconds) > 0:
            await asyncio.sleep(excess + TIMER_SLACK_S)

    @property
    def speaking(self) -> bool:
        """True while any queued audio has not been proved played."""
        self._expire()
        return bool(self._chunks)

    def _expire(self) -> None:
        """Take as played a chunk whose mark Twilio should long have echoed (a peer that never echoes
        marks must not leave the call 'speaking' forever)."""
        late = time.monotonic() - self.lead - (FIRST_ECHO_GRACE_S if self.last_echo is None else MARK_GRACE_S)
        while self._chunks and self._chunks[0].mark_sent is not None and self._chunks[0].mark_sent < late:
            self._chunks[0].played = True
            self._recent.append(self._chunks.pop(0))
            self._next -= 1

    def recent_text(self) -> list[str]:
        """The texts of the last chunks played and of those queued: what an echo could repeat."""
        return [c.text for c in self._recent] + [c.text for c in self._chunks]

    # -- Twilio's side -------------------------------------------------------------
    def marked(self, name: str) -> None:
        """Twilio echoed a mark: that chunk, and every one before it, was played."""
        for i, chunk in enumerate(self._chunks):
            if chunk.mark == name:
                for done in self._chunks[:i + 1]:
                    done.played = True
                    self._recent.append(done)
                self.last_echo = time.monotonic()
                self._chunks = self._chunks[i + 1:]
                self._next -= i + 1
                break
        self._check_idle()

    def hold(self) -> None:
        """Stop sending (what Twilio already has, at most the lead, still plays); release() goes on from
        the same frame."""
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._run_start = None  # a new run: the frames after the pause are paced from now
            self._wake.set()

    def clear(self) -> Heard:
        """Drop everything queued (the caller sent `clear`) and say what was heard.

        Call this right after sending `clear`: marks Twilio echoes afterwards
        were not played and are ignored, because their chunks are gone.
        """
        heard = self.heard()
        self._epoch += 1
        self._chunks, self._next, self._frame = [], 0, 0
        self._run_start = None
        self.held = False
        self._check_idle()
        return heard

    def heard(self, now: float | None = None) -> Heard:
        """The text the caller heard: chunks are dropped from the front when played; the first one left
        was cut, and of it the share of its playing time elapsed is taken as heard, by words."""
        now = time.monotonic() if now is None else now
        self._expire()
        unplayed = list(self._chunks)
        if not unplayed or unplayed[0].first_sent is None:
            return Heard("", None, unplayed)
        cut = unplayed[0]
        started = max(filter(None, [cut.first_sent + self.lead, self.last_echo]))
        fraction = min(max((now - started) / cut.seconds, 0.0), 1.0) if cut.seconds else 0.0
        if self._next == 0 and cut.frames:  # the cut chunk is still being sent: no more than its sent frames
            fraction = min(fraction, self._frame / len(cut.frames))  # (a hold stops the clock of what is heard)
        words = cut.text.split()
        return Heard(" ".join(words[:int(len(words) * fraction)]), cut, unplayed)

    # -- the pacer -------------------------------------------------------------------
    async def run(self) -> None:
        """Send frames on the absolute clock until cancelled."""
        while True:
            if self._next >= len(self._chunks):
                self._run_start = None
                self._check_idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.held:
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._chunks[self._next]
            if self._frame >= len(chunk.frames):
                if chunk.complete:
                    epoch = self._epoch
                    await self._send_mark(chunk.mark)
                    if epoch != self._epoch:
                        continue
                    chunk.mark_sent = time.monotonic()
                    self._next += 1
                    self._frame = 0
                    continue
                self._run_start = None  # underrun: the clause's audio is late; start a new run when it comes
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            if self._run_start is None:  # a run's frames are due on the process's ticks: the lead is 80 +- 10 ms
                self._run_start, self._sent_in_run = self.clock.align(now), 0
            due = self._run_start + self._sent_in_run * FRAME_MS / 1000 - self.lead
            if due > now + TIMER_SLACK_S:
                await self.clock.until(due)
                continue  # the queue may have been cleared meanwhile
            if self._frame == 0:
                chunk.first_sent = time.monotonic()
            epoch = self._epoch
            await self._send_media(chunk.frames[self._frame])
            if epoch != self._epoch:
                continue
            if self._on_frame:
                self._on_frame(time.monotonic())
            self._sent_in_run += 1
            self._frame += 1

    def _check_idle(self) -> None:
        if not self._chunks:
            self.idle.set()

    async def played(self) -> None:
        """Wait until everything queued was heard (or cleared)."""
        while self.speaking:
            try:
                await asyncio.wait_for(self.idle.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
