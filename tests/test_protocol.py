"""The Twilio side of the edge without any model: message parsing, signatures, settings, and the call simulator.

The simulator is checked against a small scripted edge (a greeting, a reply
after 200 ms of caller silence, a `clear` on barge-in), so its timings,
pacing records and mark/clear handling are proven before they are used to
judge the real edge.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket

import numpy as np
import pytest
from aiohttp import WSServerHandshakeError, web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger
from multidict import MultiDict
from pydantic import ValidationError

from edge import audio, protocol
from edge.app import CallsAccessLogger
from edge.protocol import ProtocolError, parse_message, parse_outbound
from edge.settings import Settings, media_url, public_url
from edge.signature import SIGNATURE_HEADER, sign, sign_websocket, validate_webhook, validate_websocket
from edge.simulate import CallerTurn, _frames, run_call
from tests.barge import caller as caller_recording

ACCOUNT, CALL, STREAM = "AC" + "1" * 32, "CA" + "2" * 32, "MZ" + "3" * 32
TOKEN = "12345"
FRAME_B64 = base64.b64encode(bytes(range(160))).decode()


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


# ---- messages from Twilio, as its documentation shows them ----------------------------------------

DOC_START = {
    "event": "start", "sequenceNumber": "1",
    "start": {"accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
              "callSid": "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "tracks": ["inbound", "outbound"],
              "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
              "customParameters": {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"}},
    "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
}


def doc_media(payload: str = FRAME_B64, **media) -> str:
    return json.dumps({"event": "media", "sequenceNumber": "3",
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": payload, **media},
                       "streamSid": STREAM})


def test_connected_message_parses():
    m = parse_message('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
    assert isinstance(m, protocol.Connected) and m.protocol == "Call" and m.version == "1.0.0"


def test_start_message_gives_sids_parameters_and_format():
    m = parse_message(json.dumps(DOC_START))
    assert isinstance(m, protocol.Start)
    assert m.sequence_number == 1 and m.stream_sid == m.start.stream_sid
    assert m.start.call_sid.startswith("CA") and m.start.account_sid.startswith("AC")
    assert m.start.tracks == ["inbound", "outbound"]
    assert m.start.custom_parameters == {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"}
    assert m.start.media_format.sample_rate == 8000


def test_media_message_decodes_the_payload():
    m = parse_message(doc_media())
    assert isinstance(m, protocol.Media)
    assert (m.sequence_number, m.media.chunk, m.media.timestamp, m.media.track) == (3, 1, 5, "inbound")
    assert m.media.payload == bytes(range(160)) and m.stream_sid == STREAM


def test_mark_dtmf_and_stop_messages_parse():
    mark = parse_message(json.dumps({"event": "mark", "sequenceNumber": "4", "streamSid": STREAM,
                                     "mark": {"name": "my label"}}))
    dtmf = parse_message(json.dumps({"event": "dtmf", "streamSid": STREAM, "sequenceNumber": "5",
                                     "dtmf": {"track": "inbound_track", "digit": "1"}}))
    stop = parse_message(json.dumps({"event": "stop", "sequenceNumber": "5", "streamSid": STREAM,
                                     "stop": {"accountSid": ACCOUNT, "callSid": CALL}}))
    assert isinstance(mark, protocol.Mark) and mark.mark.name == "my label"
    assert isinstance(dtmf, protocol.Dtmf) and dtmf.dtmf.digit == "1"
    assert isinstance(stop, protocol.Stop) and stop.stop.call_sid == CALL


def test_fields_twilio_may_add_are_ignored_and_counters_may_be_numbers():
    message = json.loads(doc_media(extra="x"))
    message["sequenceNumber"], message["media"]["chunk"], message["newField"] = 3, 1, {"a": 1}
    m = parse_message(json.dumps(message).encode())
    assert m.sequence_number == 3 and m.media.chunk == 1
    start = json.loads(json.dumps(DOC_START))
    start["start"]["somethingNew"] = True
    assert isinstance(parse_message(json.dumps(start)), protocol.Start)


def test_what_the_edge_does_not_act_on_may_be_absent():
    """Counters, repeated sids and the stop's sids: a caller that leaves them out loses nothing."""
    media = parse_message(json.dumps({"event": "media", "media": {"payload": FRAME_B64}}))
    assert media.media.payload == bytes(range(160)) and media.media.track == "inbound"
    assert (media.sequence_number, media.media.chunk, media.media.timestamp, media.stream_sid) == (None,) * 4
    start = parse_message(json.dumps({"event": "start", "start": {"streamSid": STREAM}}))
    assert start.start.stream_sid == STREAM and start.start.call_sid is None
    assert start.start.media_format.encoding == "audio/x-mulaw" and start.start.media_format.sample_rate == 8000
    assert parse_message('{"event": "mark", "mark": {"name": "m1"}}').mark.name == "m1"
    assert parse_message('{"event": "dtmf", "dtmf": {"digit": "5"}}').dtmf.digit == "5"
    assert isinstance(parse_message('{"event": "stop"}'), protocol.Stop)


