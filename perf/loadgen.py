"""Voice-to-voice under load: N simulated Twilio calls at once against the whole agent, with real speech.

    python -m perf.loadgen [--calls 1,2] [--turns-per-call 3] [--rounds 1] [--barge-in] [--out perf/results]
    python -m perf.loadgen --edge-url ws://127.0.0.1:8080/media ...   # an edge that is already running

Without --edge-url it starts its own tritonserver (CPU profile, model_repository/,
free ports) and the real edge in this process, and reads the edge's own
per-turn timings from its `edge.turn` log records (and barge-ins from
`edge.call`). With --edge-url it scrapes that edge's /metrics before and after
each level instead (histograms `edge_turn_stage_seconds{stage}` and
`edge_barge_in_seconds`: quantiles from buckets, no per-turn join).

For each N in --calls (and each of --rounds), N calls run concurrently, started
0.5 s apart, through edge/simulate.py (`run_call`): each waits for the greeting,
then says --turns-per-call turns, each a shared recording (../shared/audio,
resampled to 8 kHz, different per call and turn) after a pause of 0.5-1.2 s of
quiet once the reply has played, or with --barge-in (turns after the first)
0.6-1.2 s into the agent's reply, talking over it. --line-noise-dbfs puts
background noise on every caller's line (under the speech and in the pauses).

Per turn:
  voice-to-voice   simulator: the caller's last frame of speech -> the first
                   reply frame with sound arriving (what the edge controls);
                   `heard` adds Twilio's playback buffer
  stages           the edge's own: endpoint_and_final (its VAD speech end ->
                   final transcript), llm_first_token, first_clause,
                   tts_first_audio, first_frame; and its own voice_to_voice
  barge-in         caller speech onset -> `clear` (simulator), -> the agent
                   quiet as heard (simulator), onset -> clear sent (edge)
  glitches         gaps > 60 ms between the reply's frames while it plays
  underruns        60 ms+ of silence heard inside a reply that the agent did not send
                   (Twilio's buffer dry while the reply still came in)
  unanswered       no audible reply before the next turn (or hang-up)
Levels where the simulator's own clock ran late (max_tick_lag_ms over
--max-tick-lag-ms) are flagged: their timings carry that lateness.

It prints p50/p95 per N and writes <out>/loadgen-<UTC date>.json,
loadgen-latest.json, loadgen-latest.png (voice-to-voice distribution per N and
a waterfall of the p50 stage durations), with machine facts and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge import audio
from edge.simulate import CallerTurn, run_call
from edge.tritonserver import free_port
from perf.common import (GLITCH_GAP_MS, ROOT, CpuTracker, GcPauses, LoopLag, busy_processes, callers_session,
                         command_line, histogram_delta, histogram_quantile, histograms, machine_cpu, machine_info,
                         reply_gaps, save_results, scrape, stats, wait_quiet)
from tests.speech import recordings

STAGES = ("endpoint_and_final", "llm_first_token", "first_clause", "tts_first_audio", "first_frame")
STAGGER_S = 0.5
GC = GcPauses()


# ---------------------------------------------------------------- the edge, in this process

class Capture(logging.Handler):
    """Keeps the edge's JSON log records: `turn` (edge.turn) and `barge_in` (edge.call)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = json.loads(record.getMessage())
        except ValueError:
            return
        if isinstance(data, dict) and data.get("event") in ("turn", "barge_in", "llm_failed", "tts_failed",
                                                              "asr_failed", "call_failed", "task_failed"):
            data["_t"] = time.time()
            self.records.append(data)


class InProcessEdge:
    """The real aiohttp edge on a free port, in this event loop (as tests/conftest.py runs it)."""

    def __init__(self, settings):
        from edge.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        self.ws_url = f"ws://127.0.0.1:{settings.edge_port}/media"
        self.metrics_url = f"http://127.0.0.1:{settings.edge_port}/metrics"
        self._runner = None

    async def start(self, timeout: float = 300.0) -> "InProcessEdge":
        from aiohttp import web

        from edge.app import PHRASES

        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.settings.edge_port).start()
        deadline = time.monotonic() + timeout
        while self.app[PHRASES].get(self.settings.greeting) is None:  # greeting synthesized, prompt cached
            if time.monotonic() > deadline:
                raise TimeoutError("the edge could not synthesize its fixed phrases")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the system prompt's llm warm-up finishes right after the phrases
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


