"""The edge end to end: simulated Twilio calls with real speech through the real tritonserver."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import aiohttp
import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from edge import audio, protocol, telemetry
from edge import call as call_module
from edge.app import CALLS, SETTINGS
from edge.call import LINE_STALL_MS, MAX_BAD_MESSAGES, SILENT_FRAME, Call, Turn
from edge.playback import FrameClock
from edge.settings import Settings
from edge.signature import sign, sign_websocket
from edge.simulate import run_call
from edge.triton import LlmReply, Triton
from tests.barge import storyteller_edge
from tests.metrics import ascrape
from tests.speech import recording, wer, word_errors, words

pytestmark = pytest.mark.usefixtures("triton")

QUESTION = recording("vm-savefolder")  # "Which folder should I save the message to?"
STATEMENT = recording("tt-weasels")  # "Weasels have eaten our phone system"


def caller(rec) -> np.ndarray:
    samples, rate = rec.samples()
    return audio.resample(samples, rate, audio.TWILIO_RATE)


async def transcribe(triton_url: str, samples8k: np.ndarray) -> str:
    """What the real asr model hears in audio the agent sent (8 kHz)."""
    client = Triton(triton_url)
    stream = client.asr(f"check-{np.random.randint(1 << 30)}")
    pcm = audio.resample(samples8k, audio.TWILIO_RATE, audio.ASR_RATE)
    pcm = np.concatenate([pcm, np.zeros(audio.ASR_RATE * 2, np.int16)])
    finals = []

    async def read():
        async for event in stream.events():
            if event["type"] == "final":
                finals.append(event["text"])

    reader = asyncio.create_task(read())
    for i in range(0, len(pcm), 3200):
        stream.send(pcm[i:i + 3200])
        await asyncio.sleep(0.01)
    stream.end()
    await asyncio.wait_for(reader, 60)
    await client.close()
    return " ".join(finals)


def aggregate_wer(pairs: list[tuple[str, str]]) -> float:
    errors, total = map(sum, zip(*(word_errors(ref, hyp) for ref, hyp in pairs)))
    return errors / total


def turn_logs(caplog, call_sid: str) -> list[dict]:
    records = []
    for r in caplog.records:
        if r.name == "edge.turn":
            record = json.loads(r.getMessage())
            if record["call"] == call_sid:
                records.append(record)
    return records


async def test_a_call_is_greeted_and_each_turn_answered_with_paced_marked_audio(edge, triton, caplog):
    caplog.set_level(logging.INFO, logger="edge.turn")
    before = await ascrape(triton.metrics_url)
    report = await run_call(edge.ws_url, [caller(QUESTION), caller(STATEMENT)], pause_ms=1000)
    assert not report.errors, report.errors
    # caller audio reached the asr in batches (ASR_*BATCH_MS), not a request per frame
    asr_requests = (await ascrape(triton.metrics_url)).value("voice_requests_total", model="asr") \
        - before.value("voice_requests_total", model="asr")
    call_ms = len(report.caller) / audio.FRAME_BYTES * audio.FRAME_MS
    settings = edge.app[SETTINGS]
    assert call_ms / settings.asr_quiet_batch_ms < asr_requests < call_ms / settings.asr_batch_ms, \
        (asr_requests, call_ms)
    assert report.greeting_first_frame_at is not None
    for turn in report.turns:
        assert turn.reply_first_frame_at is not None, f"turn {turn.index} got no reply"
        assert turn.reply_audio_ms > 300
    # every outbound frame is one 20 ms mu-law frame, sent on a 20 ms clock
    assert {f.nbytes for f in report.frames} == {audio.FRAME_BYTES}
    arrivals = np.diff([f.t for f in report.frames])
    steady = arrivals[(arrivals > 0.005) & (arrivals < 0.1)]  # within runs of audio, after the lead burst
    assert 0.017 < float(np.median(steady)) < 0.023, np.median(steady)
    # Twilio echoes each mark once its audio played: every mark we sent came back, as played
    assert report.marks_received and len(report.marks_echoed) == len(report.marks_received)
    assert all(m.played for m in report.marks_echoed)
    # the agent's words are real speech: the asr model hears words in what the caller heard
    heard = await transcribe(triton.grpc_url, report.heard)
    assert len(words(heard)) >= 5, heard
    logs = turn_logs(caplog, report.call_sid)
    assert aggregate_wer([(QUESTION.transcript, logs[0]["heard"]), (STATEMENT.transcript, logs[1]["heard"])]) < 0.5


async def test_two_simultaneous_calls_hear_only_their_own_replies_even_with_the_same_sids(edge, triton, caplog):
    """Twilio never reuses a CallSid or StreamSid; a test harness may, and its calls must stay apart all the same."""
    caplog.set_level(logging.INFO, logger="edge")
    same = {"call_sid": "CA" + "7" * 32, "stream_sid": "MZ" + "7" * 32, "params": {"greeting": ""}}
    a, b = await asyncio.gather(run_call(edge.ws_url, [caller(QUESTION)], **same),
                                run_call(edge.ws_url, [caller(STATEMENT)], **same))
    assert not [r.getMessage() for r in caplog.records if "asr_failed" in r.getMessage()]
    logs = turn_logs(caplog, same["call_sid"])  # both calls' turns: told apart by what the caller said
    pairs, said = [], []
    for report, rec in ((a, QUESTION), (b, STATEMENT)):
        other = STATEMENT if rec is QUESTION else QUESTION
        own = [log for log in logs if wer(rec.transcript, log["heard"]) < wer(other.transcript, log["heard"])]
        pairs.append((rec.transcript, " ".join(log["heard"] for log in own)))  # a pause may split the words
        said.append(" ".join(log["said"] for log in own))
        assert report.turns[0].reply_first_frame_at is not None
    assert aggregate_wer(pairs) < 0.5, pairs
    said_a, said_b = said
    heard_a, heard_b = await asyncio.gather(transcribe(triton.grpc_url, a.heard), transcribe(triton.grpc_url, b.heard))
    # each socket carried the reply written for its own caller, not the other's: no socket's audio is nearer the
    # other reply than its own, and the pairing as sent fits better than the swapped one (a one-word reply the
    # asr hears as nothing, like "Werewolves.", ties on its own socket and leaves the other to tell them apart)
    own_a, other_a, own_b, other_b = (wer(said_a, heard_a), wer(said_b, heard_a), wer(said_b, heard_b),
                                      wer(said_a, heard_b))
    assert own_a <= other_a, (said_a, said_b, heard_a)
    assert own_b <= other_b, (said_a, said_b, heard_b)
    assert own_a + own_b < other_a + other_b, (said_a, said_b, heard_a, heard_b)  # as sent vs swapped


async def test_malformed_messages_are_dropped_and_too_many_end_only_their_own_call(edge):
    """Bad input loses nothing: each bad message is logged and dropped, the call goes on; past
    MAX_BAD_MESSAGES that call (only) is ended, while another call is answered as usual."""
    frame = base64.b64encode(bytes(160)).decode()
    bad = ["{", "[1, 2]", '{"event": "hello"}', '{"event": "media", "media": {"payload": "not base64!"}}',
           b"\x00\x01", protocol.start_message(2, "AC" + "0" * 32, "MZ" + "0" * 32, "CA" + "0" * 32),
           '{"event": "media", "media": {"payload": "%s"}}' % ("A" * protocol.MAX_MESSAGE_CHARS)]

    async def junk_call(session: aiohttp.ClientSession, n_bad: int) -> bool:
        """A call that sends `n_bad` bad messages among good ones; True when the edge ended it."""
        sid = f"{np.random.randint(1 << 60):032x}"
        async with session.ws_connect(edge.ws_url) as ws:
            await ws.send_str(protocol.connected_message())
            await ws.send_str(protocol.start_message(1, "AC" + sid, "MZ" + sid, "CA" + sid, {"greeting": ""}))
            for i in range(n_bad):
                message = bad[i % len(bad)]
                await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
                await ws.send_str(f'{{"event": "media", "media": {{"payload": "{frame}"}}}}')
            try:
                while (await asyncio.wait_for(ws.receive(), 2.0)).type not in (aiohttp.WSMsgType.CLOSE,
                                                                                aiohttp.WSMsgType.CLOSED):
                    pass
                return True
            except asyncio.TimeoutError:
                return False  # still open: the call went on

    before = await ascrape(edge.http_url + "/metrics")
    async with aiohttp.ClientSession() as session:
        ended_many, ended_few, report = await asyncio.gather(
            junk_call(session, MAX_BAD_MESSAGES + 1), junk_call(session, MAX_BAD_MESSAGES),
            run_call(edge.ws_url, [caller(QUESTION)], params={"greeting": ""}, session=session))
    assert ended_many and not ended_few
    assert not report.errors and report.turns[0].reply_first_frame_at is not None
    after = await ascrape(edge.http_url + "/metrics")
    assert after.value("edge_messages_dropped_total") - before.value("edge_messages_dropped_total") \
        == 2 * MAX_BAD_MESSAGES + 1
    assert after.value("edge_call_errors_total", kind="protocol") \
        - before.value("edge_call_errors_total", kind="protocol") == 1


async def test_a_socket_that_never_starts_a_call_is_closed(edge, monkeypatch):
    """Twilio sends `start` as soon as the socket opens; a socket that does not (a port scanner, a client that
    died after the upgrade) is closed after START_TIMEOUT_S instead of being held forever."""
    monkeypatch.setattr(call_module, "START_TIMEOUT_S", 0.5)
    before = await ascrape(edge.http_url + "/metrics")

    async def close_code(first: str | None) -> int | None:
        async with aiohttp.ClientSession() as session, session.ws_connect(edge.ws_url) as ws:
            if first:
                await ws.send_str(first)
            message = await asyncio.wait_for(ws.receive(), 5.0)
            return ws.close_code if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) else None

    assert await asyncio.gather(close_code(None), close_code(protocol.connected_message())) \
        == [aiohttp.WSCloseCode.POLICY_VIOLATION] * 2
    after = await ascrape(edge.http_url + "/metrics")
    assert after.value("edge_call_errors_total", kind="protocol") \
        - before.value("edge_call_errors_total", kind="protocol") == 2


def without_trailing_silence(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 300)
    return samples[:loud[-1] + audio.TWILIO_RATE // 10]  # 100 ms past the last sound: no endpoint in it


async def test_a_caller_that_sends_nothing_between_its_turns_is_still_answered(edge, caplog):
    """Twilio sends a frame every 20 ms all call long; a test caller may stop sending when it stops talking.
    The edge hears the missing audio as silence, so the asr still ends the turn."""
    caplog.set_level(logging.INFO, logger="edge")
    turns = [without_trailing_silence(caller(rec)) for rec in (QUESTION, STATEMENT)]
    report = await run_call(edge.ws_url, turns, speech_only=True, wait_for_greeting=False,
                            params={"greeting": ""}, pause_ms=500)
    assert not report.errors, report.errors
    for turn in report.turns:
        assert turn.reply_first_frame_at is not None, f"turn {turn.index} got no reply"
    logs = turn_logs(caplog, report.call_sid)
    assert aggregate_wer([(QUESTION.transcript, logs[0]["heard"]), (STATEMENT.transcript, logs[1]["heard"])]) < 0.5
    stalls = [r for r in caplog.records if "line_stalled" in r.getMessage() and report.call_sid in r.getMessage()]
    assert len(stalls) >= 2, stalls  # each turn's end, at least


@pytest.fixture
async def storyteller(triton):
    """Long replies: the llm is still writing when the first frame goes out (a short reply can be written and
    synthesized whole by then, and a `stop` would find nothing to cancel)."""
    server = await storyteller_edge(triton, llm_max_tokens=512)
    yield server
    await server.stop()


async def test_stop_mid_reply_cancels_the_calls_requests_on_the_server(storyteller, triton):
    """Play Twilio by hand: talk, and send `stop` as soon as the reply's first frame arrives."""
    edge = storyteller
    before = await ascrape(triton.metrics_url)
    cancelled_before = sum(before.value("voice_requests_cancelled_total", model=m) for m in ("llm", "tts"))
    stream_sid, call_sid, account_sid = "MZ" + "1" * 32, "CA" + "1" * 32, "AC" + "1" * 32
    # "Weasels have eaten our phone system" gets a story from the storyteller (temperature 0)
    mulaw = audio.pcm_to_mulaw(np.concatenate([caller(STATEMENT), np.zeros(audio.TWILIO_RATE * 3, np.int16)]))
    async with aiohttp.ClientSession() as session, session.ws_connect(edge.ws_url) as ws:
        await ws.send_str(protocol.connected_message())
        await ws.send_str(protocol.start_message(1, account_sid, stream_sid, call_sid, {"greeting": ""}))

        async def speak():
            for n, i in enumerate(range(0, len(mulaw), audio.FRAME_BYTES)):
                await ws.send_str(protocol.caller_media_message(n + 2, stream_sid, n + 1, n * 20,
                                                                mulaw[i:i + audio.FRAME_BYTES]))
                await asyncio.sleep(0.02)

        speaker = asyncio.create_task(speak())
        async for message in ws:
            if protocol.parse_outbound(message.data).event == "media":
                break
        speaker.cancel()
        await ws.send_str(protocol.stop_message(9999, stream_sid, account_sid, call_sid))
    after = await asyncio.sleep(1.0) or await ascrape(triton.metrics_url)
    cancelled = sum(after.value("voice_requests_cancelled_total", model=m) for m in ("llm", "tts"))
    assert cancelled > cancelled_before
    assert after.value("voice_requests_active", model="llm") == 0
    assert after.value("voice_requests_active", model="tts") == 0
    assert not edge.app[CALLS]


