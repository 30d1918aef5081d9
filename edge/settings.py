"""The edge's settings, read from environment variables (no prefix) or a `.env` file.

Every field carries a description; the README's settings table is generated
from them (`Settings.model_fields`), so they are written once, here.
Public URLs are derived from `PUBLIC_URL` alone, never from a request's Host
header: Twilio signs the URL it was given, and a Host header is the caller's
to choose.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, helpful assistant talking with someone on the phone. "
    "Everything you write is spoken aloud by a voice, so answer the way a person talks: "
    "short, natural spoken sentences, usually one to three, and never more than needed. "
    "Do not use markdown, lists, bullet points, headings, emoji, code, URLs or special symbols; "
    "write numbers, dates and abbreviations the way they are said. "
    "If you did not catch something or it is unclear, ask one short question. "
    "If you do not know, say so briefly. Do not say you are an AI unless asked."
)

DEFAULT_BACKCHANNELS = ("uh-huh", "uh huh", "mm-hmm", "mhm", "hmm", "mm", "yeah", "yep", "yes", "okay", "ok",
                        "right", "sure", "alright", "i see", "got it", "oh", "ah", "uh", "um")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False)

    # Twilio and the public face of the edge
    twilio_auth_token: SecretStr | None = Field(
        None, description="Twilio account Auth Token: validates X-Twilio-Signature on /twiml and on the /media "
                          "WebSocket upgrade. Unset: requests are not validated (local development only; refused "
                          "for a non-local PUBLIC_URL unless ALLOW_UNSIGNED=true).")
    allow_unsigned: bool = Field(
        False, description="Accept unsigned requests even though PUBLIC_URL is not local (never in production).")
    public_url: str | None = Field(
        None, description="Base URL at which Twilio reaches this edge, e.g. https://agent.example.com "
                          "(signatures are checked against it, and <Stream url> is derived from it: https -> wss). "
                          "Default http://127.0.0.1:EDGE_PORT.")
    edge_host: str = Field("127.0.0.1", description="Interface the edge listens on (0.0.0.0 in containers).")
    edge_port: int = Field(8080, ge=1, le=65535, description="Port the edge listens on (HTTP and WebSocket).")

    # Triton
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC address (host:port).")
    triton_profile: Literal["cpu", "gpu"] = Field(
        "cpu", description="Model profile: cpu (embedded engines) or gpu (the docker/ image); selects "
                           "configs/<profile>.pbtxt.")
    start_triton: bool = Field(
        True, description="Start a local tritonserver (the nvidia-pytriton wheel) with the edge; false when Triton "
                          "runs elsewhere (docker, Kubernetes).")

    # Conversation
    greeting: str = Field("Hi, thanks for calling! How can I help you today?",
                          description="Spoken when the call connects; empty to wait for the caller to speak first.")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System message for the llm.")
    llm_max_tokens: int = Field(120, ge=1, le=1024,
                                description="Longest reply, in tokens; a sentence it cuts short is not spoken.")
    llm_temperature: float = Field(0.6, ge=0.0, le=2.0, description="Sampling temperature of the llm.")
    history_max_tokens: int = Field(
        1500, ge=64, description="Conversation history kept for the llm, estimated in tokens (~4 characters each); "
                                 "the oldest turns go first, the system prompt always stays.")
    idle_prompt_seconds: float = Field(
        8.0, gt=0, description="Silence (caller and agent) after which the agent says IDLE_PROMPT_TEXT; after the "
                               "same silence again it says IDLE_HANGUP_TEXT and hangs up.")
    idle_prompt_text: str = Field("Are you still there?", description="Said after IDLE_PROMPT_SECONDS of silence.")
    idle_hangup_text: str = Field("I haven't heard anything, so I'll hang up now. Goodbye!",
                                  description="Said before hanging up on a silent line.")
    llm_first_token_timeout: float = Field(
        2.5, gt=0, description="Seconds to wait for the llm's first text before saying FILLER_TEXT (once per turn).")
    filler_text: str = Field("Sorry, give me a moment.", description="Said when the llm is slow to start.")
    apology_text: str = Field("Sorry, I'm having trouble right now. Could you say that again?",
                              description="Said when a model fails during a turn.")

    # Voice and timing
    tts_rate: float = Field(1.0, gt=0.25, le=4.0, description="Speaking rate passed to the tts model (1.0 = normal).")
    tts_voice: str | None = Field(None, description="Voice passed to the tts model; unset = the engine's default.")
    outbound_lead_ms: int = Field(
        80, ge=0, le=1000, description="How far ahead of real time outbound audio is sent to Twilio: enough to ride "
                                       "out network jitter, small enough that a barge-in clear drops little.")
    asr_speech_batch_ms: int = Field(
        200, ge=20, le=1000, description="Caller audio goes to asr in requests of this many ms while the caller "
                                         "talks and the agent is quiet: nothing waits on their words until they "
                                         "pause (from 60 ms of quiet on it goes in ASR_BATCH_MS), and each request "
                                         "costs the edge and Triton a gRPC write.")
    asr_batch_ms: int = Field(
        40, ge=20, le=200, description="The same for sound over the agent's voice (words that may interrupt it) and "
                                       "for the silence at the end of the caller's speech (the asr counts it); the "
                                       "frame that brings sound to a quiet line goes at once.")
    asr_quiet_batch_ms: int = Field(
        1000, ge=20, le=2000, description="The same on a quiet line (line noise is quiet). A turn's endpoint waits on "
                                          "no batch: audio goes at once when it reaches a time at which the asr may "
                                          "end the turn (its speech_stop's endpoint_ms).")
    tts_ahead_s: float = Field(
        3.0, ge=0.5, le=60, description="The next clause goes to tts when less than this much of the reply's audio "
                                        "is waiting to be sent: enough to ride out a slow clause, and a barge-in "
                                        "leaves little synthesized for nothing.")
    barge_in_min_speech_ms: int = Field(
        250, ge=0, description="Caller speech needed while the agent talks before it counts as an interruption.")
    barge_in_wait_words_ms: int = Field(
        400, ge=0, description="After BARGE_IN_MIN_SPEECH_MS of caller speech over the agent, how much longer to "
                               "wait for words (a partial transcript) before interrupting on duration alone.")
    backchannels: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_BACKCHANNELS, description="Comma-separated words that, said alone while the agent talks, do not "
                                          "interrupt it (case and punctuation ignored).")
    false_interruption_ms: int = Field(
        700, ge=0, description="After the agent stops for an interruption, how long it waits for words; if none "
                               "come (a cough, noise) it resumes where it was cut off.")

    # Operations
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    traces: Literal["none", "console", "otlp"] = Field(
        "none", description="Per-turn OpenTelemetry spans: none, console (stdout), or otlp (needs "
                            "opentelemetry-exporter-otlp; the standard OTEL_EXPORTER_OTLP_ENDPOINT, "
                            "OTEL_SERVICE_NAME etc. configure it).")
    metrics: bool = Field(True, description="Serve Prometheus metrics on /metrics.")

    @field_validator("backchannels", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        return tuple(w for w in (" ".join(str(v).lower().split()) for v in value) if w)

    @field_validator("public_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("PUBLIC_URL must be an absolute http(s) URL, e.g. https://agent.example.com")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("PUBLIC_URL must not carry a query, fragment or credentials")
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"

    @model_validator(mode="after")
    def _signatures_in_public(self) -> "Settings":
        if self.public_url is None:
            self.public_url = f"http://127.0.0.1:{self.edge_port}"
        if not signatures_required(self) and not self.allow_unsigned and not _is_local(self.public_url):
            raise ValueError(f"PUBLIC_URL {self.public_url} is public but TWILIO_AUTH_TOKEN is unset: anyone could "
                             "call the agent. Set TWILIO_AUTH_TOKEN (or ALLOW_UNSIGNED=true for a throwaway test).")
        return self


def _is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def signatures_required(settings: Settings) -> bool:
    """Whether Twilio signatures are checked (TWILIO_AUTH_TOKEN is set)."""
    token = settings.twilio_auth_token
    return token is not None and bool(token.get_secret_value())


def public_url(settings: Settings, path: str) -> str:
    """The public http(s) URL of `path` on this edge (path may carry a query string), from PUBLIC_URL alone."""
    return settings.public_url + "/" + path.lstrip("/")


def media_url(settings: Settings) -> str:
    """The <Stream url> Twilio connects to, and signs the WebSocket upgrade with: wss://<public host>/media."""
    url = public_url(settings, "/media")
    return "wss" + url[len("https"):] if url.startswith("https:") else "ws" + url[len("http"):]


def markdown_table() -> str:
    """The README's settings table, made from the fields' descriptions (`python -m edge.settings`)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "(unset)" if default is None else ("(long text)" if len(str(default)) > 40 else str(default))
        rows.append(f"| `{name.upper()}` | `{shown}` | {field.description} |".replace("``", "` `"))
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
