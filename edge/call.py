"""One phone call, start to end. Read this class to know what the agent does.

* The call starts (`start` message): the greeting plays from cached audio and
  the caller's audio streams to `asr` for the whole call.
* The caller stops talking (`final` event): a `Turn` streams `llm`, cuts its
  text into clauses and speaks each through `tts` while the next is written;
  the audio goes out paced by `Playback`, a `mark` after each clause.
* The caller talks over the agent (`speech_start` while speaking): noise,
  coughs, backchannels ("uh-huh") and the echo of our own voice are let be
  (past the minimum duration the agent pauses until the words tell);
  real speech is a barge-in: `clear`, cancel the turn's llm and tts
  requests, keep in history only what the echoed marks prove was heard, and
  listen. If the "interruption" brings no words, the agent resumes the cut
  clause.
* Silence: prompt once, then say goodbye and hang up. `stop` or a closed
  socket ends the call and everything it has in flight.
"""

from __future__ import annotations

import asyncio
import bisect
import difflib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from aiohttp import WSCloseCode, web

from edge import audio, protocol, telemetry
from edge.clauses import ClauseChunker, ends_sentence
from edge.playback import FrameClock, Playback
from edge.settings import Settings
from edge.triton import ModelError, Triton

log = logging.getLogger("edge.call")

MAX_BAD_MESSAGES = 20
#: Twilio sends `connected` and `start` as soon as the socket opens: a socket without a `start` by then is not a call
START_TIMEOUT_S = 10.0
SOCKET_ENDED = (web.WSMsgType.CLOSE, web.WSMsgType.CLOSING, web.WSMsgType.CLOSED, web.WSMsgType.ERROR)
OVERLAP_PAUSE_S = 0.3  # a pause this short inside the caller's speech does not end an overlap
ARRIVALS_KEPT = 30_000  # media messages (10 minutes at 20 ms)
#: caller audio goes to asr in ASR_BATCH_MS (while the agent is quiet: ASR_SPEECH_BATCH_MS) this long after a
#: frame with sound: onsets are not held back
SOUND_ATTENTION_S = 0.5
#: quiet this long in the caller's speech may be its end: the asr calls it after its min_silence_ms (96), so from
#: here on the silence goes to it in ASR_BATCH_MS (shorter gaps between words are held with the words)
SPEECH_GAP_MS = 60
#: caller audio goes to asr in ASR_BATCH_MS this long after a speech_stop that does not say when the asr may end
#: the turn (no `endpoint_ms`): the endpoint waits on no batch
ENDPOINT_ATTENTION_S = 2.0
#: no caller audio for this long: what is missing is taken as silence, so the asr still hears their turn end
#: (Twilio sends a frame every 20 ms all call long, but discards audio when the socket lags; a test caller may send
#: nothing between its turns). Longer than a TCP retransmission stall, shorter than the asr's shortest endpoint
#: silence (350 ms)
LINE_STALL_MS = 300
WATCH_S = 0.1  # how often a call looks for a stalled line and an idle caller
SILENT_FRAME = bytes([audio.MULAW_SILENCE]) * audio.FRAME_BYTES
INTERRUPTED = " [interrupted]"
HUM = re.compile(r"[mhn]+(?:-[mhn]+)*")  # closed-mouth noises, as Whisper spells them: "mm", "mhm", "mm-mm"
SURE_WORD_LETTERS = 3  # a partial's last word this long is taken at once; shorter ones wait for the next partial
#: what a dead or failing Triton raises through the gRPC client
TRITON_ERRORS = (ModelError, ConnectionError, OSError, grpc.aio.AioRpcError)


@dataclass
class PartialWords:
    """The words of the caller's turn so far, as the asr's partials give them, less a last word that is a guess."""

    backchannels: set[str]  # phrases; a partial's last word may be one cut short
    last: list[str] = field(default_factory=list)

    def __post_init__(self):
        words = {w for phrase in self.backchannels for w in phrase.split()}
        self._cut_short = {w[:n] for w in words for n in range(1, len(w))} - words

    def settled(self, words: list[str]) -> list[str]:
        """A partial's words without its last one when that is shorter than SURE_WORD_LETTERS or the start of a
        backchannel ("oka"), and the previous partial did not have it there too. The window cuts the last word
        short and Whisper writes a guess: tiny.en writes "in" / "ah" for the first 150-200 ms of "Mm-hmm." /
        "Uh-huh.", and "Okay, o" must not stop the agent (it is paused meanwhile, `_overlap_minimum`)."""
        previous, self.last = self.last, words
        last = len(words) - 1
        guess = words and (len(words[last]) < SURE_WORD_LETTERS or words[last] in self._cut_short)
        if guess and previous[last:last + 1] != words[last:]:
            return words[:last]
        return words


@dataclass
class Overlap:
    """Caller speech heard while the agent was speaking: a possible barge-in."""

    onset: float  # monotonic time the caller's speech began
    words: str = ""
    speaking: bool = True
    timer: asyncio.TimerHandle | None = None


