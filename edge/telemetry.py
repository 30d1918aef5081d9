"""Per-turn timings and call counters: Prometheus on /metrics, OpenTelemetry spans, one JSON log line a turn.

A turn's timeline (all monotonic seconds, None when a stage did not happen):
speech_end (the caller's last speech, from the asr event) -> final (final
transcript at the edge) -> llm_first_token -> first_clause -> tts_first_audio
-> first_frame (first reply frame sent to Twilio). voice-to-voice is
first_frame - speech_end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("edge.turn")
tracer = trace.get_tracer("edge")

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)

STAGE_SECONDS = Histogram("edge_turn_stage_seconds", "Time spent in each stage of a turn", ["stage"], buckets=_BUCKETS)
CALLS_ACTIVE = Gauge("edge_calls_active", "Calls connected now")
CALLS_TOTAL = Counter("edge_calls_total", "Calls accepted")
CALL_ERRORS = Counter("edge_call_errors_total", "Calls ended by an error", ["kind"])
MESSAGES_DROPPED = Counter("edge_messages_dropped_total", "Twilio messages dropped as malformed")
LINE_FILLED_SECONDS = Counter("edge_line_filled_seconds_total",
                              "Caller audio that never came (a stalled line), taken as silence")
BARGE_INS = Counter("edge_barge_ins_total", "Interruptions by the caller", ["outcome"])
SPECULATIONS = Counter("edge_speculative_replies_total", "Replies started at a pause, before the final transcript",
                       ["outcome"])
LOOP_LAG_SECONDS = Histogram("edge_event_loop_lag_seconds", "How late the event loop woke a 10 ms timer",
                             buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
BARGE_IN_SECONDS = Histogram("edge_barge_in_seconds", "Caller speech onset to clear sent", buckets=_BUCKETS)


@dataclass
class TurnTimes:
    speech_end: float | None = None
    final: float | None = None
    llm_request: float | None = None
    llm_first_token: float | None = None
    first_clause: float | None = None
    tts_first_audio: float | None = None
    first_frame: float | None = None

    def stages(self) -> dict[str, float]:
        """Durations of the stages that happened, in seconds."""
        pairs = {
            "endpoint_and_final": (self.speech_end, self.final),
            "llm_first_token": (self.llm_request, self.llm_first_token),
            "first_clause": (self.llm_first_token, self.first_clause),
            "tts_first_audio": (self.first_clause, self.tts_first_audio),
            "first_frame": (self.tts_first_audio, self.first_frame),
            "voice_to_voice": (self.speech_end, self.first_frame),
        }
        return {k: b - a for k, (a, b) in pairs.items() if a is not None and b is not None}


def record_turn(call_sid: str, turn: int, times: TurnTimes, **extra) -> dict:
    """Export one finished turn: histograms, a span with the stage timestamps, a structured log line."""
    stages = times.stages()
    for stage, seconds in stages.items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    wall = time.time() - time.monotonic()  # monotonic -> Unix time for the span
    start = times.speech_end or times.final
    if start is not None:
        span = tracer.start_span("turn", start_time=int((start + wall) * 1e9),
                                 attributes={"call.sid": call_sid, "turn": turn,
                                             **{f"stage.{k}_ms": round(v * 1000, 1) for k, v in stages.items()}})
        span.end(end_time=int(((times.first_frame or time.monotonic()) + wall) * 1e9))
    record = {"event": "turn", "call": call_sid, "turn": turn,
              **{f"{k}_ms": round(v * 1000, 1) for k, v in stages.items()}, **extra}
    log.info(json.dumps(record))
    return record


async def watch_loop_lag(interval: float = 0.01) -> None:
    """Export how late the event loop runs: every call's 20 ms pacing depends on it."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        LOOP_LAG_SECONDS.observe(max(loop.time() - start - interval, 0.0))


def setup_tracing(exporter: str) -> None:
    """`console` prints spans; `otlp` sends them to OTEL_EXPORTER_OTLP_ENDPOINT; `none` keeps them in process."""
    provider = TracerProvider(resource=Resource.create({"service.name": "phone-agent-edge"}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