@pytest.mark.parametrize("text, says", [
    ("{", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"protocol": "Call"}', "no 'event'"),
    ('{"event": "hello"}', "unknown Twilio event 'hello'"),
    (doc_media(payload="not base64!"), "media.payload"),
    (doc_media(payload=""), "media.payload: Data should have at least 1 byte"),
    (doc_media(payload=base64.b64encode(bytes(8001)).decode()), "media.payload: Data should have at most 8000 bytes"),
    (doc_media(track="sideways"), "media.track"),
    (doc_media(chunk="one"), "media.chunk"),
    ('{"event": "media", "sequenceNumber": "3", "media": {"track": "inbound"}, "streamSid": "MZ1"}', "media.payload"),
    (doc_media().replace('"sequenceNumber": "3"', '"sequenceNumber": "-3"'), "sequenceNumber"),
    ('{"event": "start", "start": {"callSid": "CA1"}}', "start.streamSid"),
    ('{"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "5", "dtmf": {"digit": "12"}}', "dtmf.digit"),
    ('{"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {}}', "mark.name"),
    ('{"event": "stop", "sequenceNumber": "5", "streamSid": "M"}', "streamSid"),
])
def test_malformed_messages_raise_a_protocol_error_that_says_why(text, says):
    with pytest.raises(ProtocolError, match=says.replace("(", r"\(")):
        parse_message(text)


@pytest.mark.parametrize("field, value", [("encoding", "audio/l16"), ("sampleRate", 16000), ("channels", 2)])
def test_start_with_any_format_but_mulaw_8k_mono_is_refused(field, value):
    start = json.loads(json.dumps(DOC_START))
    start["start"]["mediaFormat"][field] = value
    with pytest.raises(ProtocolError, match=f"mediaFormat.{field}"):
        parse_message(json.dumps(start))


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="limit"):
        parse_message(doc_media(payload="A" * (protocol.MAX_MESSAGE_CHARS + 1)))


def test_outbound_messages_have_twilios_shape():
    assert json.loads(protocol.media_message(STREAM, b"\x00\xff")) == {
        "event": "media", "streamSid": STREAM, "media": {"payload": "AP8="}}
    assert json.loads(protocol.mark_message(STREAM, 'say "hi"')) == {
        "event": "mark", "streamSid": STREAM, "mark": {"name": 'say "hi"'}}
    assert json.loads(protocol.clear_message(STREAM)) == {"event": "clear", "streamSid": STREAM}
    assert parse_outbound(protocol.media_message(STREAM, bytes(160))).media.payload == bytes(160)
    assert isinstance(parse_outbound(protocol.clear_message(STREAM)), protocol.Clear)