# ---------------------------------------------------------------- one level

def caller_pool(max_seconds: float) -> list[tuple[str, np.ndarray]]:
    pool = []
    for rec in recordings():
        samples, rate = rec.samples()
        if len(samples) / rate <= max_seconds:
            pool.append((rec.name, audio.resample(samples, rate, audio.TWILIO_RATE)))
    return pool


def plan_calls(n: int, turns: int, pool, rng: random.Random, barge_in: bool) -> list[list[CallerTurn]]:
    order = list(range(len(pool)))
    rng.shuffle(order)
    plans, k = [], 0
    for _ in range(n):
        plan = []
        for j in range(turns):
            name, samples = pool[order[k % len(order)]]
            k += 1
            plan.append(CallerTurn(samples, name=name, pause_ms=rng.uniform(500, 1200),
                                   barge_in_ms=rng.uniform(600, 1200) if barge_in and j > 0 else None))
        plans.append(plan)
    return plans


def scrape_edge(metrics_url: str) -> dict:
    text = scrape(metrics_url)
    return {"stages": histograms(text, "edge_turn_stage_seconds", "stage"),
            "barge_in": histograms(text, "edge_barge_in_seconds")}


def turn_rows(n: int, round_: int, index: int, report, edge_records: list[dict] | None) -> list[dict]:
    """One row per caller turn, joined with the edge's record of the turn it answered."""
    replies = {r["reply"]: r for r in reply_gaps(report)}
    turns_logged = sorted((r for r in edge_records or [] if r["event"] == "turn" and r["call"] == report.call_sid),
                          key=lambda r: r["turn"])
    barges = [r for r in edge_records or [] if r["event"] == "barge_in" and r["call"] == report.call_sid]
    by_number = {r["turn"]: r for r in turns_logged}
    rows = []
    barge_k = 0
    for t in report.turns:
        gaps = replies.get(f"turn{t.index}", {}).get("gaps", np.zeros(0))
        row = {"calls": n, "round": round_, "call": index, "turn": t.index, "recording": t.name,
               "voice_to_voice_ms": _r(t.voice_to_voice_ms), "heard_voice_to_voice_ms": _r(t.heard_voice_to_voice_ms),
               "answered": t.voice_to_voice_ms is not None, "reply_audio_ms": _r(t.reply_audio_ms),
               "glitches": int((gaps > GLITCH_GAP_MS).sum()), "reply_max_gap_ms": _r(t.reply_max_gap_ms),
               "underruns": t.reply_underruns,
               "barge_in": t.barge_in, "clear_after_speech_ms": _r(t.clear_after_speech_ms) if t.barge_in else None,
               "quiet_after_speech_ms": _r(t.silent_after_speech_ms) if t.barge_in else None}
        if edge_records is not None:
            edge = by_number.get(t.index + 1)  # the edge numbers committed turns from 1
            if edge:
                row["edge"] = {k: v for k, v in edge.items() if k.endswith("_ms")}
                row["edge_heard"] = edge.get("heard")
                row["edge_interrupted"] = edge.get("interrupted")
            if t.barge_in and barge_k < len(barges):
                row["edge_barge_in_onset_to_clear_ms"] = barges[barge_k]["onset_to_clear_ms"]
                barge_k += 1
        rows.append(row)
    return rows


def _r(v):
    return round(v, 1) if isinstance(v, float) else v


