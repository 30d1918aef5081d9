"""Many simulated Twilio calls on one 20 ms clock: a lean twin of edge/simulate.py for load tests.

edge/simulate.py gives every call its own 20 ms timer task and validates every
message it receives; that costs about 0.05 of a core per call, so on a small
machine the simulator, not the edge, would run out of CPU first. This module
plays the same side of the same protocol (connected, start, a `media` frame of
caller audio every 20 ms on an absolute clock, a playback buffer drained at
8000 samples/s, each `mark` echoed once the audio before it has played,
`clear` dropping the buffer and echoing its marks, `stop`) and follows the
same turn rules (a turn starts once the reply has been heard and then
`pause_ms` of quiet, or `barge_in_ms` after the reply is first heard, or
`reply_timeout_s` without a reply), but:

* one clock task ticks every call, so one timer wakes per 20 ms, not one per call;
* caller frames are base64-encoded once per recording, before the clock starts,
  and each message is a string template;
* received messages are read with json.loads only (no validation); a frame is
  audible when its mu-law bytes are not all zero-level codes;
* with line noise (`LineNoise`), every call's pauses are the same noise frames.

It fills the same `edge.simulate.CallReport` (frames with arrival times,
turns with voice_to_voice_ms, clear_after_speech_ms...) through
edge.simulate's own `_finish_turns`, so the two are measured alike.
Used by perf/edge_only.py; `--simulator full` there uses edge/simulate.py instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass

import aiohttp
import numpy as np

from edge import audio, protocol
from edge.simulate import (SILENCE, CallerTurn, CallReport, Frame, LineNoise, MarkEcho, TurnReport,
                           _caller_frame_sent, _finish_turns, _frames)

FRAME = audio.FRAME_BYTES
FRAME_S = audio.FRAME_MS / 1000
_MEDIA = ('{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d","timestamp":"%d",'
          '"payload":"%s"},"streamSid":"%s"}')
_MARK = '{"event":"mark","sequenceNumber":"%d","streamSid":"%s","mark":{"name":%s}}'
_QUIET = bytes([0xFF, 0x7F, 0xFE, 0x7E])  # mu-law codes of 0 and +-1 step: line silence


@dataclass
class Prepared:
    """A caller turn as ready-to-send base64 frames and which of them carry sound."""
    payloads: list[str]
    sounding: list[bool]


def prepare(samples: np.ndarray, line_noise: LineNoise | None = None) -> Prepared:
    """What is speech is told from the clean recording; the frames sent carry the line's noise, if any."""
    frames, sounding = _frames(samples)
    if line_noise:
        frames = _frames(line_noise.under(samples))[0]
    return Prepared([base64.b64encode(f).decode("ascii") for f in frames], sounding)


_SILENCE_B64 = base64.b64encode(SILENCE).decode("ascii")