class TestSignatures:
    TOKEN = "12345678901234567890123456789012"
    PUBLIC = "https://agent.example.com"

    async def test_unsigned_or_wrongly_signed_requests_are_refused_and_signed_ones_served(self, signed_edge):
        form = {"CallSid": "CA" + "1" * 32, "From": "+15005550006", "To": "+15005550001"}
        twiml = f"{signed_edge.http_url}/twiml"
        async with aiohttp.ClientSession() as session:
            async with session.post(twiml, data=form) as r:
                assert r.status == 403
            async with session.post(twiml, data=form, headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}) as r:
                assert r.status == 403
            good = sign(self.TOKEN, f"{self.PUBLIC}/twiml", form)
            async with session.post(twiml, data=form, headers={"X-Twilio-Signature": good}) as r:
                assert r.status == 200
                body = await r.text()
            assert '<Stream url="wss://agent.example.com/media">' in body
            assert '<Parameter name="from" value="+15005550006"' in body
            for headers in ({}, {"X-Twilio-Signature": sign_websocket(self.TOKEN, "wss://evil.example.com/media")}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(signed_edge.ws_url, headers=headers)
                assert refused.value.status == 403
            headers = {"X-Twilio-Signature": sign_websocket(self.TOKEN, "wss://agent.example.com/media")}
            async with session.ws_connect(signed_edge.ws_url, headers=headers) as ws:
                await ws.send_str(protocol.connected_message())
                await ws.send_str(protocol.stop_message(1, "MZ" + "0" * 32, "AC" + "0" * 32, "CA" + "0" * 32))
                closed = await ws.receive(timeout=10)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


# -- caller audio to asr, on its own, without the server --------------------------------------------------------

class CountingAsr:
    """Stands in for the call's asr stream: notes how much of the call's audio each request brought it to."""

    def __init__(self, call: Call):
        self.call, self.sent_until_ms = call, []

    @property
    def requests(self) -> int:
        return len(self.sent_until_ms)

    def send(self, pcm16k, partials: bool = True) -> None:
        self.sent_until_ms.append(self.call._received_ms)


def listening_call() -> Call:
    call = Call(ws=None, settings=Settings(), triton=None, phrases=None, clock=FrameClock())
    call.state, call._asr = "active", CountingAsr(call)
    return call


def test_caller_speech_goes_to_asr_in_larger_requests_only_while_nothing_waits_on_it():
    call = listening_call()
    speech = audio.pcm_to_mulaw((np.sin(np.arange(audio.FRAME_BYTES) / 3) * 8000).astype(np.int16))
    for _ in range(10):
        call._hear(SILENT_FRAME)
    assert call._asr.requests == 0  # a quiet line: held for ASR_QUIET_BATCH_MS
    call._hear(speech)
    assert call._asr.sent_until_ms == [220]  # the frame that brings sound to a quiet line goes at once, with it
    call._hear(speech)
    assert call._asr.requests == 1
    call._caller_speaking = True  # the asr's speech_start: nothing waits on their words until they pause
    for _ in range(20):
        call._hear(speech)
    assert call._asr.requests == 1 + 400 // call.settings.asr_speech_batch_ms
    before = call._asr.requests
    call._hear(SILENT_FRAME)
    call._hear(SILENT_FRAME)
    assert call._asr.requests == before  # a gap between words goes with the words
    call._hear(SILENT_FRAME)
    assert call._asr.requests == before + 1  # 60 ms of quiet may be their end: the asr counts it from here on
    call.playback.enqueue("Let me check.", speech * 50)  # the agent talks: their words may interrupt it
    before = call._asr.requests
    for _ in range(20):
        call._hear(speech)
    assert call._asr.requests - before >= 400 // call.settings.asr_batch_ms - 1


def test_the_silence_of_a_pending_endpoint_goes_to_asr_when_the_asr_can_decide_on_it():
    """After speech_stop the asr ends the turn once it has heard `endpoint_ms` of the call: what is held goes with
    the frame that reaches each of those times (the endpoint waits on no batch), and otherwise in quiet batches."""
    call = listening_call()
    call._hear(SILENT_FRAME)
    call._on_asr({"type": "speech_stop", "audio_ms": 0, "endpoint_ms": [350, 800]})
    for _ in range(60):
        call._hear(SILENT_FRAME)
    sent = call._asr.sent_until_ms
    assert 360 in sent and 800 in sent, sent  # the first frames at or past each time
    assert len(sent) <= 5, sent  # not one every ASR_BATCH_MS
    assert all(b - a <= call.settings.asr_quiet_batch_ms for a, b in zip([0] + sent, sent))


def test_a_stalled_line_is_heard_as_silence_until_the_callers_audio_comes_again():
    call = listening_call()
    frame = protocol.parse_message(protocol.caller_media_message(2, "MZ" + "0" * 32, 1, 0, SILENT_FRAME))
    call._handle(frame)
    call._line_heard_until -= (LINE_STALL_MS - 50) / 1000  # a short stall: the next frame is only late
    call._fill_stalled_line()
    assert call._received_ms == 20
    call._line_heard_until -= 0.1  # no audio for LINE_STALL_MS + 50 ms: all of it is heard as silence
    call._fill_stalled_line()
    assert call._received_ms == 20 + (LINE_STALL_MS + 40)
    call._line_heard_until -= 0.05  # still stalled: what is missing goes on being filled, frame by frame
    call._fill_stalled_line()
    assert call._received_ms == 20 + (LINE_STALL_MS + 40) + 60
    call._handle(frame)  # the caller's audio again: a stall is once more LINE_STALL_MS without it
    call._line_heard_until -= 0.1
    call._fill_stalled_line()
    assert call._received_ms == 20 + (LINE_STALL_MS + 40) + 60 + 20


# -- the reply's text, on its own, without the server -------------------------------------------------------------

def llm_response(text: str, finish_reason: str = "") -> InferResult:
    """A response of the llm as the contract writes it: TEXT and FINISH_REASON, one BYTES element each."""
    response = service_pb2.ModelInferResponse(model_name="llm")
    for name, value in (("TEXT", text), ("FINISH_REASON", finish_reason)):
        response.outputs.add(name=name, datatype="BYTES", shape=[1])
        response.raw_output_contents.append(serialize_byte_tensor(np.array([value.encode()], np.object_)).item())
    return InferResult(response)


class ScriptedLlm:
    """Stands in for Triton: the llm writes one reply, in these deltas, and ends it for `finish_reason`."""

    def __init__(self, deltas: list[str], finish_reason: str):
        self.deltas, self.finish_reason = deltas, finish_reason

    def llm(self, messages, *args, **kwargs) -> LlmReply:
        async def results():
            for delta in self.deltas:
                yield llm_response(delta)
            yield llm_response("", self.finish_reason)
        return LlmReply(results())


@pytest.mark.parametrize("last, finish_reason, said", [
    ("the box", "length", ["Sure, I can help."]),  # LLM_MAX_TOKENS cut the second sentence: it is not spoken
    ("the box", "stop", ["Sure, I can help.", "The first step is to open the box"]),  # the reply's own end is
    # cut right after a sentence (the token limit, or the llm ending a reply for a waiting call): it is whole
    ("the box.", "length", ["Sure, I can help.", "The first step is to open the box."]),
])
async def test_a_reply_cut_by_the_token_limit_ends_on_its_last_whole_sentence(last, finish_reason, said):
    llm = ScriptedLlm(["Sure, I can ", "help. The first ", "step is to open ", last], finish_reason)
    call = Call(ws=None, settings=Settings(), triton=llm, phrases=None, clock=FrameClock())
    turn = Turn(1, "How do I start?", telemetry.TurnTimes())
    await call._generate(turn, asyncio.Queue())
    assert turn.clauses == said


async def test_a_reply_starts_at_the_callers_pause_only_on_a_transcript_past_their_last_words():
    """After speech_stop the asr sends the partial that was still being made when the caller stopped (it misses
    their last words), then the one of the whole speech: the reply starts on that one, before the endpoint."""
    call = Call(ws=None, settings=Settings(), triton=ScriptedLlm(["Sure."], "stop"), phrases=None, clock=FrameClock())
    call.state = "active"
    call._on_asr({"type": "speech_start", "audio_ms": 300})
    call._on_asr({"type": "partial", "text": "I'd like", "audio_ms": 900})
    assert call.speculation is None  # the caller is speaking
    call._on_asr({"type": "speech_stop", "audio_ms": 2000, "endpoint_ms": [2350, 2800]})
    call._on_asr({"type": "partial", "text": "I'd like to book a", "audio_ms": 1980})
    assert call.speculation is None
    call._on_asr({"type": "partial", "text": "I'd like to book a table.", "audio_ms": 2100})
    assert call.speculation is not None and call.speculation.user_text == "I'd like to book a table."
    assert call.speculation.messages[-1] == {"role": "user", "content": "I'd like to book a table."}
    assert not call.speculation.committed.is_set()  # unheard until the final confirms it
    reply = call.speculation.task
    call._drop_speculation()  # the caller spoke on
    await asyncio.sleep(0)
    assert call.speculation is None and reply.cancelled()
