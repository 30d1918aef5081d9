"""Barge-in: how fast the agent stops when the caller talks over it, and how often it stops for nothing.

    python -m perf.bargein [--runs 3] [--out perf/results] [--set SETTING=VALUE ...] [--line-noise-dbfs DB]
                           [--triton-url host:port --metrics-url URL]

Without --triton-url it starts its own tritonserver (CPU profile, model_repository/, free ports); the real
edge runs in this process (like the tests), asked for long stories (LONG_REPLIES_PROMPT, up to 512 tokens,
temperature 0) so every reply is still being written and spoken when the caller talks. Each run is two
simulated Twilio calls (edge/simulate.py):

speech     A question, then each of the INTERRUPTIONS (shared recordings of real speech) talking over the
           reply to the one before, 0.6-2.0 s into it.
overlaps   A question, then sounds that must NOT interrupt, each 0.8 s into the reply (still the same
           long reply when nothing interrupts it): backchannels said by the project's own tts ("Yeah.",
           "Okay.", "Uh-huh.", "Mm-hmm.", "Right.") and white noise at speech level (150 and 700 ms).
The CPU llm (SmolLM2-135M) imitates the cut-off replies it finds in its history, and after a few
interruptions its replies shrink to a few words; so in these calls it sees the system prompt and the
caller's last words only (the edge's `Call._context`, patched here), and every reply is a long story.

Measured per interruption:
  onset -> clear      simulator: the caller's first frame of speech (as sent) -> `clear` received
                      edge: the speech onset the asr's VAD reported (when that audio reached the edge) ->
                      `clear` sent (its `barge_in` log record, `onset_to_clear_ms`)
  where it goes       edge: onset -> the asr's `speech_start` event, and -> the first partial transcript
  clear -> stopped    Triton's `voice_last_cancel_stop_seconds{model}` (when the engine stopped a cancelled
                      request, scraped every 40 ms) - the time the simulator received `clear`, for the llm
                      and the tts request in flight then (`voice_requests_active` > 0 just before)
Per overlap: whether a `clear` came while it was said or within 2 s after (a false interruption).

Writes <out>/bargein-<UTC stamp>.json and bargein-latest.json and prints a table; if the tritonserver it
started dies, it stops after that run, saves nothing and exits with the end of the server's log. Goal on the
CPU profile: onset -> clear p95 <= BARGE_IN_MIN_SPEECH_MS + 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from edge.app import PHRASES, SETTINGS, create_app
from edge.call import Call
from edge.settings import Settings
from edge.simulate import CallerTurn
from edge.tritonserver import free_port
from perf.common import ROOT, command_line, machine_info, save_results, stats
from tests.barge import (INTERRUPTIONS, LONG_REPLIES_PROMPT, CancelWatch, caller, run_call, speech_level, synthesize,
                         white_noise)

QUESTION = "tt-weasels"
BACKCHANNELS = ("Yeah.", "Okay.", "Uh-huh.", "Mm-hmm.", "Right.")
NOISES_MS = (150, 700)
NO_GREETING = {"params": {"greeting": ""}, "wait_for_greeting": False}
LATE_CLEAR_S = 2.0  # a clear this long after an overlap ended still counts against it (the asr's final)
CANCEL_WITHIN_S = 1.5  # a request in flight at the clear whose cancellation shows later is counted as not cancelled


class EdgeLog(logging.Handler):
    """The edge's `edge.call` records (asr events included), stamped with the monotonic and Unix time they
    were written."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, float, dict]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("{"):
            self.records.append((time.monotonic(), time.time(), json.loads(message)))

    def of(self, call_sid: str, event: str) -> list[tuple[float, float, dict]]:
        return [r for r in self.records if r[2].get("call") == call_sid and r[2].get("event") == event]


async def start_edge(triton_url: str, overrides: dict[str, str]) -> tuple[web.AppRunner, web.Application, str]:
    values = dict(triton_url=triton_url, edge_port=free_port(), start_triton=False, llm_max_tokens=512,
                  llm_temperature=0.0, system_prompt=LONG_REPLIES_PROMPT, idle_prompt_seconds=60.0)
    settings = Settings(**{**values, **overrides})
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.edge_port).start()
    deadline = time.monotonic() + 300
    while app[PHRASES].get(settings.greeting) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the edge could not synthesize its fixed phrases")
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # the warm-up also puts the system prompt in the llm's cache
    return runner, app, f"ws://127.0.0.1:{settings.edge_port}/media"


@contextlib.contextmanager
def history_free():
    """The llm sees the system prompt and the caller's last words only (see the module docstring)."""
    context = Call._context
    Call._context = lambda call: [{"role": "system", "content": call.settings.system_prompt}]
    try:
        yield
    finally:
        Call._context = context