def test_twilio_side_builders_round_trip_through_the_parser():
    start = parse_message(protocol.start_message(1, ACCOUNT, STREAM, CALL, {"lang": "en"}))
    assert start.start.custom_parameters == {"lang": "en"} and start.stream_sid == STREAM
    media = parse_message(protocol.caller_media_message(2, STREAM, 1, 0, bytes(160)))
    assert media.media.payload == bytes(160) and media.sequence_number == 2
    assert parse_message(protocol.mark_echo_message(3, STREAM, "m1")).mark.name == "m1"
    assert parse_message(protocol.dtmf_message(4, STREAM, "#")).dtmf.digit == "#"
    assert parse_message(protocol.stop_message(5, STREAM, ACCOUNT, CALL)).stop.account_sid == ACCOUNT
    assert isinstance(parse_message(protocol.connected_message()), protocol.Connected)


# ---- signatures -------------------------------------------------------------------------------------

def twilio_hmac(token: str, url: str, params: dict) -> str:
    """Twilio's documented algorithm: HMAC-SHA1 over the URL then each sorted key+value, base64."""
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


WEBHOOK = "https://agent.example.com/twiml?lang=en"
FORM = {"CallSid": CALL, "AccountSid": ACCOUNT, "From": "+15005550006", "To": "+15005550001"}


def test_sign_follows_twilios_algorithm():
    assert sign(TOKEN, WEBHOOK, FORM) == twilio_hmac(TOKEN, WEBHOOK, FORM)
    ws = "wss://agent.example.com/media"
    assert sign_websocket(TOKEN, ws) == twilio_hmac(TOKEN, ws, {})


def test_webhook_signature_is_checked():
    s = settings(twilio_auth_token=TOKEN, public_url="https://agent.example.com")
    good = sign(TOKEN, WEBHOOK, FORM)
    assert validate_webhook(s, WEBHOOK, FORM, good)
    assert validate_webhook(s, WEBHOOK, MultiDict(FORM), good)
    assert not validate_webhook(s, WEBHOOK, FORM, None)
    assert not validate_webhook(s, WEBHOOK, FORM, "")
    assert not validate_webhook(s, WEBHOOK, FORM, sign("another token", WEBHOOK, FORM))
    assert not validate_webhook(s, WEBHOOK, {**FORM, "From": "+15550000000"}, good)
    assert not validate_webhook(s, "https://agent.example.com/twiml", FORM, good)


def test_websocket_signature_is_checked_against_the_public_media_url():
    s = settings(twilio_auth_token=TOKEN, public_url="https://agent.example.com")
    assert validate_websocket(s, sign_websocket(TOKEN, "wss://agent.example.com/media"))
    assert not validate_websocket(s, None)
    assert not validate_websocket(s, sign_websocket(TOKEN, "wss://evil.example.com/media"))
    assert not validate_websocket(s, sign_websocket("another token", "wss://agent.example.com/media"))


def test_without_an_auth_token_local_requests_are_not_validated():
    s = settings()
    assert validate_webhook(s, "http://127.0.0.1:8080/twiml", FORM, None)
    assert validate_websocket(s, None)


# ---- settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("public, media", [
    ("https://agent.example.com", "wss://agent.example.com/media"),
    ("https://agent.example.com/", "wss://agent.example.com/media"),
    ("https://example.com/voice/", "wss://example.com/voice/media"),
    ("https://agent.example.com:8443", "wss://agent.example.com:8443/media"),
    ("http://localhost:9000", "ws://localhost:9000/media"),
])
def test_media_url_comes_from_public_url(public, media):
    s = settings(public_url=public, twilio_auth_token=TOKEN)
    assert media_url(s) == media
    assert public_url(s, "/twiml?x=1") == public.rstrip("/") + "/twiml?x=1"


def test_public_url_defaults_to_the_local_edge():
    assert media_url(settings(edge_port=9123)) == "ws://127.0.0.1:9123/media"


@pytest.mark.parametrize("bad", ["agent.example.com", "ftp://agent.example.com", "https://a.example.com/?q=1"])
def test_public_url_must_be_a_plain_http_url(bad):
    with pytest.raises(ValidationError, match="PUBLIC_URL"):
        settings(public_url=bad, twilio_auth_token=TOKEN)