async def level(n: int, round_: int, args, pool, url: str, edge_metrics: str | None, capture: Capture | None,
                rng: random.Random, ours: CpuTracker, lag: LoopLag) -> dict:
    plans = plan_calls(n, args.turns_per_call, pool, rng, args.barge_in)
    before = scrape_edge(edge_metrics) if capture is None and edge_metrics else None
    first_record = len(capture.records) if capture else 0
    lag.take()
    first_stall, first_gc = len(lag.stalls), len(GC.pauses)
    cpu0, m0, t0 = ours.read()["ours"], machine_cpu(), time.monotonic()

    async def one(i: int, turns):
        await asyncio.sleep(i * STAGGER_S)
        return await run_call(url, turns, session=session, reply_timeout_s=args.reply_timeout,
                              timeout_s=args.call_timeout, line_noise_dbfs=args.line_noise_dbfs)

    async with callers_session() as session:
        reports = await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)), return_exceptions=True)
    await asyncio.sleep(0.5)  # the last turn's record is logged once its reply has played
    wall = time.monotonic() - t0
    cpu1, m1 = ours.read()["ours"], machine_cpu()
    records = capture.records[first_record:] if capture else None
    rows, errors, tick_lag = [], [], []
    for i, r in enumerate(reports):
        if isinstance(r, BaseException):
            errors.append(f"call {i}: {r!r}")
            continue
        errors += [f"call {i}: {e}" for e in r.errors]
        tick_lag.append(r.max_tick_lag_ms)
        rows += turn_rows(n, round_, i, r, records)
    loop_lag = [x * 1000 for x in lag.take()]
    result = {"calls": n, "round": round_, "wall_s": round(wall, 1), "turns": rows, "errors": errors,
              "max_tick_lag_ms": round(max(tick_lag, default=0.0), 1),
              "loop_lag_ms": stats(loop_lag),  # this process's loop: the simulator's and (in-process) the edge's
              "loop_stalls": [(round(t, 3), round(s * 1000)) for t, s in lag.stalls[first_stall:]],
              "gc_pauses_ms": stats([p * 1000 for _, _, p in GC.pauses[first_gc:]]),
              "cores": {"ours": round((cpu1 - cpu0) / wall, 2),
                        "machine_busy": round((m1["busy"] - m0["busy"]) / wall, 2),
                        "steal": round((m1["steal"] - m0["steal"]) / wall, 2)}}
    result["cores"]["others"] = round(max(result["cores"]["machine_busy"] - result["cores"]["ours"], 0.0), 2)
    if records is not None:
        result["edge_problems"] = [r for r in records if r["event"] not in ("turn", "barge_in")]
    if before is not None:
        after = scrape_edge(edge_metrics)
        result["edge_histograms"] = {"stages": histogram_delta(after["stages"], before["stages"]),
                                     "barge_in": histogram_delta(after["barge_in"], before["barge_in"])}
    return result


# ---------------------------------------------------------------- summary, table, plots

def summarize(levels: list[dict], args) -> dict:
    out = {}
    for n in sorted({lv["calls"] for lv in levels}):
        crashed = [lv for lv in levels if lv["calls"] == n and lv.get("triton_crashed")]
        mine = [lv for lv in levels if lv["calls"] == n and not lv.get("triton_crashed")]
        if not mine:
            out[str(n)] = {"turns": 0, "triton_crashes": len(crashed)}
            continue
        rows = [row for lv in mine for row in lv["turns"]]
        s = {"turns": len(rows), "triton_crashes": len(crashed), "unanswered": sum(not r["answered"] for r in rows),
             "voice_to_voice_ms": stats([r["voice_to_voice_ms"] for r in rows], (50, 95)),
             "heard_voice_to_voice_ms": stats([r["heard_voice_to_voice_ms"] for r in rows], (50, 95)),
             "glitches": sum(r["glitches"] for r in rows),
             "turns_with_glitches": sum(r["glitches"] > 0 for r in rows),
             "underruns": sum(r["underruns"] for r in rows),
             "barge_in_clear_ms": stats([r["clear_after_speech_ms"] for r in rows if r["barge_in"]], (50, 95)),
             "barge_in_quiet_ms": stats([r["quiet_after_speech_ms"] for r in rows if r["barge_in"]], (50, 95)),
             "max_tick_lag_ms": max(lv["max_tick_lag_ms"] for lv in mine),
             "errors": sum(len(lv["errors"]) for lv in mine),
             "cores_others_max": max(lv["cores"]["others"] for lv in mine)}
        s["tick_lag_flag"] = s["max_tick_lag_ms"] > args.max_tick_lag_ms
        if any("edge" in r for r in rows):
            s["source"] = "edge.turn log records"
            s["stages_ms"] = {st: stats([r["edge"].get(f"{st}_ms") for r in rows if "edge" in r], (50, 95))
                              for st in STAGES + ("voice_to_voice",)}
            s["edge_barge_in_ms"] = stats([r.get("edge_barge_in_onset_to_clear_ms") for r in rows], (50, 95))
        elif any("edge_histograms" in lv for lv in mine):
            s["source"] = "edge /metrics histograms (quantiles interpolated in buckets)"
            s["stages_ms"] = {}
            for st in STAGES + ("voice_to_voice",):
                hs = [lv["edge_histograms"]["stages"].get(st) for lv in mine]
                h = _merge([x for x in hs if x])
                s["stages_ms"][st] = _hist_stats(h)
            s["edge_barge_in_ms"] = _hist_stats(_merge([lv["edge_histograms"]["barge_in"].get("") for lv in mine
                                                        if lv["edge_histograms"]["barge_in"].get("")]))
        out[str(n)] = s
    return out