async def speech_call(url: str, metrics_url: str, log: EdgeLog, run: int, line_noise_dbfs: float | None) -> list[dict]:
    """One call: a question, then every interruption talking over the reply to the one before."""
    names = [INTERRUPTIONS[(run + i) % len(INTERRUPTIONS)] for i in range(len(INTERRUPTIONS))]
    delays = [600 + (run * 7 + i * 3) % 8 * 200 for i in range(len(names))]  # 0.6-2.0 s, varied per run
    turns = [caller(QUESTION)] + [CallerTurn(caller(n), name=n, barge_in_ms=d) for n, d in zip(names, delays)]
    cancels = await CancelWatch(metrics_url).start_now()
    try:
        with history_free():
            report = await run_call(url, turns, hangup_after_reply_ms=600, line_noise_dbfs=line_noise_dbfs,
                                    **NO_GREETING)
    finally:
        await cancels.stop()
    barge_ins = log.of(report.call_sid, "barge_in")
    starts = log.of(report.call_sid, "asr")
    samples = []
    for turn, delay in zip(report.turns[1:], delays):
        # over the reply: the agent was heard in the half second before the caller began (a pause between its
        # clauses does not make the caller's speech a new turn; the reply having ended does)
        audible = turn.speech_start is not None and report.agent_heard(turn.speech_start - 0.5, turn.speech_start)
        sample = {"run": run, "recording": turn.name, "barge_in_ms": delay, "agent_audible": audible,
                  "clears": turn.clears,
                  "sim_onset_to_clear_ms": turn.clear_after_speech_ms, "sim_onset_to_quiet_ms": turn.silent_after_speech_ms,
                  "max_tick_lag_ms": report.max_tick_lag_ms}
        if turn.clear_after_speech_ms is not None and barge_ins:
            clear = turn.speech_start + turn.clear_after_speech_ms / 1000
            clear_unix = report.started_unix + clear
            # the edge's record of this barge-in: the one logged closest to the clear's arrival
            mono, unix, record = min(barge_ins, key=lambda r: abs(r[1] - clear_unix))
            onset = mono - record["onset_to_clear_ms"] / 1000
            sample.update(edge_onset_to_clear_ms=record["onset_to_clear_ms"], why=record["why"],
                          sim_minus_edge_ms=round(turn.clear_after_speech_ms - record["onset_to_clear_ms"], 1))
            events = [(m, e) for m, _, e in starts if onset - 0.05 <= m <= mono]
            vad = next((m for m, e in events if e["type"] == "speech_start"), None)
            partial = next((m for m, e in events if e["type"] == "partial"), None)
            sample["onset_to_speech_start_event_ms"] = round((vad - onset) * 1000, 1) if vad else None
            sample["onset_to_first_partial_ms"] = round((partial - onset) * 1000, 1) if partial else None
            sample["partials_before_clear"] = [(round((m - onset) * 1000), e["text"]) for m, e in events
                                               if e["type"] == "partial"]
            for model in ("llm", "tts"):
                if cancels.in_flight_at(model, clear_unix):
                    stop = cancels.stop_after(model, clear_unix, within=CANCEL_WITHIN_S)
                    sample[f"clear_to_{model}_stop_ms"] = round((stop - clear_unix) * 1000, 1) if stop else None
                    sample[f"{model}_cancelled"] = stop is not None
        if not turn.clears:  # what the edge made of speech that did not stop it
            start = report.started_unix + turn.speech_start
            sample["edge_records"] = [e for _, unix, e in log.records if e.get("call") == report.call_sid
                                      and start - 0.5 <= unix <= start + 4
                                      and (e.get("event") != "asr" or e.get("type") in ("partial", "final"))]
        samples.append(sample)
    return samples


async def overlap_call(url: str, log: EdgeLog, run: int, sounds: dict[str, object],
                       line_noise_dbfs: float | None) -> list[dict]:
    """One call: a question, then each sound said 0.8 s into the reply; none of them should stop it."""
    names = list(sounds)
    names = names[run % len(names):] + names[:run % len(names)]
    turns = [caller(QUESTION)] + [CallerTurn(sounds[n], name=n, barge_in_ms=800) for n in names]
    with history_free():
        report = await run_call(url, turns, hangup_after_reply_ms=1000, line_noise_dbfs=line_noise_dbfs,
                                **NO_GREETING)
    out = []
    for turn, next_start in zip(report.turns[1:], [t.started_at for t in report.turns[2:]] + [report.duration]):
        start, end = turn.started_at, min((turn.ended_at or turn.started_at) + LATE_CLEAR_S, next_start)
        clears = [c for c in report.clears if start <= c < end]
        window = (report.started_unix + start, report.started_unix + end)
        heard = [e["text"] for _, unix, e in log.of(report.call_sid, "asr")
                 if window[0] <= unix < window[1] and e["type"] in ("partial", "final")]
        why = [e["why"] for _, unix, e in log.of(report.call_sid, "barge_in") if window[0] <= unix < window[1]]
        paused = [u for _, u, e in log.of(report.call_sid, "paused") if window[0] <= u < window[1]]
        unpaused = [u for _, u, e in log.of(report.call_sid, "unpaused") if paused and paused[0] <= u < window[1] + 2]
        out.append({"run": run, "sound": turn.name, "kind": "noise" if turn.name.startswith("noise") else "backchannel",
                    "agent_audible": turn.barge_in, "false_interruption": bool(clears), "why": why,
                    "paused_ms": round((unpaused[0] - paused[0]) * 1000) if paused and unpaused else None,
                    "asr_heard": heard, "max_tick_lag_ms": report.max_tick_lag_ms})
    return out