def test_a_public_edge_without_an_auth_token_is_refused():
    with pytest.raises(ValidationError, match="TWILIO_AUTH_TOKEN"):
        settings(public_url="https://agent.example.com")
    assert settings(public_url="https://agent.example.com", allow_unsigned=True)


def test_the_access_log_has_the_calls_requests_and_not_the_probes(caplog):
    access = CallsAccessLogger(logging.getLogger("aiohttp.access"), AccessLogger.LOG_FORMAT)
    with caplog.at_level(logging.INFO, "aiohttp.access"):
        for method, path in [("GET", "/healthz"), ("POST", "/twiml"), ("GET", "/readyz"), ("GET", "/metrics"),
                             ("GET", "/media")]:
            access.log(make_mocked_request(method, path), web.Response(), 0.001)
    assert [record.getMessage().split('"')[1] for record in caplog.records] == ["POST /twiml HTTP/1.1",
                                                                                "GET /media HTTP/1.1"]


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("BACKCHANNELS", "Uh-huh, mm-hmm ,  Got   it,")
    monkeypatch.setenv("START_TRITON", "false")
    monkeypatch.setenv("EDGE_PORT", "9000")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "secret")
    s = Settings(_env_file=None)
    assert s.backchannels == ("uh-huh", "mm-hmm", "got it")
    assert s.start_triton is False and s.edge_port == 9000
    assert s.twilio_auth_token.get_secret_value() == "secret" and "secret" not in repr(s)


def test_every_setting_is_documented():
    assert all(f.description for f in Settings.model_fields.values())


# ---- the call simulator against a scripted edge ---------------------------------------------------------

def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * audio.TWILIO_RATE)) / audio.TWILIO_RATE
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


SETTINGS = web.AppKey("settings", Settings)
LOG = web.AppKey("log", dict)
ENDPOINT_FRAMES = 10  # the scripted edge answers after 200 ms of caller silence
LEAD_S = 0.1


async def scripted_edge(request: web.Request) -> web.WebSocketResponse:
    """Greets, answers each caller turn with a paced tone and a mark every 100 ms, clears on barge-in."""
    app = request.app
    if not validate_websocket(app[SETTINGS], request.headers.get(SIGNATURE_HEADER)):
        raise web.HTTPForbidden()
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    loop = asyncio.get_running_loop()
    sid, reply, heard, quiet = "", None, False, 0

    async def say(seconds: float):
        frames = audio.pcm_to_mulaw(tone(seconds, 330))
        start = loop.time()
        for i in range(0, len(frames), audio.FRAME_BYTES):
            await asyncio.sleep(max(0.0, start + i / audio.TWILIO_RATE - LEAD_S - loop.time()))
            await ws.send_str(protocol.media_message(sid, frames[i:i + audio.FRAME_BYTES]))
            if i // audio.FRAME_BYTES % 5 == 4:
                await ws.send_str(protocol.mark_message(sid, f"m{i}"))

    async for msg in ws:
        m = parse_message(msg.data)
        app[LOG]["events"].append(m.event)
        if isinstance(m, protocol.Start):
            sid = m.stream_sid
            app[LOG]["starts"].append(m)
            reply = asyncio.create_task(say(0.4))
        elif isinstance(m, protocol.Media):
            if audio.mulaw_has_sound(m.media.payload):
                if reply and not reply.done():
                    reply.cancel()
                    await ws.send_str(protocol.clear_message(sid))
                heard, quiet = True, 0
            elif heard:
                quiet += 1
                if quiet == ENDPOINT_FRAMES:
                    heard, reply = False, asyncio.create_task(say(0.6))
        elif isinstance(m, protocol.Mark):
            app[LOG]["marks"].append(m.mark.name)
        elif isinstance(m, protocol.Dtmf) and m.dtmf.digit == "#":
            await ws.close()
        elif isinstance(m, protocol.Stop):
            break
    if reply:
        reply.cancel()
    return ws