def _merge(hs: list[dict]) -> dict | None:
    if not hs:
        return None
    buckets: dict[float, float] = {}
    for h in hs:
        for le, c in h["buckets"]:
            buckets[le] = buckets.get(le, 0.0) + c
    return {"buckets": sorted(buckets.items()), "sum": sum(h["sum"] for h in hs), "count": sum(h["count"] for h in hs)}


def _hist_stats(h: dict | None) -> dict:
    if not h or not h["count"]:
        return {"n": 0}
    return {"n": int(h["count"]), "p50": round(histogram_quantile(h, 0.5) * 1000, 1),
            "p95": round(histogram_quantile(h, 0.95) * 1000, 1), "mean": round(h["sum"] / h["count"] * 1000, 1)}


def table(result: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.0f}"
    lines = [f"{'calls':>5} {'turns':>5} {'v2v p50':>7} {'v2v p95':>7} {'edge p50':>8} {'endpt':>6} {'llm ttft':>8} "
             f"{'clause':>6} {'tts tfa':>7} {'frame':>6} {'barge p50':>9} {'barge p95':>9} {'glitch':>6} "
             f"{'unans':>5} {'ticklag':>7}"]
    for n, s in result["summary"].items():
        if not s["turns"]:
            lines.append(f"{n:>5}     0  (tritonserver crashed in every run of this level: {s['triton_crashes']})")
            continue
        st = s.get("stages_ms", {})
        lines.append(f"{n:>5} {s['turns']:>5} {f(s['voice_to_voice_ms'].get('p50')):>7} "
                     f"{f(s['voice_to_voice_ms'].get('p95')):>7} {f(st.get('voice_to_voice', {}).get('p50')):>8} "
                     + " ".join(f"{f(st.get(k, {}).get('p50')):>{w}}" for k, w in
                                zip(STAGES, (6, 8, 6, 7, 6)))
                     + f" {f(s['barge_in_clear_ms'].get('p50')):>9} {f(s['barge_in_clear_ms'].get('p95')):>9} "
                       f"{s['glitches']:>6} {s['unanswered']:>5} {f(s['max_tick_lag_ms']):>7}"
                     + ("  FLAG: simulator clock late" if s["tick_lag_flag"] else "")
                     + (f"  ({s['triton_crashes']} run(s) left out: tritonserver crashed)" if s["triton_crashes"] else ""))
    m = result["machine"]
    lines.append(f"(ms; stages are the edge's own p50s; v2v = simulator: last caller speech frame -> first reply "
                 f"frame with sound) machine: {m['cpu']}, {m['cores_usable']} cores, load {m['loadavg_start']} at "
                 f"start, {m['date']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    ns = list(summary)
    rows = [row for lv in result["levels"] if not lv.get("triton_crashed") for row in lv["turns"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    data = [[r["voice_to_voice_ms"] for r in rows if str(r["calls"]) == n and r["voice_to_voice_ms"] is not None]
            for n in ns]
    a.boxplot([d or [np.nan] for d in data], whis=(5, 95), showfliers=False)
    a.set_xticks(range(1, len(ns) + 1), [f"{n} call{'s' if n != '1' else ''}" for n in ns])
    rng = np.random.default_rng(0)
    for k, d in enumerate(data, 1):
        a.scatter(k + rng.uniform(-0.12, 0.12, len(d)), d, s=14, alpha=0.6, color="C0")
    a.set_ylabel("voice-to-voice, ms (simulator)")
    a.set_title("Voice-to-voice per turn (box: p25-p75, whiskers p5-p95)")
    a.grid(axis="y", alpha=0.3)

    colors = {"endpoint_and_final": "C0", "llm_first_token": "C1", "first_clause": "C2", "tts_first_audio": "C3",
              "first_frame": "C4"}
    for k, n in enumerate(ns):
        st = summary[n].get("stages_ms") or {}
        left = 0.0
        for stage in STAGES:
            v = st.get(stage, {}).get("p50")
            if v is None:
                continue
            b.barh(k, v, left=left, color=colors[stage], label=stage if k == 0 else None)
            if v > 60:
                b.text(left + v / 2, k, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
            left += v
        v2v = summary[n]["voice_to_voice_ms"].get("p50")
        edge = st.get("voice_to_voice", {}).get("p50")
        if edge is not None:
            b.plot([edge], [k], "k|", ms=22, mew=2, label="edge voice-to-voice p50" if k == 0 else None)
        if v2v is not None:
            b.plot([v2v], [k], marker="v", ls="", color="white", mec="black", ms=10,
                   label="simulator voice-to-voice p50" if k == 0 else None)
    b.set_yticks(range(len(ns)), [f"{n} call{'s' if n != '1' else ''}" for n in ns])
    b.set_xlabel("ms after the caller stopped speaking")
    b.set_title("Where the time goes: p50 of each edge stage, stacked")
    b.legend(fontsize=7, loc="lower right")
    b.grid(axis="x", alpha=0.3)
    m = result["machine"]
    fig.suptitle(f"perf/loadgen.py: {m['cores_usable']} cores ({m['cpu']}), {m['date'][:16]}, "
                 f"{result['setup']['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

async def run(args, url: str, edge_metrics: str | None, capture: Capture | None, server=None) -> list[dict]:
    """Every level; with `server` (the tritonserver started here), a level during which it died is recorded
    as such, the server is started again on the same ports and the level runs again (at most twice more)."""
    pool = caller_pool(args.max_recording_s)
    rng = random.Random(args.seed)
    lag = LoopLag().start()
    levels = []
    restarted = False
    for n in args.calls:
        for round_ in range(1, args.rounds + 1):
            for attempt in range(3):
                ours = CpuTracker({"ours": os.getpid()}, trees=("ours",))  # this process and its tritonserver
                quiet = await wait_quiet(lambda: ours.read()["ours"], args.quiet_cores, args.wait_quiet_s) \
                    if args.wait_quiet_s > 0 else None
                print(f"{n} call(s), round {round_} ... {quiet or ''}", file=sys.stderr, flush=True)
                lv = await level(n, round_, args, pool, url, edge_metrics, capture, rng, ours, lag)
                lv["before"] = quiet
                lv["after_triton_restart"], restarted = restarted, False  # cold caches, calls' asr reconnecting
                lv["triton_crashed"] = server is not None and server.process.poll() is not None
                v2v = [r["voice_to_voice_ms"] for r in lv["turns"]]
                print(f"  voice-to-voice {v2v}, max tick lag {lv['max_tick_lag_ms']} ms, errors {lv['errors'][:3]}, "
                      f"cores {lv['cores']}", file=sys.stderr, flush=True)
                levels.append(lv)
                if not lv["triton_crashed"]:
                    break
                code = server.process.returncode
                lv["triton_exit"] = code
                print(f"  tritonserver DIED during this level (exit {code}; see {server.log_file}): its turns are "
                      f"left out of the summary; starting it again", file=sys.stderr, flush=True)
                await asyncio.to_thread(server.start, 900)
                restarted = True
                await asyncio.sleep(3.0)  # the edge's gRPC channel reconnects
            await asyncio.sleep(1.0)
    lag.stop()
    return levels


async def run_in_process(args, server) -> tuple[list[dict], dict]:
    from edge.settings import Settings

    overrides = {"triton_url": server.grpc_url, "edge_port": free_port(), "start_triton": False, "twilio_auth_token": None,
                 "public_url": None}
    if args.llm_max_tokens:
        overrides["llm_max_tokens"] = args.llm_max_tokens
    settings = Settings(**overrides)
    capture = Capture()
    for name in ("edge.turn", "edge.call"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(capture)
    edge = await InProcessEdge(settings).start()
    try:
        levels = await run(args, edge.ws_url, edge.metrics_url, capture, server)
    finally:
        await edge.stop()
    used = {k: getattr(settings, k) for k in ("llm_max_tokens", "outbound_lead_ms", "barge_in_min_speech_ms",
                                              "barge_in_wait_words_ms", "tts_rate")}
    return levels, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge-url", help="ws://host:port/media of a running edge (default: start one here, with "
                                           "its own tritonserver)")
    parser.add_argument("--calls", default="1,2", help="concurrent calls per level, comma-separated")
    parser.add_argument("--turns-per-call", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="run each level this many times (more turns)")
    parser.add_argument("--barge-in", action="store_true", help="turns after the first talk over the reply")
    parser.add_argument("--max-recording-s", type=float, default=5.5, help="use recordings up to this long")
    parser.add_argument("--line-noise-dbfs", type=float,
                        help="background noise on the callers' lines, RMS dBFS (e.g. -50; default: digital silence)")
    parser.add_argument("--llm-max-tokens", type=int, help="in-process edge only: LLM_MAX_TOKENS (default: settings)")
    parser.add_argument("--nice-triton", type=int, default=0,
                        help="run the tritonserver started here at this nice level (e.g. 10): the edge's loop "
                             "then gets the CPU first when the models' threads fill every core")
    parser.add_argument("--profile", default="cpu", help="tritonserver config profile when starting one")
    parser.add_argument("--reply-timeout", type=float, default=20.0)
    parser.add_argument("--call-timeout", type=float, default=300.0)
    parser.add_argument("--max-tick-lag-ms", type=float, default=20.0,
                        help="flag levels whose simulator clock ran later than this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--wait-quiet-s", type=float, default=0.0,
                        help="shared machine: before each level wait up to this long for other processes to use "
                             "less than --quiet-cores")
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--replot", type=Path, help="only redraw the table and PNG of a result JSON")
    args = parser.parse_args()
    args.calls = [int(x) for x in args.calls.split(",") if x]
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"))
        print(table(result))
        return

    machine = machine_info()
    machine["other_busy_processes"] = busy_processes({os.getpid()})
    setup = {"turns_per_call": args.turns_per_call, "rounds": args.rounds, "barge_in": args.barge_in,
             "stagger_s": STAGGER_S, "simulator": "edge/simulate.py run_call", "line_noise_dbfs": args.line_noise_dbfs}
    if args.edge_url:
        setup.update(edge=args.edge_url, triton="external edge (its Triton)")
        metrics = args.edge_url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/", 1)[0] + "/metrics"
        levels = asyncio.run(run(args, args.edge_url, metrics, None))
    else:
        from edge.tritonserver import TritonServer

        log = Path(tempfile.mkdtemp(prefix="perf-loadgen-")) / "tritonserver.log"
        server = TritonServer(args.profile, free_port(), free_port(), free_port(), log_file=log)
        print(f"starting tritonserver ({args.profile} profile), log {log}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        server.start(timeout=900)
        if args.nice_triton:  # the server and its Python stubs (its process group) yield the CPU to the edge
            os.setpriority(os.PRIO_PGRP, server.process.pid, args.nice_triton)  # (not after a restart)
            setup["triton_nice"] = args.nice_triton
        setup.update(triton=f"tritonserver {args.profile} profile (model_repository/)",
                     triton_load_s=round(time.perf_counter() - t, 1), triton_log=str(log), edge="in-process")
        try:
            levels, setup["edge_settings"] = asyncio.run(run_in_process(args, server))
        finally:
            server.stop()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"command": command_line(), "machine": machine, "setup": setup, "levels": levels}
    result["summary"] = summarize(levels, args)
    save_results(result, args.out, "loadgen", table, plot)


if __name__ == "__main__":
    main()