class _Call:
    def __init__(self, swarm: "Swarm", ws, report: CallReport, turns: list[CallerTurn], prepared: list[Prepared],
                 pause_ms: float, reply_timeout_s: float, tail_ms: float, deadline: float):
        self.swarm, self.ws, self.report, self.turns, self.prepared = swarm, ws, report, turns, prepared
        self.pause_ms, self.reply_timeout_s, self.tail_ms, self.deadline = pause_ms, reply_timeout_s, tail_ms, deadline
        self.t0 = 0.0
        self.join_tick = 0
        self.seq = 0
        self.chunk = 0
        self.sid = report.stream_sid
        # Twilio's playback buffer: frames (bytes left, audible) in arrival order, marks at byte positions
        self.buffer: deque[list] = deque()
        self.buffered = 0
        self.queued = self.consumed = 0
        self.marks: deque[tuple[int, str]] = deque()
        # the caller's side (as edge/simulate.py)
        self.turn_index, self.frame_index = 0, -1
        self.current: Prepared | None = None
        self.wait_ref, self.prev_end = 0.0, 0.0
        self.last_audible_heard: float | None = None
        self.reply_heard_at: float | None = None
        self.done = False
        self.receiver: asyncio.Task | None = None
        self.finished: asyncio.Future | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, text: str) -> None:
        """Queue a message; the clock writes every queued message after each tick."""
        if not self.ws.closed:
            self.swarm.outbox.append((self, text))

    # -- receiving ---------------------------------------------------------------
    async def receive(self) -> None:
        r, loop = self.report, asyncio.get_running_loop()
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            t = loop.time() - self.t0
            try:
                m = json.loads(msg.data)
                event = m["event"]
                if event == "media":
                    payload = binascii.a2b_base64(m["media"]["payload"])
                    audible = bool(payload.translate(None, _QUIET))
                    self.buffer.append([len(payload), audible])
                    self.buffered += len(payload)
                    self.queued += len(payload)
                    r.frames.append(Frame(t, len(payload), audible, self.buffered / audio.TWILIO_RATE * 1000))
                elif event == "mark":
                    name = m["mark"]["name"]
                    r.marks_received.append((t, name))
                    if self.queued <= self.consumed and not self.marks:
                        self.echo(name, True, t)
                    else:
                        self.marks.append((self.queued, name))
                elif event == "clear":
                    r.clears.append(t)
                    self.buffer.clear()
                    self.buffered, self.consumed = 0, self.queued
                    while self.marks:
                        self.echo(self.marks.popleft()[1], False, t)
                else:
                    r.errors.append(f"unexpected event {event!r}")
            except (ValueError, KeyError, TypeError, binascii.Error) as e:
                r.errors.append(f"bad message from the edge: {e!r}"[:200])
        if not self.done:
            r.closed_by = "edge"

    def echo(self, name: str, played: bool, t: float) -> None:
        self.report.marks_echoed.append(MarkEcho(t, name, played))
        self.send(_MARK % (self.next_seq(), self.sid, json.dumps(name)))

    # -- one tick --------------------------------------------------------------------
    def step(self, tick: int, now: float) -> bool:
        """Send this tick's caller frame and play one frame of the agent; False once the call is over."""
        if self.ws.closed or now > self.deadline:
            if now > self.deadline:
                self.report.errors.append("call did not finish in time")
            return False
        t = (tick - self.join_tick) * FRAME_S
        if not self.speak(t):
            return False
        self.play(t)
        return True

    def play(self, t: float) -> None:
        need, audible = FRAME, False
        while need and self.buffer:
            head = self.buffer[0]
            take = min(need, head[0])
            head[0] -= take
            need -= take
            audible = audible or head[1]
            if head[0] == 0:
                self.buffer.popleft()
        played = FRAME - need
        self.buffered -= played
        self.consumed += played
        if played and audible:
            self.last_audible_heard = t + FRAME_S
            if self.reply_heard_at is None and t >= self.wait_ref:
                self.reply_heard_at = t
                if self.report.turns:
                    self.report.turns[-1].reply_first_heard_at = t
        while self.marks and self.marks[0][0] <= self.consumed:
            self.echo(self.marks.popleft()[1], True, t)

    def speak(self, t: float) -> bool:
        r = self.report
        if self.frame_index < 0 and self.ready(t):
            if self.turn_index == len(self.turns):
                return False
            turn = self.turns[self.turn_index]
            self.current = self.prepared[self.turn_index]
            audible_now = self.last_audible_heard is not None and t - self.last_audible_heard < 0.08
            r.turns.append(TurnReport(self.turn_index, turn.name, t, barge_in=audible_now))
            self.wait_ref, self.reply_heard_at = float("inf"), None
            self.frame_index = 0
        if self.frame_index >= 0:
            k, cur = self.frame_index, self.current
            payload = cur.payloads[k]
            _caller_frame_sent(self, r.turns[-1], cur.sounding[k], len(cur.payloads), t)
        else:
            pauses = self.swarm.pauses
            payload = pauses[self.chunk % len(pauses)]
        self.chunk += 1
        self.send(_MEDIA % (self.next_seq(), self.chunk, round(t * 1000), payload, self.sid))
        return True

    def ready(self, t: float) -> bool:
        last = self.turn_index == len(self.turns)
        turn = None if last else self.turns[self.turn_index]
        pause = (turn.pause_ms if turn and turn.pause_ms is not None else self.pause_ms) / 1000
        if last:
            pause = max(pause, self.tail_ms / 1000)
        first = self.turn_index == 0
        barge_in = None if last else turn.barge_in_ms
        if self.reply_heard_at is None:
            return t >= self.wait_ref + self.reply_timeout_s
        if barge_in is not None and not first:
            return t >= self.reply_heard_at + barge_in / 1000
        quiet = t - (self.last_audible_heard or 0.0)
        return self.buffered == 0 and quiet >= pause