async def chunked_edge(request: web.Request) -> web.WebSocketResponse:
    """Answers each caller turn as some agents (Pipecat's Twilio serializer) send: 1100 bytes (137.5 ms) a message
    every 120 ms, ahead of real time; `?stall_ms=` holds the reply's second half back that much longer."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    stall = float(request.query.get("stall_ms", 0)) / 1000
    sid, heard, quiet, reply = "", False, 0, None

    async def say():
        frames = audio.pcm_to_mulaw(tone(1.1, 330))
        for k, i in enumerate(range(0, len(frames), 1100)):
            await ws.send_str(protocol.media_message(sid, frames[i:i + 1100]))
            await asyncio.sleep(0.12 + (stall if k == 3 else 0.0))

    async for msg in ws:
        m = parse_message(msg.data)
        if isinstance(m, protocol.Start):
            sid = m.stream_sid
        elif isinstance(m, protocol.Media):
            if audio.mulaw_has_sound(m.media.payload):
                heard, quiet = True, 0
            elif heard:
                quiet += 1
                if quiet == ENDPOINT_FRAMES:
                    heard, reply = False, asyncio.create_task(say())
        elif isinstance(m, protocol.Stop):
            break
    if reply:
        reply.cancel()
    return ws


async def twiml(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    form = await request.post()
    if not validate_webhook(s, public_url(s, str(request.rel_url)), form, request.headers.get(SIGNATURE_HEADER)):
        raise web.HTTPForbidden()
    return web.Response(content_type="text/xml", text=(
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{media_url(s)}">'
        f'<Parameter name="caller" value="{form["From"]}"/></Stream></Connect></Response>'))


@pytest.fixture
async def edge():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = web.Application()
    app[SETTINGS] = settings(edge_port=port, twilio_auth_token=TOKEN)
    app[LOG] = {"events": [], "starts": [], "marks": [], "url": media_url(app[SETTINGS]),
                "base": app[SETTINGS].public_url}
    app.router.add_get("/media", scripted_edge)
    app.router.add_get("/chunked", chunked_edge)
    app.router.add_post("/twiml", twiml)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield app[LOG]
    await runner.cleanup()


async def test_simulated_call_times_each_reply_and_plays_it_back_in_real_time(edge):
    turns = [CallerTurn(tone(0.5), "one"), tone(0.4)]
    report = await run_call(edge["url"], turns, auth_token=TOKEN, pause_ms=300, params={"k": "v"})
    assert not report.errors and report.closed_by == "caller"
    assert edge["events"][:2] == ["connected", "start"] and edge["events"][-1] == "stop"
    assert edge["starts"][0].start.custom_parameters == {"k": "v"}
    assert report.greeting_first_frame_at is not None and report.greeting_first_frame_at < 0.1
    for turn in report.turns:
        # 200 ms of endpointing in the scripted edge, then its first frame goes out at once
        assert 170 <= turn.voice_to_voice_ms <= 300, turn
        assert turn.heard_voice_to_voice_ms >= turn.voice_to_voice_ms
        assert turn.reply_frames == 30 and turn.clears == 0 and not turn.barge_in
        assert turn.reply_max_gap_ms < 60
    assert report.turns[1].started_at >= report.turns[0].reply_first_heard_at + 0.6 + 0.3
    assert {f.nbytes for f in report.frames} == {160}
    assert 80 <= max(f.buffered_ms for f in report.frames) <= 160  # the edge's 100 ms lead, give or take a frame
    # every mark came back after its audio played, and the heard recording holds the 1.6 s of agent audio
    assert edge["marks"] == [name for _, name in report.marks_received]
    assert all(m.played for m in report.marks_echoed) and len(report.marks_echoed) == len(report.marks_received)
    heard = np.abs(report.heard.reshape(-1, audio.FRAME_BYTES).astype(np.int32)).max(axis=1) > 300
    assert heard.sum() == 20 + 30 + 30
    assert len(report.heard) == len(report.caller) == pytest.approx(report.duration * audio.TWILIO_RATE, abs=800)
    json.dumps(report.summary())


async def test_barge_in_gets_a_clear_and_pending_marks_come_back_unplayed(edge):
    turns = [tone(0.4), CallerTurn(tone(0.4), barge_in_ms=200)]
    report = await run_call(edge["url"], turns, auth_token=TOKEN, pause_ms=300)
    first, second = report.turns
    assert second.barge_in and second.clears == 1
    assert second.clear_after_speech_ms < 100
    assert second.started_at == pytest.approx(first.reply_first_heard_at + 0.2, abs=0.03)
    assert any(not m.played for m in report.marks_echoed)
    assert 170 <= second.voice_to_voice_ms <= 300


async def test_fixed_gaps_do_not_wait_for_the_agent(edge):
    report = await run_call(edge["url"], [tone(0.2), tone(0.2)], auth_token=TOKEN, wait_for_greeting=False,
                            wait_for_reply=False, pause_ms=100, tail_ms=100)
    first, second = report.turns
    assert first.started_at < 0.05
    assert second.started_at == pytest.approx(first.ended_at + 0.1, abs=0.03)


async def test_the_edge_hanging_up_ends_the_call(edge):
    report = await run_call(edge["url"], [tone(0.2), CallerTurn(tone(0.2), dtmf="#"), tone(0.2)], auth_token=TOKEN,
                            wait_for_greeting=False, wait_for_reply=False, pause_ms=100)
    assert report.closed_by == "edge" and len(report.turns) == 2 and not report.errors
    assert "dtmf" in edge["events"] and "stop" not in edge["events"]


async def test_the_webhook_and_the_upgrade_are_signed_like_twilio(edge):
    base = edge["base"]
    report = await run_call(None, [tone(0.2)], auth_token=TOKEN, twiml_url=base + "/twiml", wait_for_greeting=False,
                            pause_ms=100, tail_ms=0)
    assert report.custom_parameters == {"caller": "+15005550006"} and report.turns
    assert edge["starts"][0].start.custom_parameters == {"caller": "+15005550006"}
    with pytest.raises(WSServerHandshakeError):
        await run_call(edge["url"], [tone(0.2)])
    with pytest.raises(WSServerHandshakeError):
        await run_call(edge["url"], [tone(0.2)], auth_token="wrong")
    with pytest.raises(RuntimeError, match="403"):
        await run_call(None, [tone(0.2)], auth_token="wrong", twiml_url=base + "/twiml")


@pytest.mark.parametrize("stall_ms, underruns", [(0, 0), (200, 1)])
async def test_an_underrun_is_silence_heard_that_the_agent_did_not_send(edge, stall_ms, underruns):
    """Large messages sent ahead of time arrive far apart yet play without a break; a late one is heard."""
    url = edge["url"].replace("/media", f"/chunked?stall_ms={stall_ms}")
    report = await run_call(url, [tone(0.3)], wait_for_greeting=False, pause_ms=100, tail_ms=1500)
    [turn] = report.turns
    assert turn.reply_audio_ms == pytest.approx(1100, abs=40)
    assert turn.reply_max_gap_ms > 100  # every arrival gap would be a glitch to the 60 ms arrival rule
    assert turn.reply_underruns == underruns, report.starved.astype(int).tolist()


def test_the_callers_speech_is_timed_from_its_words_not_the_hiss_around_them():
    """Voice-to-voice starts at the caller's last frame of speech: a recording's hiss after the last word (as in
    ps_something) is line noise, however far above the fixed sound threshold it reaches."""
    words = caller_recording("vm-sorry")
    hiss = np.random.default_rng(0).normal(0, 160, audio.TWILIO_RATE).clip(-600, 600).astype(np.int16)
    hiss_frames, _ = _frames(hiss)
    assert all(audio.mulaw_has_sound(f) for f in hiss_frames)  # sound to the fixed threshold alone
    _, alone = _frames(words)
    _, padded = _frames(np.concatenate([hiss, words, hiss]))
    speech = np.flatnonzero(alone)
    assert np.flatnonzero(padded).tolist() == (speech + len(hiss) // audio.FRAME_BYTES).tolist()
    assert (speech[-1] - speech[0]) * 20 > 2000  # the recording's 2.7 s of words, quiet syllables included