def summarize(speech: list[dict], overlaps: list[dict], min_speech_ms: int) -> dict:
    interruptions = [s for s in speech if s["agent_audible"]]  # else the reply had already ended: no barge-in
    cleared = [s for s in interruptions if s["sim_onset_to_clear_ms"] is not None]
    summary = {
        "interruptions": len(interruptions), "interruptions_cleared": len(cleared),
        "spoken_after_the_reply": len(speech) - len(interruptions),
        "sim_onset_to_clear_ms": stats([s["sim_onset_to_clear_ms"] for s in cleared]),
        "sim_onset_to_quiet_ms": stats([s.get("sim_onset_to_quiet_ms") for s in cleared]),
        "edge_onset_to_clear_ms": stats([s.get("edge_onset_to_clear_ms") for s in cleared]),
        "edge_onset_to_speech_start_event_ms": stats([s.get("onset_to_speech_start_event_ms") for s in cleared]),
        "edge_onset_to_first_partial_ms": stats([s.get("onset_to_first_partial_ms") for s in cleared]),
        "why": {w: sum(s.get("why") == w for s in cleared) for w in ("words", "duration", "final")},
        "clear_to_llm_stop_ms": stats([s.get("clear_to_llm_stop_ms") for s in cleared if "clear_to_llm_stop_ms" in s]),
        "clear_to_tts_stop_ms": stats([s.get("clear_to_tts_stop_ms") for s in cleared if "clear_to_tts_stop_ms" in s]),
        "llm_in_flight_cancelled": f"{sum(s.get('llm_cancelled', False) for s in cleared)}/"
                                   f"{sum('llm_cancelled' in s for s in cleared)}",
        "tts_in_flight_cancelled": f"{sum(s.get('tts_cancelled', False) for s in cleared)}/"
                                   f"{sum('tts_cancelled' in s for s in cleared)}",
        "goal_ms": min_speech_ms + 150,
    }
    p95 = summary["sim_onset_to_clear_ms"].get("p95")
    summary["goal_met"] = p95 is not None and p95 <= summary["goal_ms"]
    rates = {}
    for key in sorted({o["sound"] for o in overlaps}) + ["backchannel", "noise", "all"]:
        group = [o for o in overlaps if key in (o["sound"], o["kind"], "all")]
        if group:
            rates[key] = {"n": len(group), "false_interruptions": sum(o["false_interruption"] for o in group),
                          "paused": sum(o.get("paused_ms") is not None for o in group),
                          "rate": round(sum(o["false_interruption"] for o in group) / len(group), 3)}
    summary["false_interruptions"] = rates
    summary["max_tick_lag_ms"] = max([s["max_tick_lag_ms"] for s in speech + overlaps] or [0])
    return summary


