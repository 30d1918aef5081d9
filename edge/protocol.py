"""Twilio Media Streams over WebSocket: every message as a typed, validated model.

The wire format is Twilio's (https://www.twilio.com/docs/voice/media-streams/websocket-messages):
JSON text frames with an `event` discriminator, camelCase keys, and counters
(`sequenceNumber`, `chunk`, `timestamp`) sent as strings. Models expose
snake_case attributes. What the edge acts on is validated and required (the
event, the payload, the start's stream sid, a mark's name, a digit); what it
does not (the counters, the sids Twilio repeats on every message, the stop's
sids) is validated when present but may be absent, so a caller that leaves it
out loses no audio; fields Twilio may add later are ignored. `media.payload`
arrives already base64-decoded to mu-law bytes.

Inbound (Twilio -> edge): `connected`, `start`, `media`, `mark`, `dtmf`, `stop`,
parsed by `parse_message`. Outbound (edge -> Twilio): `media`, `mark`, `clear`,
built as JSON text by `media_message`, `mark_message`, `clear_message` and
parsed by `parse_outbound` (the call simulator plays Twilio's side). The
Twilio-side builders at the end exist for the simulator and the tests.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

MULAW_ENCODING = "audio/x-mulaw"
SAMPLE_RATE = 8000
MAX_PAYLOAD_BYTES = SAMPLE_RATE  # 1 s of mu-law; Twilio sends 160 bytes (20 ms) per media message
MAX_MESSAGE_CHARS = 64 * 1024  # a media message with a 1 s payload is ~11 kB; start with parameters far less
MAX_NAME_CHARS = 256


class ProtocolError(ValueError):
    """A message that is not valid Twilio Media Streams JSON; the text says what is wrong."""


#: base64 in the JSON (decoded by pydantic-core, with the message: a media message comes 50 times a second)
MulawPayload = Annotated[bytes, Field(min_length=1, max_length=MAX_PAYLOAD_BYTES)]
Sid = Annotated[str, Field(min_length=2, max_length=64)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
#: what the edge does not act on: validated when present, None when absent
Counter = Annotated[int | None, Field(default=None, ge=0)]
OptionalSid = Annotated[Sid | None, Field(default=None)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True, frozen=True,
                              val_json_bytes="base64")


# ---- Twilio -> edge ---------------------------------------------------------------------------

class Connected(_Model):
    """First message on the socket: names the protocol of the messages that follow."""
    event: Literal["connected"]
    protocol: str = "Call"
    version: str = "1.0.0"


class MediaFormat(_Model):
    """The only format Media Streams carries; anything else is refused rather than misplayed."""
    encoding: Literal["audio/x-mulaw"]
    sample_rate: Literal[8000]
    channels: Literal[1]


class StartInfo(_Model):
    account_sid: OptionalSid
    stream_sid: Sid
    call_sid: OptionalSid
    tracks: list[Literal["inbound", "outbound"]] = ["inbound"]
    custom_parameters: dict[str, str] = {}
    media_format: MediaFormat = MediaFormat(encoding=MULAW_ENCODING, sample_rate=SAMPLE_RATE, channels=1)


class Start(_Model):
    """Once, right after `connected`: the stream's identity, the `<Parameter>`s of the TwiML and the audio format
    (absent: Twilio's only one)."""
    event: Literal["start"]
    sequence_number: Counter
    start: StartInfo
    stream_sid: OptionalSid


class MediaInfo(_Model):
    track: Literal["inbound", "outbound"] = "inbound"
    chunk: Counter
    timestamp: Counter  # milliseconds since the stream started
    payload: MulawPayload


class Media(_Model):
    """One chunk of caller audio (20 ms, 160 mu-law bytes, in practice)."""
    event: Literal["media"]
    sequence_number: Counter
    media: MediaInfo
    stream_sid: OptionalSid


class MarkInfo(_Model):
    name: Name


class Mark(_Model):
    """Echo of a mark we sent: the audio sent before it has played, or a `clear` dropped it."""
    event: Literal["mark"]
    sequence_number: Counter
    stream_sid: OptionalSid
    mark: MarkInfo


class DtmfInfo(_Model):
    track: str = "inbound_track"
    digit: Annotated[str, Field(pattern=r"^[0-9A-Da-d*#]$")]


class Dtmf(_Model):
    """A key the caller pressed (bidirectional streams only)."""
    event: Literal["dtmf"]
    sequence_number: Counter
    stream_sid: OptionalSid
    dtmf: DtmfInfo


class StopInfo(_Model):
    account_sid: OptionalSid
    call_sid: OptionalSid


class Stop(_Model):
    """The stream ended (the caller hung up, or the call left `<Connect><Stream>`)."""
    event: Literal["stop"]
    sequence_number: Counter
    stream_sid: OptionalSid
    stop: StopInfo = StopInfo()


Message = Annotated[Union[Connected, Start, Media, Mark, Dtmf, Stop], Field(discriminator="event")]
_MESSAGE = TypeAdapter(Message)


# ---- edge -> Twilio ---------------------------------------------------------------------------

class OutboundMediaInfo(_Model):
    payload: MulawPayload


class OutboundMedia(_Model):
    """Audio for Twilio to play to the caller, queued behind what is already buffered."""
    event: Literal["media"]
    stream_sid: Sid
    media: OutboundMediaInfo


class OutboundMark(_Model):
    """Ask Twilio to echo `name` once the audio sent before it has played."""
    event: Literal["mark"]
    stream_sid: Sid
    mark: MarkInfo


class Clear(_Model):
    """Drop every buffered outbound audio chunk now (barge-in); pending marks come back at once."""
    event: Literal["clear"]
    stream_sid: Sid


OutboundMessage = Annotated[Union[OutboundMedia, OutboundMark, Clear], Field(discriminator="event")]
_OUTBOUND = TypeAdapter(OutboundMessage)


def _parse(adapter: TypeAdapter, text: str | bytes, what: str):
    if len(text) > MAX_MESSAGE_CHARS:
        raise ProtocolError(f"{what} message of {len(text)} characters is over the {MAX_MESSAGE_CHARS} limit")
    try:
        return adapter.validate_json(text)
    except ValidationError as e:
        raise ProtocolError(_describe(e, what)) from None


def _describe(error: ValidationError, what: str) -> str:
    first = error.errors(include_url=False)[0]
    kind, ctx = first["type"], first.get("ctx") or {}
    if kind == "json_invalid":
        return f"{what} message is not valid JSON: {ctx.get('error', first['msg'])}"
    if kind == "union_tag_not_found":
        return f"{what} message has no 'event'"
    if kind == "union_tag_invalid":
        return f"unknown {what} event {ctx.get('tag')!r} (expected one of {ctx.get('expected_tags')})"
    if not first["loc"]:
        return f"{what} message is not a JSON object"
    event, *path = first["loc"]
    where = ".".join(str(p) for p in path) or "message"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"bad {what} {event!r} message: {where}: {first['msg']}{more}"


def parse_message(text: str | bytes) -> Message:
    """One message from Twilio -> its model.

    Raises `ProtocolError` for malformed JSON, an unknown event or a bad field.
    """
    return _parse(_MESSAGE, text, "Twilio")


def parse_outbound(text: str | bytes) -> OutboundMessage:
    """One message the edge sent -> its model (what Twilio, or the call simulator, reads)."""
    return _parse(_OUTBOUND, text, "outbound")


def _dumps(message: dict) -> str:
    return json.dumps(message, separators=(",", ":"))


def media_message(stream_sid: str, mulaw: bytes) -> str:
    """Outbound audio: 8 kHz mu-law bytes (the edge sends 160 = 20 ms at a time). Formatted by hand: this
    runs 50 times a second per call while the agent talks (same JSON as `_dumps` would write)."""
    payload = base64.b64encode(mulaw).decode("ascii")
    return f'{{"event":"media","streamSid":{json.dumps(stream_sid)},"media":{{"payload":"{payload}"}}}}'


def mark_message(stream_sid: str, name: str) -> str:
    return _dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    return _dumps({"event": "clear", "streamSid": stream_sid})


# ---- Twilio's side, as Twilio writes it (the call simulator and tests) ------------------------

def connected_message() -> str:
    return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start_message(sequence_number: int, account_sid: str, stream_sid: str, call_sid: str,
                  custom_parameters: dict[str, str] | None = None, tracks: tuple[str, ...] = ("inbound",)) -> str:
    return _dumps({"event": "start", "sequenceNumber": str(sequence_number),
                   "start": {"accountSid": account_sid, "streamSid": stream_sid, "callSid": call_sid,
                             "tracks": list(tracks), "customParameters": dict(custom_parameters or {}),
                             "mediaFormat": {"encoding": MULAW_ENCODING, "sampleRate": SAMPLE_RATE, "channels": 1}},
                   "streamSid": stream_sid})


def caller_media_message(sequence_number: int, stream_sid: str, chunk: int, timestamp_ms: int,
                         mulaw: bytes) -> str:
    return _dumps({"event": "media", "sequenceNumber": str(sequence_number),
                   "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp_ms),
                             "payload": base64.b64encode(mulaw).decode("ascii")},
                   "streamSid": stream_sid})


def mark_echo_message(sequence_number: int, stream_sid: str, name: str) -> str:
    return _dumps({"event": "mark", "sequenceNumber": str(sequence_number), "streamSid": stream_sid,
                   "mark": {"name": name}})


def dtmf_message(sequence_number: int, stream_sid: str, digit: str) -> str:
    return _dumps({"event": "dtmf", "streamSid": stream_sid, "sequenceNumber": str(sequence_number),
                   "dtmf": {"track": "inbound_track", "digit": digit}})


def stop_message(sequence_number: int, stream_sid: str, account_sid: str, call_sid: str) -> str:
    return _dumps({"event": "stop", "sequenceNumber": str(sequence_number), "streamSid": stream_sid,
                   "stop": {"accountSid": account_sid, "callSid": call_sid}})