@dataclass
class Turn:
    """One reply of the agent: the task generating and speaking it, and what it has said so far."""

    number: int
    user_text: str
    times: telemetry.TurnTimes
    messages: list[dict] = field(default_factory=list)  # what the llm is asked
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # audible; unset while speculative
    task: asyncio.Task | None = None
    interrupted: bool = False
    clauses: list[str] = field(default_factory=list)  # every clause written for tts, in order
    chunks: list = field(default_factory=list)  # the playback chunks of the clauses tts has started

    def heard_whole(self) -> int:
        """How many of its clauses Twilio proved played (their marks came back)."""
        return sum(1 for c in self.chunks if c.played)


class Call:
    def __init__(self, ws: web.WebSocketResponse, settings: Settings, triton: Triton, phrases: "Phrases",
                 clock: FrameClock):
        self.ws, self.settings, self.triton, self.phrases = ws, settings, triton, phrases
        self.state = "connecting"  # -> active -> stopping -> closed
        self.stream_sid = self.call_sid = self._asr_id = "?"
        self.parameters: dict[str, str] = {}
        self.history: list[dict] = []
        self.playback = Playback(self._send_media, self._send_mark, clock, settings.outbound_lead_ms)
        self.turn: Turn | None = None
        self.turns = 0
        self.overlap: Overlap | None = None
        self.speculation: Turn | None = None  # a reply started at the caller's pause, before the final
        self.resume: tuple[float, list[str]] | None = None  # (deadline, clauses to say again) after a barge-in
        self.barge_ins: list[dict] = []
        self._tasks: set[asyncio.Task] = set()
        self._asr = None
        self._listener: asyncio.Task | None = None
        self._upsampler = audio.Resampler(audio.TWILIO_RATE, audio.ASR_RATE, quality="QQ")  # no added delay
        self._audio_ms: list[float] = []  # caller audio received so far, ms at the end of each media message
        self._arrivals: list[float] = []  # and when each arrived
        self._received_ms = 0.0
        self._line_heard_until: float | None = None  # monotonic time the caller's audio so far reaches
        self._line_stalled = False  # the caller's audio stopped coming: silence stands in for it
        self._asr_base_ms = 0.0  # call audio before the current asr stream began
        self._caller_speaking = False
        self._speech_stop_ms: float | None = None
        self._attentive_until = 0.0  # monotonic time until which caller audio goes to asr in ASR_BATCH_MS
        self._held: list[bytes] = []  # caller audio not yet sent to asr
        self._held_ms = 0.0
        self._sound = audio.SoundGate()
        self._quiet_ms = 0.0  # how long the line has been quiet
        self._endpoint_marks: list[float] = []  # asr stream ms at which the asr may end the caller's turn
        self._last_activity = time.monotonic()
        self._idle_prompted = False
        self._bad_messages = 0
        self._backchannels = set(settings.backchannels)
        self._partial_words = PartialWords(self._backchannels)

    # -- the socket ----------------------------------------------------------------
    async def serve(self) -> None:
        """Read Twilio's messages until `stop` or the socket closes; then end everything in flight."""
        telemetry.CALLS_ACTIVE.inc()
        no_start = asyncio.get_running_loop().call_later(START_TIMEOUT_S, self._no_start)
        try:
            while True:  # (not `async for`: one coroutine less per message, 50 a second)
                message = await self.ws.receive()
                if message.type != web.WSMsgType.TEXT:
                    if message.type in SOCKET_ENDED:
                        break
                    self._drop(f"non-text WebSocket message ({message.type.name})")
                    continue
                try:
                    event = protocol.parse_message(message.data)
                except protocol.ProtocolError as e:
                    self._drop(str(e))
                    continue
                if not self._handle(event):
                    break
        except _CallFailed as e:
            telemetry.CALL_ERRORS.labels(e.kind).inc()
            log.warning(json.dumps({"event": "call_failed", "call": self.call_sid, "reason": str(e)}))
        finally:
            no_start.cancel()
            await self._close()
            telemetry.CALLS_ACTIVE.dec()

    def _no_start(self) -> None:
        if self.state == "connecting":
            telemetry.CALL_ERRORS.labels("protocol").inc()
            log.warning(json.dumps({"event": "call_failed", "call": self.call_sid,
                                    "reason": f"no 'start' message within {START_TIMEOUT_S:g} s"}))
            asyncio.create_task(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"no start message"))

    def _drop(self, reason: str) -> None:
        """A message that is not what Twilio sends: log it and go on; too many end this call only."""
        telemetry.MESSAGES_DROPPED.inc()
        self._bad_messages += 1
        log.warning(json.dumps({"event": "message_dropped", "call": self.call_sid, "reason": reason[:300]}))
        if self._bad_messages > MAX_BAD_MESSAGES:
            raise _CallFailed("protocol", f"more than {MAX_BAD_MESSAGES} malformed messages")

    def _handle(self, event) -> bool:
        """One message from Twilio; False ends the call."""
        if isinstance(event, protocol.Connected):
            return True
        if isinstance(event, protocol.Start):
            if self.state != "connecting":
                self._drop("a second 'start' on one stream")
                return True
            self._start(event)
            return True
        if isinstance(event, protocol.Stop):
            return False
        if self.state != "active":
            self._drop(f"'{event.event}' before 'start'")
            return True
        if isinstance(event, protocol.Media):
            if event.media.track == "inbound":
                self._line_heard_until, self._line_stalled = time.monotonic(), False
                self._hear(event.media.payload)
        elif isinstance(event, protocol.Mark):
            self.playback.marked(event.mark.name)
        elif isinstance(event, protocol.Dtmf):
            log.info(json.dumps({"event": "dtmf", "call": self.call_sid, "digit": event.dtmf.digit}))
        return True

    def _start(self, event) -> None:
        self.stream_sid = event.start.stream_sid
        self.call_sid = event.start.call_sid or self.stream_sid
        # the asr's sequence id is this connection's own: a caller that reuses sids must not end another call's
        self._asr_id = f"{self.call_sid}:{secrets.token_hex(4)}"
        self.parameters = dict(event.start.custom_parameters)
        self.state = "active"
        telemetry.CALLS_TOTAL.inc()
        log.info(json.dumps({"event": "call_started", "call": self.call_sid, "stream": self.stream_sid,
                             "parameters": self.parameters}))
        self._spawn(self.playback.run(), "playback")
        self._asr = self.triton.asr(f"{self._asr_id}:1")  # before any media arrives: none is lost
        self._listener = self._spawn(self._listen(), "asr")
        self._spawn(self._watch(), "watch")
        greeting = self.parameters.get("greeting", self.settings.greeting)  # a <Parameter> may silence it
        if greeting:
            self._say_cached(greeting)

    async def _close(self) -> None:
        self.state = "stopping"
        if self.turn and self.turn.task:
            self.turn.task.cancel()
        if self._asr is not None:
            # end the asr sequence properly (a cancelled one holds a batcher slot until it idles out)
            self._send_held()
            self._asr.end()
            try:
                await asyncio.wait_for(asyncio.shield(self._listener), 2.0)
            except (asyncio.TimeoutError, Exception):
                self._asr.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.state = "closed"
        if not self.ws.closed:
            await self.ws.close()
        log.info(json.dumps({"event": "call_ended", "call": self.call_sid, "turns": self.turns,
                             "barge_ins": len(self.barge_ins)}))

    def _spawn(self, coro, name: str) -> asyncio.Task:
        """A task of this call; if it fails, this call ends (never another call or the process)."""
        task = asyncio.create_task(coro, name=f"{self.call_sid}:{name}")
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and self.state == "active":
                log.error(json.dumps({"event": "task_failed", "call": self.call_sid, "task": name,
                                      "error": repr(t.exception())}))
                telemetry.CALL_ERRORS.labels(name).inc()
                asyncio.create_task(self.ws.close())

        task.add_done_callback(done)
        return task

    async def _send(self, text: str) -> None:
        if not self.ws.closed:
            await self.ws.send_str(text)

    async def _send_media(self, frame: bytes) -> None:
        await self._send(protocol.media_message(self.stream_sid, frame))

    async def _send_mark(self, name: str) -> None:
        await self._send(protocol.mark_message(self.stream_sid, name))

    # -- listening -------------------------------------------------------------------
    def _hear(self, mulaw: bytes) -> None:
        """Caller audio: remember when each millisecond arrived; decode, upsample and stream it to asr.

        Frames go to asr in batches (each gRPC request costs the edge and Triton alike): ASR_SPEECH_BATCH_MS
        while the caller talks and the agent is quiet (nothing waits on their words until they pause), then
        ASR_BATCH_MS once they have been quiet SPEECH_GAP_MS (the asr counts the silence that ends their speech);
        ASR_BATCH_MS for sound over the agent's voice (words that may interrupt it); ASR_QUIET_BATCH_MS on a quiet
        line. What is held goes at once with the frame that brings sound to a quiet line, and with the frame
        that reaches an audio time at which the asr may end the turn (its speech_stop's `endpoint_ms`): the
        endpoint waits on no batch. Sound is told from the line's own noise (`audio.SoundGate`)."""
        now = time.monotonic()
        frame_ms = len(mulaw) * 1000 / audio.TWILIO_RATE
        self._received_ms += frame_ms
        self._audio_ms.append(self._received_ms)
        self._arrivals.append(now)
        if len(self._arrivals) > ARRIVALS_KEPT:  # only recent audio is ever looked up
            del self._audio_ms[:ARRIVALS_KEPT // 2], self._arrivals[:ARRIVALS_KEPT // 2]
        self._held.append(mulaw)
        self._held_ms += frame_ms
        sound = self._sound(mulaw)
        onset = sound and now >= self._attentive_until  # the asr's VAD sees it now
        stream_ms = self._received_ms - self._asr_base_ms
        endpoint = bool(self._endpoint_marks) and stream_ms >= self._endpoint_marks[0]
        if endpoint:
            self._endpoint_marks = [mark for mark in self._endpoint_marks if mark > stream_ms]
        if sound:
            self._attentive_until = max(self._attentive_until, now + SOUND_ATTENTION_S)
            self._quiet_ms = 0.0
        else:
            self._quiet_ms += frame_ms
        if now >= self._attentive_until:
            batch = self.settings.asr_quiet_batch_ms
        elif self._agent_busy() or (self._caller_speaking and self._quiet_ms >= SPEECH_GAP_MS):
            batch = self.settings.asr_batch_ms
        else:
            batch = self.settings.asr_speech_batch_ms
        if onset or endpoint or self._held_ms >= batch:
            self._send_held()

    def _fill_stalled_line(self) -> None:
        """No caller audio for LINE_STALL_MS: hear the time since the last frame as silence, and go on doing so
        until the caller's audio comes again. (Timed from the last frame, not from the first: a sender whose
        clock runs a little slow is not stalled.)"""
        if self._line_heard_until is None:
            return
        missing_ms = (time.monotonic() - self._line_heard_until) * 1000
        if missing_ms < (audio.FRAME_MS if self._line_stalled else LINE_STALL_MS):
            return
        frames = int(missing_ms // audio.FRAME_MS)
        self._line_heard_until += frames * audio.FRAME_MS / 1000
        if not self._line_stalled:
            self._line_stalled = True
            log.info(json.dumps({"event": "line_stalled", "call": self.call_sid, "audio_ms": round(self._received_ms),
                                 "missing_ms": frames * audio.FRAME_MS}))
        telemetry.LINE_FILLED_SECONDS.inc(frames * audio.FRAME_MS / 1000)
        for _ in range(frames):
            self._hear(SILENT_FRAME)

    def _send_held(self) -> None:
        held, self._held, self._held_ms = self._held, [], 0.0
        if self._asr is not None and held:
            # the caller's words while they speak decide an interruption (or a resume); while the agent only
            # listens they would take the cores, and hold back the transcript the endpoint waits on
            self._asr.send(self._upsampler(audio.mulaw_to_pcm(b"".join(held))),
                           partials=self._agent_busy() or self.resume is not None)

    def _when(self, audio_ms: float) -> float:
        """The monotonic time the caller's audio at `audio_ms` (of the current asr stream) reached us."""
        i = bisect.bisect_left(self._audio_ms, audio_ms + self._asr_base_ms)
        return self._arrivals[min(i, len(self._arrivals) - 1)] if self._arrivals else time.monotonic()

    async def _listen(self) -> None:
        """The call's asr stream; if Triton fails, apologise and reconnect."""
        attempt, failures = 0, 0
        while self.state == "active":
            attempt += 1
            if self._asr is None:  # a new stream counts its audio from 0: remember where the call was
                self._asr_base_ms = self._received_ms
                self._asr = self.triton.asr(f"{self._asr_id}:{attempt}")
            try:
                async for event in self._asr.events():
                    failures = 0
                    self._on_asr(event)
                return
            except TRITON_ERRORS as e:
                log.warning(json.dumps({"event": "asr_failed", "call": self.call_sid, "error": str(e)[:300]}))
                self._asr.cancel()
                self._asr = None
                failures += 1
                if failures == 1 and not self.playback.speaking:  # once per outage
                    self._say_cached(self.settings.apology_text)
                await asyncio.sleep(min(0.5 * failures, 5.0))

    def _on_asr(self, event: dict) -> None:
        kind = event.get("type")
        log.debug(json.dumps({"event": "asr", "call": self.call_sid, **event}))
        if kind == "speech_start":
            self._caller_speaking = True
            self._attentive_until = float("inf")
            self._endpoint_marks = []
            self._drop_speculation()  # the caller goes on: the pause was not the end
            self._last_activity = time.monotonic()
            if self.overlap is not None:
                self.overlap.speaking = True  # the same overlap goes on after a short pause
            elif self._agent_busy():
                self._overlap_began(self._when(event["audio_ms"]))
        elif kind == "speech_stop":
            self._caller_speaking = False
            self._endpoint_marks = sorted(event.get("endpoint_ms", []))
            self._attentive_until = time.monotonic() + (0 if self._endpoint_marks else ENDPOINT_ATTENTION_S)
            self._speech_stop_ms = event["audio_ms"]
            self._last_activity = time.monotonic()
            if self.overlap:
                self._overlap_paused(self.overlap)
        elif kind == "partial":
            settled = " ".join(self._partial_words.settled(words_of(event.get("text", ""))))
            meaningful = self._meaningful(settled)
            if self.resume and meaningful:
                self.resume = None  # words came: it was a real interruption, do not resume
            if self.overlap and meaningful:
                self.overlap.words = settled
                if time.monotonic() - self.overlap.onset >= self.settings.barge_in_min_speech_ms / 1000:
                    self._interrupt("words")  # else the minimum-duration check interrupts
            elif (not self._caller_speaking and self._speech_stop_ms is not None and not self._agent_busy()
                  and event.get("audio_ms", 0) > self._speech_stop_ms):
                # only a transcript past the speech's end: one that was still being made when the caller
                # stopped misses their last words, and a reply started on it would take the cores from the
                # transcription that the final waits for (perf/README.md "Voice-to-voice")
                self._speculate(event.get("text", "").strip())
        elif kind == "final":
            self._on_final(event)

    def _on_final(self, event: dict) -> None:
        if self.state != "active":
            return
        text = event.get("text", "").strip()
        self._last_activity = time.monotonic()
        self._caller_speaking = False
        self._attentive_until = self._last_activity
        self._endpoint_marks = []
        self._partial_words.last = []  # the asr's next partials are of a new turn
        self._end_overlap()
        speculation, self.speculation = self.speculation, None
        if speculation and (words_of(speculation.user_text) != words_of(text) or self._agent_busy()):
            speculation.task.cancel()
            telemetry.SPECULATIONS.labels("discarded").inc()
            speculation = None
        if not self._meaningful(text) and (self._agent_busy() or self.resume or not text):
            return  # a backchannel, our own echo or nothing while we talk (or are about to resume): talk on
        if self._agent_busy():
            self._interrupt("final", self._when(event.get("speech_start_ms", self._received_ms)))
        self.resume = None
        self._idle_prompted = False
        if speculation:
            telemetry.SPECULATIONS.labels("used").inc()
            speculation.times.final = time.monotonic()
            self._commit(speculation)
            return
        times = telemetry.TurnTimes(speech_end=self._when(event.get("speech_end_ms", self._received_ms)),
                                    final=time.monotonic())
        self._commit(self._start_turn(text, times))

    # -- barge-in --------------------------------------------------------------------
    def _agent_busy(self) -> bool:
        return self.playback.speaking or (self.turn is not None and not self.turn.task.done())

    def _overlap_began(self, onset: float) -> None:
        """Caller speech while we talk: at the minimum duration, words that are not a backchannel interrupt;
        speech that goes on past the words' wait interrupts whatever it says."""
        self.overlap = overlap = Overlap(onset)
        self._overlap_at(overlap, self.settings.barge_in_min_speech_ms, self._overlap_minimum)

    def _overlap_at(self, overlap: Overlap, after_ms: float, check) -> None:
        wait = max(overlap.onset + after_ms / 1000 - time.monotonic(), 0)
        overlap.timer = asyncio.get_running_loop().call_later(wait, check, overlap)

    def _overlap_minimum(self, overlap: Overlap) -> None:
        """Speech has lasted the minimum: words interrupt; without them yet, the agent pauses (stops sending:
        silent within the outbound lead) while the asr tells words from a backchannel or a cough."""
        if self.overlap is not overlap:
            return
        if overlap.words:
            self._interrupt("words")
            return
        self.playback.hold()
        log.info(json.dumps({"event": "paused", "call": self.call_sid,
                             "onset_ms_ago": round((time.monotonic() - overlap.onset) * 1000, 1)}))
        self._overlap_at(overlap, self.settings.barge_in_min_speech_ms + self.settings.barge_in_wait_words_ms,
                         self._overlap_timeout)

    def _end_overlap(self) -> None:
        """The overlap is over without a barge-in (or a final decides next): a paused agent goes on."""
        if self.overlap and self.overlap.timer:
            self.overlap.timer.cancel()
        self.overlap = None
        if self.playback.held:
            self.playback.release()
            log.info(json.dumps({"event": "unpaused", "call": self.call_sid}))

    def _overlap_timeout(self, overlap: Overlap) -> None:
        if self.overlap is overlap and overlap.speaking:
            self._interrupt("duration")

    def _overlap_paused(self, overlap: Overlap) -> None:
        """The caller stopped; a pause inside a sentence keeps the overlap (and its onset) alive a moment."""
        overlap.speaking = False

        def expire():
            if self.overlap is overlap and not overlap.speaking:
                self._end_overlap()  # too short to be a barge-in: noise, a cough, a backchannel

        asyncio.get_running_loop().call_later(OVERLAP_PAUSE_S, expire)

    def _meaningful(self, text: str) -> bool:
        """Words that are neither a backchannel nor the echo of what we are saying."""
        words = words_of(text)
        return bool(words) and not backchannel(words, self._backchannels) and not self._is_echo(words)

    def _is_echo(self, words: list[str]) -> bool:
        """Speakerphone echo: the transcript repeats what we said in the last seconds (`repeats`)."""
        if not self.turn and not self.playback.speaking:
            return False
        recent = " ".join((self.turn.clauses[-3:] if self.turn else []) + self.playback.recent_text())
        return repeats(words, words_of(recent))

    def _interrupt(self, why: str, onset: float | None = None) -> None:
        """Barge-in: clear Twilio's buffer, cancel the turn's requests, keep what was heard, listen."""
        if not self._agent_busy():
            self._end_overlap()
            return
        onset = self.overlap.onset if self.overlap else onset or time.monotonic()
        if self.overlap and self.overlap.timer:
            self.overlap.timer.cancel()
        self.overlap = None
        asyncio.create_task(self._send(protocol.clear_message(self.stream_sid)))
        cleared = time.monotonic()
        turn, self.turn = self.turn, None
        if turn:
            turn.interrupted = True
        if turn and turn.task and not turn.task.done():
            turn.task.cancel()  # closes its llm and tts streams: Triton cancels the requests
        heard = self.playback.clear()
        said = self._said_before_cut(turn, heard)
        if said:
            self._remember_assistant(said + INTERRUPTED)
        unsaid = turn.clauses[turn.heard_whole():] if turn else []
        whole = " ".join(turn.clauses[:turn.heard_whole()]) if turn else ""
        self.resume = (cleared + self.settings.false_interruption_ms / 1000, unsaid, said, whole) if unsaid else None
        record = {"event": "barge_in", "call": self.call_sid, "why": why,
                  "onset_to_clear_ms": round((cleared - onset) * 1000, 1), "heard": heard.text}
        self.barge_ins.append(record)
        telemetry.BARGE_INS.labels(why).inc()
        telemetry.BARGE_IN_SECONDS.observe(cleared - onset)
        log.info(json.dumps(record))
        if self.resume:
            self._spawn(self._maybe_resume(self.resume), "resume")

    def _said_before_cut(self, turn: Turn | None, heard) -> str | None:
        if turn is None:
            return None
        whole = turn.clauses[:turn.heard_whole()]
        cut = [heard.text] if heard.text and heard.cut in turn.chunks else []
        return " ".join(whole + cut).strip()

    async def _maybe_resume(self, plan) -> None:
        """A false interruption (no words came): say the cut clause again, from its start."""
        deadline, clauses, said, whole = plan
        await asyncio.sleep(max(deadline - time.monotonic(), 0))
        while self._caller_speaking and self.resume is plan:
            await asyncio.sleep(0.05)
        if self.resume is not plan or self.turn is not None:
            return
        self.resume = None
        note = (said or "") + INTERRUPTED
        if said and self.history and self.history[-1]["role"] == "assistant" \
                and self.history[-1]["content"].endswith(note):
            # the cut clause will be heard whole after all: keep the clauses heard before it, drop the rest
            kept = " ".join(filter(None, [self.history[-1]["content"][:-len(note)].strip(), whole]))
            if kept:
                self.history[-1]["content"] = kept
            else:
                self.history.pop()
        telemetry.BARGE_INS.labels("resumed").inc()
        log.info(json.dumps({"event": "resume", "call": self.call_sid, "clauses": len(clauses)}))
        turn = Turn(self.turns, "", telemetry.TurnTimes())
        turn.committed.set()  # its audio plays at once (an uncommitted turn holds it back, like a speculation)
        self.turn = turn
        turn.task = self._spawn(self._speak_clauses(turn, clauses), "resume-turn")

    # -- replying --------------------------------------------------------------------
    def _speculate(self, text: str) -> None:
        """The caller paused: start the reply to what they said so far, unheard until the final confirms it."""
        if not self._meaningful(text) or (self.speculation and words_of(self.speculation.user_text) == words_of(text)):
            return
        self._drop_speculation()
        times = telemetry.TurnTimes(speech_end=self._when(self._speech_stop_ms))
        self.speculation = self._start_turn(text, times)
        log.debug(json.dumps({"event": "speculating", "call": self.call_sid, "text": text}))

    def _drop_speculation(self) -> None:
        if self.speculation:
            self.speculation.task.cancel()
            self.speculation = None
            telemetry.SPECULATIONS.labels("discarded").inc()

    def _start_turn(self, text: str, times: telemetry.TurnTimes) -> Turn:
        """A reply to `text`: the llm starts now; its audio waits until the turn is committed."""
        turn = Turn(self.turns + 1, text, times, messages=self._context() + [{"role": "user", "content": text}])
        if turn.messages[-2]["role"] == "user":  # roles must alternate for most chat templates
            turn.messages[-2:] = [{"role": "user", "content": turn.messages[-2]["content"] + " " + text}]
        turn.task = self._spawn(self._reply(turn), f"turn{turn.number}")
        return turn

    def _commit(self, turn: Turn) -> None:
        """The caller's turn is final: this reply becomes the call's, and its audio may play."""
        if self.turn and self.turn.task and not self.turn.task.done():
            self.turn.task.cancel()
        self.turns = turn.number
        self.history = turn.messages[1:]  # the context it was written for, without the system prompt
        self.turn = turn
        turn.committed.set()
        log.info(json.dumps({"event": "caller_said", "call": self.call_sid, "turn": turn.number,
                             "text": turn.user_text}))

    def _context(self) -> list[dict]:
        """System prompt + history, oldest turns dropped past the token budget (4 characters a token).

        Trimmed in steps, so the kept prefix stays the same for several turns and the engine can
        reuse its KV cache."""
        budget = self.settings.history_max_tokens * 4
        while sum(len(m["content"]) for m in self.history) > budget and len(self.history) > 2:
            drop = max(2, len(self.history) // 4)
            self.history = self.history[drop:]
        return [{"role": "system", "content": self.settings.system_prompt}] + self.history

    async def _reply(self, turn: Turn) -> None:
        clauses: asyncio.Queue = asyncio.Queue()
        speaker = asyncio.create_task(self._speak_queue(turn, clauses))
        try:
            await self._generate(turn, clauses)
            await clauses.put(None)
            await speaker
            await self.playback.played()
            if turn.clauses:
                self._remember_assistant(" ".join(turn.clauses))
        finally:
            speaker.cancel()
            if self.turn is turn:
                self.turn = None
                self._last_activity = time.monotonic()
            if turn.committed.is_set():
                telemetry.record_turn(self.call_sid, turn.number, turn.times, heard=turn.user_text,
                                      said=" ".join(turn.clauses), interrupted=turn.interrupted)

    async def _generate(self, turn: Turn, clauses: asyncio.Queue) -> None:
        """llm -> clause chunker -> the speaker's queue; a late first token gets a filler and one retry."""
        messages = turn.messages
        for attempt in (1, 2):
            chunker = ClauseChunker()
            turn.times.llm_request = time.monotonic()
            # small llms copy the history's " [interrupted]" into their replies: never let it be spoken
            deltas = self.triton.llm(messages, self.settings.llm_max_tokens, self.settings.llm_temperature,
                                     stop=[INTERRUPTED.strip()], request_id=f"{self.call_sid}:{turn.number}:{attempt}")
            try:
                first = await asyncio.wait_for(anext(deltas), self.settings.llm_first_token_timeout)
            except StopAsyncIteration:
                return
            except (asyncio.TimeoutError, *TRITON_ERRORS) as e:
                await deltas.aclose()
                log.warning(json.dumps({"event": "llm_failed", "call": self.call_sid, "turn": turn.number,
                                        "attempt": attempt, "error": repr(e)[:300]}))
                self._say_cached(self.settings.filler_text if attempt == 1 else self.settings.apology_text)
                continue
            turn.times.llm_first_token = time.monotonic()
            try:
                for clause in chunker.push(first):
                    await self._clause(turn, clauses, clause)
                async for delta in deltas:
                    for clause in chunker.push(delta):
                        await self._clause(turn, clauses, clause)
            except TRITON_ERRORS as e:
                log.warning(json.dumps({"event": "llm_failed", "call": self.call_sid, "turn": turn.number,
                                        "error": repr(e)[:300]}))
            finally:
                await deltas.aclose()
            for clause in chunker.flush():
                if deltas.finish_reason == "length" and not ends_sentence(clause) and turn.clauses \
                        and ends_sentence(turn.clauses[-1]):
                    # LLM_MAX_TOKENS cut this sentence short: the reply ends on the last whole one instead
                    log.info(json.dumps({"event": "reply_cut", "call": self.call_sid, "turn": turn.number,
                                         "unsaid": clause[:300]}))
                    break
                await self._clause(turn, clauses, clause)
            return

    async def _clause(self, turn: Turn, clauses: asyncio.Queue, clause: str) -> None:
        if turn.times.first_clause is None:
            turn.times.first_clause = time.monotonic()
        turn.clauses.append(clause)
        await clauses.put(clause)

    async def _speak_queue(self, turn: Turn, clauses: asyncio.Queue) -> None:
        while (clause := await clauses.get()) is not None:
            await self._speak(turn, clause)

    async def _speak(self, turn: Turn, clause: str) -> None:
        """Synthesize just in time (TTS_AHEAD_S of audio queued at most): tts work for a reply that is cut off
        is never done, and it does not compete with the asr that listens for the interruption."""
        await self.playback.below(self.settings.tts_ahead_s)
        await self._synthesize(turn, clause)

    async def _speak_clauses(self, turn: Turn, texts: list[str]) -> None:
        """Say already-written clauses (resuming after a false interruption)."""
        try:
            turn.clauses.extend(texts)
            for clause in texts:
                await self._speak(turn, clause)
            await self.playback.played()
            self._remember_assistant(" ".join(turn.clauses))
        finally:
            if self.turn is turn:
                self.turn = None

    async def _synthesize(self, turn: Turn, clause: str) -> None:
        """One clause through tts into the playback queue, as the audio comes; a failed clause is skipped.

        A speculative turn's audio is synthesized but held until the turn is committed."""
        chunk, held, downsampler = None, [], None

        def out(mulaw: bytes) -> None:
            nonlocal chunk
            if chunk is None and turn.committed.is_set():
                chunk = self.playback.start(clause)
                turn.chunks.append(chunk)
                for piece in held:
                    self.playback.extend(chunk, piece)
            if chunk is None:
                held.append(mulaw)
            else:
                self.playback.extend(chunk, mulaw)

        try:
            try:
                async for samples, rate in self.triton.tts(clause, rate=self.settings.tts_rate,
                                                           request_id=f"{self.call_sid}:{turn.number}"):
                    if downsampler is None:
                        downsampler = audio.Resampler(rate, audio.TWILIO_RATE)
                        samples = _trim_leading_silence(samples)
                        if turn.times.tts_first_audio is None:
                            turn.times.tts_first_audio = time.monotonic()
                    out(audio.pcm_to_mulaw(downsampler(samples)))
                if downsampler is not None:
                    out(audio.pcm_to_mulaw(downsampler(np.zeros(0, np.int16), last=True)))
            except TRITON_ERRORS as e:
                log.warning(json.dumps({"event": "tts_failed", "call": self.call_sid, "clause": clause[:80],
                                        "error": repr(e)[:300]}))
            await turn.committed.wait()
            out(b"")
        finally:
            if chunk is not None:
                self.playback.finish(chunk)
        if turn.times.first_frame is None:
            self._spawn(self._note_first_frame(turn, chunk), "first-frame")

    async def _note_first_frame(self, turn: Turn, chunk) -> None:
        while chunk.first_sent is None and self.state == "active" and chunk.frames:
            await asyncio.sleep(0.005)
        if turn.times.first_frame is None:
            turn.times.first_frame = chunk.first_sent

    def _say_cached(self, text: str) -> None:
        """A fixed phrase from audio synthesized at start-up: no model on the path."""
        mulaw = self.phrases.get(text)
        if mulaw:
            self.playback.enqueue(text, mulaw)
            self._remember_assistant(text)

    def _remember_assistant(self, text: str) -> None:
        if not text:
            return
        if self.history and self.history[-1]["role"] == "assistant":
            self.history[-1]["content"] += " " + text
        else:
            self.history.append({"role": "assistant", "content": text})

    # -- silence ---------------------------------------------------------------------
    async def _watch(self) -> None:
        """A stalled line is heard as silence. Caller silent too long: prompt once; still silent: say goodbye and
        hang up."""
        while self.state == "active":
            await self.playback.clock.sleep(WATCH_S)
            self._fill_stalled_line()
            if self._agent_busy() or self._caller_speaking:
                self._last_activity = time.monotonic()
                continue
            if time.monotonic() - self._last_activity < self.settings.idle_prompt_seconds:
                continue
            if not self._idle_prompted:
                self._idle_prompted = True
                self._say_cached(self.settings.idle_prompt_text)
                continue
            self._say_cached(self.settings.idle_hangup_text)
            await self.playback.played()
            log.info(json.dumps({"event": "hangup_idle", "call": self.call_sid}))
            await self.ws.close()  # ends <Connect><Stream>; with no TwiML after it, the call ends
            return


def backchannel(words: list[str], backchannels: set[str]) -> bool:
    """A listener's noise, not a turn: the phrase or each word is a backchannel, or a hum as Whisper spells it
    ("m m m", "mm", "hmm", "mhm", "mm-mm": what it writes for a closed-mouth "mm-hmm")."""
    return " ".join(words) in backchannels or all(w in backchannels or HUM.fullmatch(w) for w in words)


def repeats(heard: list[str], said: list[str]) -> bool:
    """Three words or more, at least 80 % of them a stretch of `said` in the same order: an echo of our voice.
    Order matters: a caller's own "I'm sorry, I did not understand" shares words with us, not their order."""
    if len(heard) < 3:
        return False
    matching = difflib.SequenceMatcher(None, heard, said, autojunk=False).get_matching_blocks()
    return sum(block.size for block in matching) / len(heard) >= 0.8


def words_of(text: str) -> list[str]:
    """Lower-case words without punctuation: how transcripts are compared."""
    return [w for w in (w.strip(".,!?;:'\"-…").lower() for w in text.split()) if w]


def _trim_leading_silence(samples: np.ndarray, threshold: int = 200, keep: int = 160) -> np.ndarray:
    """Drop the engine's lead-in silence from a clause's first audio: it only delays the reply."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold)
    return samples[max(int(loud[0]) - keep, 0):] if loud.size else samples


class _CallFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Phrases:
    """Fixed phrases (greeting, filler, apology, idle prompts) synthesized once at start-up as 8 kHz mu-law."""

    def __init__(self):
        self._audio: dict[str, bytes] = {}

    def get(self, text: str) -> bytes | None:
        return self._audio.get(text)

    async def prepare(self, triton: Triton, texts: list[str], rate: float) -> None:
        for text in filter(None, dict.fromkeys(texts)):
            if text in self._audio:
                continue
            pieces = []
            resampler = None
            async for samples, sr in triton.tts(text, rate=rate):
                resampler = resampler or audio.Resampler(sr, audio.TWILIO_RATE)
                pieces.append(resampler(samples))
            if resampler:
                pieces.append(resampler(np.zeros(0, np.int16), last=True))
                self._audio[text] = audio.pcm_to_mulaw(_trim_leading_silence(np.concatenate(pieces)))