def table(result: dict) -> str:
    s = result["summary"]

    def row(name, st, note=""):
        if not st or not st.get("n"):
            return f"| {name} | 0 | | | | {note} |"
        return f"| {name} | {st['n']} | {st['p50']:.0f} | {st['p95']:.0f} | {st['max']:.0f} | {note} |"

    lines = ["| barge-in | n | p50 ms | p95 ms | max ms | notes |", "|---|---|---|---|---|---|",
             row("caller onset -> `clear` received (simulator)", s["sim_onset_to_clear_ms"],
                 f"goal p95 <= {s['goal_ms']} ms: {'met' if s['goal_met'] else 'NOT met'}; "
                 f"{s['interruptions_cleared']}/{s['interruptions']} interruptions cleared"
                 + (f" ({s['spoken_after_the_reply']} spoken after the reply had ended)"
                    if s.get("spoken_after_the_reply") else "")),
             row("caller onset -> agent quiet, as heard (simulator)", s["sim_onset_to_quiet_ms"],
                 "start of 400 ms without its voice in the played audio"),
             row("VAD onset -> `clear` sent (edge)", s["edge_onset_to_clear_ms"],
                 ", ".join(f"{k} {v}" for k, v in s["why"].items())),
             row("VAD onset -> `speech_start` event at the edge", s["edge_onset_to_speech_start_event_ms"]),
             row("VAD onset -> first partial transcript at the edge", s["edge_onset_to_first_partial_ms"]),
             row("`clear` -> llm engine stopped", s["clear_to_llm_stop_ms"],
                 f"in flight and cancelled: {s['llm_in_flight_cancelled']}"),
             row("`clear` -> tts engine stopped", s["clear_to_tts_stop_ms"],
                 f"in flight and cancelled: {s['tts_in_flight_cancelled']}"),
             "", "| over the reply | n | false interruptions (`clear`) | rate | paused, then went on |",
             "|---|---|---|---|---|"]
    for key, r in s["false_interruptions"].items():
        lines.append(f"| {key} | {r['n']} | {r['false_interruptions']} | {r['rate']:.0%} | {r.get('paused', '')} |")
    return "\n".join(lines)


class TritonDied(RuntimeError):
    """The tritonserver started here died during the runs: what they measured after it is not barge-in."""


async def run(triton_url: str, metrics_url: str, runs: int, overrides: dict[str, str],
              line_noise_dbfs: float | None, alive=lambda: True) -> dict:
    log = EdgeLog()
    edge_logger = logging.getLogger("edge.call")
    edge_logger.setLevel(logging.DEBUG)
    edge_logger.addHandler(log)
    edge_logger.propagate = False
    runner, app, url = await start_edge(triton_url, overrides)
    try:
        level = speech_level(caller(QUESTION))
        sounds = {text: await synthesize(triton_url, text) for text in BACKCHANNELS}
        sounds.update({f"noise {ms} ms": white_noise(ms, level, seed=ms) for ms in NOISES_MS})
        speech, overlaps = [], []
        for i in range(runs):
            t = time.perf_counter()
            speech += await speech_call(url, metrics_url, log, i, line_noise_dbfs)
            overlaps += await overlap_call(url, log, i, sounds, line_noise_dbfs)
            if not alive():
                raise TritonDied(f"tritonserver died during run {i + 1}")
            print(f"run {i + 1}/{runs} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    finally:
        await runner.cleanup()
        edge_logger.removeHandler(log)
    settings = app[SETTINGS]
    return {"settings": settings.model_dump(include={"barge_in_min_speech_ms", "barge_in_wait_words_ms",
                                                     "false_interruption_ms", "outbound_lead_ms", "backchannels",
                                                     "llm_max_tokens", "llm_temperature", "system_prompt"}),
            "summary": summarize(speech, overlaps, settings.barge_in_min_speech_ms),
            "speech": speech, "overlaps": overlaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="each run: one call of 8 interruptions, one of 7 overlaps")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--triton-url", help="host:port of a running server's gRPC; default: start one here")
    parser.add_argument("--metrics-url", help="that server's /metrics URL (with --triton-url)")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="an edge setting to try, e.g. --set barge_in_wait_words_ms=150 (repeatable)")
    parser.add_argument("--line-noise-dbfs", type=float,
                        help="background noise on the caller's line, RMS dBFS (e.g. -50; default: digital silence)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    machine = machine_info()
    started = time.perf_counter()
    if args.triton_url:
        if not args.metrics_url:
            parser.error("--triton-url needs --metrics-url")
        server_info = {"url": args.triton_url, "started_here": False}
        result = asyncio.run(run(args.triton_url, args.metrics_url, args.runs, overrides, args.line_noise_dbfs))
    else:
        from edge.tritonserver import TritonServer

        log = Path(tempfile.mkdtemp(prefix="perf-bargein-")) / "tritonserver.log"
        server = TritonServer("cpu", free_port(), free_port(), free_port(), log_file=log)
        print(f"starting tritonserver (cpu), log {log}", file=sys.stderr, flush=True)
        server.start(timeout=900)
        try:
            server_info = {"url": server.grpc_url, "started_here": True, "profile": "cpu", "log": str(log)}
            result = asyncio.run(run(server.grpc_url, server.metrics_url, args.runs, overrides, args.line_noise_dbfs,
                                     alive=lambda: server.process.poll() is None))
        except TritonDied as e:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            sys.exit(f"{e} (exit status {server.process.returncode}); nothing saved. End of {log}:\n{tail}")
        finally:
            server.stop()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"command": command_line(), "machine": machine, "server": server_info,
              "line_noise_dbfs": args.line_noise_dbfs,
              "wall_s": round(time.perf_counter() - started, 1), **result}
    save_results(result, args.out, "bargein", table)


if __name__ == "__main__":
    main()