class Swarm:
    """The shared clock and the calls on it."""

    def __init__(self, session: aiohttp.ClientSession, line_noise: LineNoise | None = None):
        self.session = session
        # what a caller's line carries between turns: digital silence or the line's noise
        self.pauses = [base64.b64encode(f).decode("ascii") for f in line_noise.frames] if line_noise \
            else [_SILENCE_B64]
        self.calls: list[_Call] = []
        self.outbox: list[tuple[_Call, str]] = []
        self.tick = 0
        self.t0 = 0.0
        self.tick_lag: list[tuple[float, float]] = []  # (loop time, ms late) of each tick
        self._clock: asyncio.Task | None = None
        self._ending: set[asyncio.Task] = set()

    async def call(self, url: str, turns: list[CallerTurn], prepared: list[Prepared], *, pause_ms: float = 800,
                   reply_timeout_s: float = 20.0, tail_ms: float = 300, timeout_s: float = 600.0,
                   params: dict[str, str] | None = None) -> CallReport:
        """Place one call on the clock; returns its report once it has hung up."""
        account_sid, call_sid, stream_sid = ("AC" + secrets.token_hex(16), "CA" + secrets.token_hex(16),
                                             "MZ" + secrets.token_hex(16))
        report = CallReport(url, stream_sid, call_sid, account_sid, dict(params or {}))
        loop = asyncio.get_running_loop()
        ws = await self.session.ws_connect(url, autoping=True, heartbeat=None)
        call = _Call(self, ws, report, turns, prepared, pause_ms, reply_timeout_s, tail_ms, loop.time() + timeout_s)
        call.finished = loop.create_future()
        await ws.send_str(protocol.connected_message())
        await ws.send_str(protocol.start_message(call.next_seq(), account_sid, stream_sid, call_sid,
                                                 report.custom_parameters))
        # on the clock from its next tick (no await from here on: the clock cannot tick in between)
        if self._clock is None or self._clock.done():
            self.t0, self.tick = loop.time(), 0
            self._clock = loop.create_task(self._run())
        call.join_tick = self.tick
        call.t0 = self.t0 + self.tick * FRAME_S
        report.started_unix = time.time() - (loop.time() - call.t0)
        call.receiver = loop.create_task(call.receive())
        self.calls.append(call)
        return await call.finished

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.calls:
            target = self.t0 + self.tick * FRAME_S
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            self.tick_lag.append((now, max(now - target, 0.0) * 1000))
            ended = [c for c in self.calls if not c.step(self.tick, now)]
            await self._flush()
            for call in ended:
                self.calls.remove(call)
                task = loop.create_task(self._end(call))
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)
            self.tick += 1

    async def _flush(self) -> None:
        """Write the queued messages, socket by socket (a write only waits when a socket's buffer is full)."""
        while self.outbox:
            outbox, self.outbox = self.outbox, []
            for call, text in outbox:
                if call.ws.closed:
                    continue
                try:
                    await call.ws.send_str(text)
                except (ConnectionError, RuntimeError) as e:
                    call.report.errors.append(f"send failed: {e!r}"[:200])

    def lag_since(self, since: float) -> list[float]:
        return [lag for t, lag in self.tick_lag if t >= since]

    async def _end(self, call: _Call) -> None:
        r = call.report
        call.done = True
        loop = asyncio.get_running_loop()
        try:
            if not call.ws.closed:
                await call.ws.send_str(protocol.stop_message(call.next_seq(), r.stream_sid, r.account_sid,
                                                             r.call_sid))
            await call.ws.close()
        except (ConnectionError, RuntimeError):
            pass
        call.receiver.cancel()
        await asyncio.gather(call.receiver, return_exceptions=True)
        r.duration = loop.time() - call.t0
        r.max_tick_lag_ms = max((lag for t, lag in self.tick_lag if t >= call.t0), default=0.0)
        _finish_turns(r)
        if not call.finished.done():
            call.finished.set_result(r)
