"""The edge alone: how many concurrent calls' media one edge process carries, with models that cost nothing.

    python -m perf.edge_only [--levels 25,50,100,150,200,300] [--turns-per-call 3] [--ramp-s 5] [--out perf/results]

It starts the real tritonserver with perf/models/ (trivial, measurement-only
stand-ins that answer instantly: NOT the product, see perf/models/README.md),
the real edge in its own process (`python -m edge.serve --no-triton`, which
exports its event-loop lag as `edge_event_loop_lag_seconds`), and a
/healthz prober in a third process. Then, for each level N, N simulated Twilio
calls start spread over --ramp-s seconds, in this process: perf/swarm.py (the
same Twilio side as edge/simulate.py on one shared 20 ms clock, about half its
CPU per call) or, with --simulator full, edge/simulate.py itself;
each replays real recordings (../shared/audio, 8 kHz) as caller turns, waits
for the reply and a short pause, and hangs up after --turns-per-call turns.

Measured over the steady window (all N calls connected, until the first hangs up):
  * outbound frame-spacing jitter: |inter-arrival - 20 ms| of the agent's frames
    while a reply plays (a reply's leading 80 ms burst left out, and gaps not
    wholly inside the window), p50/p99/max, and glitches (gaps > 60 ms inside a
    reply);
  * the edge's event-loop lag (`edge_event_loop_lag_seconds` on its /metrics,
    p50/p99 from the histogram's buckets), /healthz round trips from the prober
    (an outside view of the same), and this process's own loop lag plus the
    simulator's max_tick_lag_ms (arrival times are taken on this loop: when it
    lags, the jitter above is the simulator's, not the edge's);
  * CPU cores used by the edge, tritonserver (+ its Python stubs), the
    simulator and the prober (from /proc/<pid>/stat), and calls per edge core;
  * the edge's resident memory (VmRSS) before the level and with all its calls connected;
  * unanswered turns and call errors.
A level passes with jitter p99 <= 10 ms, edge loop lag p99 <= 20 ms, every
turn answered and no errors; the run stops after the first level that fails.
On a shared machine, --wait-quiet-s waits before each level for other
processes to calm down, and a level that fails while they used more than
--contended-cores is run again (--retries); every attempt is kept.
--line-noise-dbfs puts background noise on every caller's line (a real line is
seldom digital silence: it changes how the edge batches the caller's audio).
Everything runs on loopback. Results: <out>/edge-only-<date>.json,
edge-only-latest.json and edge-only-latest.png.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from edge import audio
from edge.simulate import CallerTurn, LineNoise, run_call
from edge.tritonserver import TritonServer, free_port
from perf.common import (ROOT, CpuTracker, GcPauses, LoopLag, busy_processes, callers_session, command_line,
                         histogram_delta, histogram_quantile, histograms, jitter_and_glitches, machine_cpu,
                         machine_info, reply_gaps, rss_mib, save_results, scrape, start_edge, stats, stop_process,
                         wait_http, wait_quiet)
from perf.swarm import Prepared, Swarm, prepare
from tests.metrics import Metrics
from tests.speech import recordings

MODELS_DIR = ROOT / "perf" / "models"
JITTER_P99_MS = 10.0
LOOP_LAG_P99_MS = 20.0
TARGET_CALLS_PER_CORE = 300
GC = GcPauses()


class TrivialTriton(TritonServer):
    """The real tritonserver, serving perf/models/ (config.pbtxt, no profiles) instead of model_repository/."""

    def command(self) -> list[str]:
        return [f"--model-repository={MODELS_DIR}" if c.startswith("--model-repository=") else c
                for c in super().command() if not c.startswith("--model-config-name=")]


# ---------------------------------------------------------------- the prober (its own process)

def probe(url: str, out: Path, interval: float) -> None:
    """GET `url` every `interval` s on a kept-alive connection; one 'unix_time rtt_s' line per request."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    conn = None
    with open(out, "a", buffering=1) as f:
        while True:
            t0 = time.time()
            p0 = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("GET", path)
                conn.getresponse().read()
                f.write(f"{t0:.4f} {time.perf_counter() - p0:.6f}\n")
            except (OSError, http.client.HTTPException):
                conn = None
            time.sleep(max(interval - (time.perf_counter() - p0), 0.0))


def asr_requests(triton_metrics_url: str) -> float:
    """The asr requests Triton has received so far (each costs the edge a gRPC write)."""
    return Metrics(scrape(triton_metrics_url)).value("nv_inference_request_success_total", model="asr")


def probe_samples(path: Path, since: float, until: float) -> list[float]:
    rtts = []
    for line in path.read_text().splitlines():
        t, rtt = map(float, line.split())
        if since <= t < until:
            rtts.append(rtt * 1000)
    return rtts


# ---------------------------------------------------------------- one level

def caller_turns(pool: list[tuple[str, np.ndarray, Prepared]], rng: random.Random, turns: int,
                 barge_in: bool) -> tuple[list[CallerTurn], list[Prepared]]:
    out, prepared = [], []
    for k in range(turns):
        name, samples, ready = pool[rng.randrange(len(pool))]
        out.append(CallerTurn(samples, name=name, pause_ms=rng.uniform(400, 1000),
                              barge_in_ms=rng.uniform(300, 800) if barge_in and k > 0 else None))
        prepared.append(ready)
    return out, prepared


class Cpu:
    """CPU seconds of the processes we account for, and of the whole machine, at one moment."""

    def __init__(self, tracker: CpuTracker):
        self.t = time.monotonic()
        self.cpu = tracker.read()
        self.machine = machine_cpu()

    def cores(self, before: "Cpu") -> dict[str, float]:
        wall = self.t - before.t
        out = {name: round((self.cpu[name] - before.cpu[name]) / wall, 3) for name in self.cpu}
        busy = (self.machine["busy"] - before.machine["busy"]) / wall
        out["machine_busy"] = round(busy, 3)
        out["others"] = round(max(busy - sum(out[name] for name in self.cpu), 0.0), 3)  # other engineers' work
        out["steal"] = round((self.machine["steal"] - before.machine["steal"]) / wall, 3)
        return out


async def level(n: int, args, pool, edge_url: str, metrics_url: str, triton_metrics_url: str, pids: CpuTracker,
                probe_log: Path,
                session: aiohttp.ClientSession, lag: LoopLag, swarm: Swarm) -> dict:
    rng = random.Random(1000 + n)
    plans = [caller_turns(pool, rng, args.turns_per_call, args.barge_in) for _ in range(n)]
    started = asyncio.Event()
    connected = 0

    async def one(i: int, plan):
        nonlocal connected
        await asyncio.sleep(i * args.ramp_s / n)
        connected += 1
        if connected == n:
            started.set()
        turns, prepared = plan
        if args.simulator == "full":
            return await run_call(edge_url, turns, session=session, reply_timeout_s=args.reply_timeout,
                                  timeout_s=args.call_timeout, line_noise_dbfs=args.line_noise_dbfs)
        return await swarm.call(edge_url, turns, prepared, reply_timeout_s=args.reply_timeout,
                                timeout_s=args.call_timeout)

    edge_pid = pids.pids["edge"][0]
    rss0 = rss_mib(edge_pid)
    cpu0 = Cpu(pids)
    wall0 = time.time()
    tasks = [asyncio.create_task(one(i, plan)) for i, plan in enumerate(plans)]
    await started.wait()
    await asyncio.sleep(0.5)  # the last call's start message and greeting settle
    lag.take()
    w0, cpu1, loop_w0 = time.time(), Cpu(pids), asyncio.get_running_loop().time()
    text0 = await asyncio.to_thread(scrape, metrics_url)
    asr0 = await asyncio.to_thread(asr_requests, triton_metrics_url)
    h0 = histograms(text0, "edge_event_loop_lag_seconds")
    gc0, sim_gc0 = histograms(text0, "perf_edge_gc_pause_seconds", "generation"), len(GC.pauses)
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    w1, cpu2, rss1 = time.time(), Cpu(pids), rss_mib(edge_pid)
    text1 = await asyncio.to_thread(scrape, metrics_url)
    asr1 = await asyncio.to_thread(asr_requests, triton_metrics_url)
    h1 = histograms(text1, "edge_event_loop_lag_seconds")
    edge_gc = histogram_delta(histograms(text1, "perf_edge_gc_pause_seconds", "generation"), gc0)
    sim_gc = [(g, p) for _, g, p in GC.pauses[sim_gc0:]]
    sim_lag = [s * 1000 for s in lag.take()]
    tick_lag = swarm.lag_since(loop_w0) if args.simulator == "lean" else []
    reports = await asyncio.gather(*tasks, return_exceptions=True)
    cpu3 = Cpu(pids)
    failed = [repr(r) for r in reports if isinstance(r, BaseException)]
    reports = [r for r in reports if not isinstance(r, BaseException)]

    jitter, glitches, frames = [], 0, 0
    for r in reports:
        replies = reply_gaps(r)
        j, g = jitter_and_glitches(replies, w0, w1, offset=r.started_unix)
        jitter.append(j)
        glitches += g
        frames += sum(1 for f in r.frames if w0 <= f.t + r.started_unix < w1)
    jitter = np.concatenate(jitter) if jitter else np.zeros(0)
    turns = [t for r in reports for t in r.turns]
    unanswered = sum(1 for t in turns if t.voice_to_voice_ms is None)
    errors = [e for r in reports for e in r.errors] + failed
    edge_lag = histogram_delta(h1, h0).get("")
    edge_lag_stats = None
    if edge_lag and edge_lag["count"]:
        edge_lag_stats = {"n": int(edge_lag["count"]),
                          "p50": round(histogram_quantile(edge_lag, 0.5) * 1000, 2),
                          "p99": round(histogram_quantile(edge_lag, 0.99) * 1000, 2),
                          "mean": round(edge_lag["sum"] / edge_lag["count"] * 1000, 2),
                          # the max lag is below this bucket bound
                          "max_below_ms": round(min(le for le, c in edge_lag["buckets"]
                                                    if c >= edge_lag["count"]) * 1000, 1)}
    steady = cpu2.cores(cpu1)
    edge_cores = steady.get("edge") or None
    result = {
        "calls": n, "steady_window_s": round(w1 - w0, 1), "level_s": round(time.time() - wall0, 1),
        "frames_in_window": frames, "asr_requests_per_call_s": round((asr1 - asr0) / n / (w1 - w0), 1),
        "jitter_ms": stats(jitter), "glitches": glitches,
        "edge_loop_lag_ms": edge_lag_stats,
        "healthz_rtt_ms": stats(probe_samples(probe_log, w0, w1)),
        "sim_loop_lag_ms": stats(sim_lag),
        # garbage-collector pauses in the window: a full (generation 2) collection stops a loop for its duration
        "edge_gc": {g: {"n": int(h["count"]), "total_ms": round(h["sum"] * 1000, 1),
                        "max_below_ms": round(min(le for le, c in h["buckets"] if c >= h["count"]) * 1000, 1)}
                    for g, h in edge_gc.items() if h["count"]},
        "sim_gc": {str(g): {"n": sum(1 for x, _ in sim_gc if x == g),
                            "total_ms": round(sum(p for x, p in sim_gc if x == g) * 1000, 1),
                            "max_ms": round(max((p for x, p in sim_gc if x == g), default=0) * 1000, 1)}
                   for g in sorted({x for x, _ in sim_gc})},
        "sim_max_tick_lag_ms": round(max((r.max_tick_lag_ms for r in reports), default=0.0), 1),
        "sim_tick_lag_ms": stats(tick_lag),
        "cores_steady": steady, "cores_whole_level": cpu3.cores(cpu0),
        "calls_per_edge_core": round(n / edge_cores, 1) if edge_cores else None,
        # the edge's resident memory before the level and with all its calls connected: what a call holds
        "edge_rss_mib": {"before": rss0 and round(rss0, 1), "calls_connected": rss1 and round(rss1, 1),
                         "per_call": round((rss1 - rss0) / n, 2) if rss0 and rss1 else None},
        "turns": len(turns), "unanswered_turns": unanswered,
        "voice_to_voice_ms": stats([t.voice_to_voice_ms for t in turns]),
        "barge_in_clear_ms": stats([t.clear_after_speech_ms for t in turns if t.barge_in]),
        "errors": errors[:20], "error_count": len(errors),
    }
    j99 = result["jitter_ms"].get("p99")
    lag99 = edge_lag_stats["p99"] if edge_lag_stats else None
    reasons = []
    if j99 is None or j99 > JITTER_P99_MS:
        reasons.append(f"jitter p99 {j99} ms > {JITTER_P99_MS:g}")
    if lag99 is not None and lag99 > LOOP_LAG_P99_MS:
        reasons.append(f"edge loop lag p99 {lag99} ms > {LOOP_LAG_P99_MS:g}")
    if unanswered:
        reasons.append(f"{unanswered} unanswered turns")
    if errors:
        reasons.append(f"{len(errors)} errors")
    result["passed"] = not reasons
    result["failed_because"] = reasons
    return result


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


# ---------------------------------------------------------------- report

def table(result: dict) -> str:
    def f(v, nd=1):
        return "-" if v is None else f"{v:.{nd}f}"
    lines = [f"{'calls':>5} {'jit p50':>7} {'jit p99':>7} {'jit max':>7} {'glitch':>6} {'lag p50':>7} {'lag p99':>7} "
             f"{'hz p99':>6} {'simlag99':>8} {'edge cpu':>8} {'triton':>6} {'sim':>5} {'others':>6} {'calls/core':>10} "
             f"{'asr/s':>5} {'edge MiB':>8} {'unans':>5} {'ok':>3}"]
    for lv in result["levels"]:
        lag = lv["edge_loop_lag_ms"] or {}
        c = lv["cores_steady"]
        lines.append(f"{lv['calls']:>5} {f(lv['jitter_ms'].get('p50')):>7} {f(lv['jitter_ms'].get('p99')):>7} "
                     f"{f(lv['jitter_ms'].get('max')):>7} {lv['glitches']:>6} {f(lag.get('p50')):>7} "
                     f"{f(lag.get('p99')):>7} {f(lv['healthz_rtt_ms'].get('p99')):>6} "
                     f"{f(lv['sim_loop_lag_ms'].get('p99')):>8} {f(c.get('edge'), 2):>8} {f(c.get('triton'), 2):>6} "
                     f"{f(c.get('simulator'), 2):>5} {f(c.get('others'), 2):>6} {f(lv['calls_per_edge_core']):>10} "
                     f"{f(lv.get('asr_requests_per_call_s')):>5} "
                     f"{f(lv.get('edge_rss_mib', {}).get('calls_connected'), 0):>8} {lv['unanswered_turns']:>5} "
                     f"{'yes' if lv['passed'] else 'NO':>3}")
    m = result["machine"]
    lines.append(f"(ms; cores = CPU seconds per second in the steady window; others = the rest of the machine; "
                 f"asr/s = asr requests per call-second; edge MiB = its RSS with all calls connected) "
                 f"machine: {m['cpu']}, {m['cores_usable']} cores, load {m['loadavg_start']} at start, {m['date']}")
    s = result["summary"]
    lines.append(f"max calls within limits: {s['max_calls_passed']}; edge calls per core there: "
                 f"{s['calls_per_edge_core_at_max']} (target >= {TARGET_CALLS_PER_CORE} with jitter p99 <= "
                 f"{JITTER_P99_MS:g} ms and loop lag p99 <= {LOOP_LAG_P99_MS:g} ms)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = result["levels"]
    # per level: the attempt that passed, else the one other processes disturbed least; the rest faint
    levels = []
    for calls in sorted({lv["calls"] for lv in every}):
        tries = [lv for lv in every if lv["calls"] == calls]
        levels.append(next((lv for lv in tries if lv["passed"]), None)
                      or min(tries, key=lambda lv: lv["cores_steady"].get("others", 0)))
    faint = [lv for lv in every if not any(lv is x for x in levels)]
    n = [lv["calls"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot(n, [lv["jitter_ms"].get("p99") for lv in levels], "o-", label="outbound jitter p99")
    a.plot(n, [(lv["edge_loop_lag_ms"] or {}).get("p99") for lv in levels], "s-", label="edge loop lag p99")
    a.plot(n, [lv["healthz_rtt_ms"].get("p99") for lv in levels], "^--", label="/healthz RTT p99 (outside)")
    a.plot(n, [lv["sim_loop_lag_ms"].get("p99") for lv in levels], "x:", label="simulator loop lag p99")
    if faint:
        a.plot([lv["calls"] for lv in faint], [lv["jitter_ms"].get("p99") for lv in faint], "o", color="0.7",
               ms=4, label="jitter p99, attempts disturbed by other work")
    a.axhline(JITTER_P99_MS, color="C0", lw=0.8, ls="--")
    a.axhline(LOOP_LAG_P99_MS, color="C1", lw=0.8, ls="--")
    a.set_xlabel("concurrent calls")
    a.set_ylabel("ms")
    a.set_yscale("symlog", linthresh=10)
    a.set_title("Timing under load (dashed: limits)")
    a.legend(fontsize=8)
    for key, style in (("edge", "o-"), ("triton", "s-"), ("simulator", "^-"), ("prober", "x:"), ("others", "k:")):
        b.plot(n, [lv["cores_steady"].get(key) for lv in levels], style, label=key)
    b.set_xlabel("concurrent calls")
    b.set_ylabel("CPU cores used")
    b.set_title("Who uses the CPU (steady window)")
    b.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Edge alone with trivial models, {m['cores_usable']} cores ({m['cpu']}), {m['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main

def recordings_8k(max_seconds: float, line_noise: LineNoise | None) -> list[tuple[str, np.ndarray, Prepared]]:
    pool = []
    for rec in recordings():
        samples, rate = rec.samples()
        if len(samples) / rate <= max_seconds:
            samples = audio.resample(samples, rate, audio.TWILIO_RATE)
            pool.append((rec.name, samples, prepare(samples, line_noise)))
    return pool


async def run(args, edge_url: str, metrics_url: str, triton_metrics_url: str, pids: CpuTracker,
              probe_log: Path) -> list[dict]:
    line_noise = None if args.line_noise_dbfs is None else LineNoise(args.line_noise_dbfs)
    pool = recordings_8k(args.max_recording_s, line_noise)
    lag = LoopLag().start()
    results = []
    async with callers_session() as session:
        swarm = Swarm(session, line_noise)
        for n in args.levels:
            for attempt in range(1, args.retries + 2):
                quiet = await wait_quiet(lambda: sum(Cpu(pids).cpu.values()), args.quiet_cores, args.wait_quiet_s) \
                    if args.wait_quiet_s > 0 else None
                print(f"level {n} calls (attempt {attempt}) ... {quiet or ''}", file=sys.stderr, flush=True)
                lv = await level(n, args, pool, edge_url, metrics_url, triton_metrics_url, pids, probe_log, session,
                                 lag, swarm)
                lv["attempt"] = attempt
                lv["before"] = quiet
                results.append(lv)
                c = lv["cores_steady"]
                print(f"  jitter {lv['jitter_ms']}, edge lag {lv['edge_loop_lag_ms']}, cores {c}, "
                      f"unanswered {lv['unanswered_turns']}, errors {lv['error_count']}, "
                      f"{'passed' if lv['passed'] else 'FAILED: ' + '; '.join(lv['failed_because'])}",
                      file=sys.stderr, flush=True)
                await asyncio.sleep(2.0)  # calls' asr sequences end, sockets close
                if lv["passed"] or c["others"] < args.contended_cores:
                    break
                print(f"  other processes used {c['others']} cores meanwhile: running this level again",
                      file=sys.stderr, flush=True)
            if not lv["passed"] and not args.keep_going:
                break
    lag.stop()
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="25,50,100,150,200,300", help="concurrent calls per level, comma-separated")
    parser.add_argument("--turns-per-call", type=int, default=3)
    parser.add_argument("--ramp-s", type=float, default=5.0, help="a level's calls start spread over this long")
    parser.add_argument("--barge-in", action="store_true", help="turns after the first interrupt the reply")
    parser.add_argument("--max-recording-s", type=float, default=3.5, help="replay recordings up to this long")
    parser.add_argument("--line-noise-dbfs", type=float,
                        help="background noise on the callers' lines, RMS dBFS (e.g. -50; default: digital silence)")
    parser.add_argument("--reply-timeout", type=float, default=10.0)
    parser.add_argument("--call-timeout", type=float, default=120.0)
    parser.add_argument("--simulator", choices=("lean", "full"), default="lean",
                        help="lean: perf/swarm.py (one clock for all calls); full: edge/simulate.py run_call")
    parser.add_argument("--retries", type=int, default=1,
                        help="run a failed level again (at most this often) when other processes were busy")
    parser.add_argument("--contended-cores", type=float, default=0.3,
                        help="cores used by other processes that make a failed level worth running again")
    parser.add_argument("--wait-quiet-s", type=float, default=0.0,
                        help="shared machine: before each level wait up to this long for other processes to use "
                             "less than --quiet-cores")
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--keep-going", action="store_true", help="run every level even after one fails")
    parser.add_argument("--pin-edge", action="store_true",
                        help="give the edge the last core to itself (other processes of this run on the rest; "
                             "other users' processes are not moved)")
    parser.add_argument("--probe-interval", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--replot", type=Path, help="only redraw the table and PNG of a result JSON")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x]
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"))
        print(table(result))
        return

    work = Path(tempfile.mkdtemp(prefix="perf-edge-only-"))
    machine = machine_info()
    server = TrivialTriton("trivial", free_port(), free_port(), free_port(), log_file=work / "tritonserver.log")
    edge = prober = None
    print(f"starting tritonserver with {MODELS_DIR} (trivial models), logs in {work}", file=sys.stderr, flush=True)
    server.start(timeout=300)
    try:
        port = free_port()
        edge = start_edge(server.grpc_url, port, work / "edge.log")
        wait_http(f"http://127.0.0.1:{port}/readyz", 60, edge)
        time.sleep(1.0)  # fixed phrases synthesized (instant with these models)
        probe_log = work / "healthz.txt"
        prober = subprocess.Popen([sys.executable, "-m", "perf.edge_only", "--probe",
                                   f"http://127.0.0.1:{port}/healthz", str(probe_log), str(args.probe_interval)],
                                  cwd=ROOT, start_new_session=True)
        pids = {"edge": edge.pid, "triton": server.process.pid, "simulator": os.getpid(), "prober": prober.pid}
        # the simulator (this process) is the parent of the others: it is counted alone
        tracker = CpuTracker(pids, trees=("edge", "triton", "prober"))
        machine["other_busy_processes"] = busy_processes({p for ps in tracker.pids.values() for p in ps})
        if args.pin_edge:  # the edge alone on the last core; tritonserver, simulator and prober on the others
            cores = sorted(os.sched_getaffinity(0))
            for name, ps in tracker.pids.items():
                for p in ps + [t for pid in ps for t in _threads(pid)]:
                    try:
                        os.sched_setaffinity(p, {cores[-1]} if name == "edge" else set(cores[:-1]))
                    except OSError:
                        pass
            machine["pinned"] = {"edge": cores[-1], "others_of_ours": cores[:-1]}
        exported = "edge_event_loop_lag_seconds" in scrape(f"http://127.0.0.1:{port}/metrics")
        levels = asyncio.run(run(args, f"ws://127.0.0.1:{port}/media", f"http://127.0.0.1:{port}/metrics",
                                 server.metrics_url, tracker, probe_log))
    finally:
        stop_process(prober)
        stop_process(edge)
        server.stop()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    passed = [lv for lv in levels if lv["passed"]]
    best = max(passed, key=lambda lv: lv["calls"]) if passed else None
    result = {
        "command": command_line(), "machine": machine,
        "setup": {"models": "perf/models (trivial, measurement only)", "pin_edge": args.pin_edge, "edge": "edge.serve",
                  "edge_loop_lag_source": "edge /metrics edge_event_loop_lag_seconds" if exported else "none",
                  "simulator": {"lean": "perf/swarm.py", "full": "edge/simulate.py"}[args.simulator],
                  "turns_per_call": args.turns_per_call, "ramp_s": args.ramp_s, "barge_in": args.barge_in,
                  "line_noise_dbfs": args.line_noise_dbfs,
                  "limits": {"jitter_p99_ms": JITTER_P99_MS, "loop_lag_p99_ms": LOOP_LAG_P99_MS,
                             "calls_per_core": TARGET_CALLS_PER_CORE}, "logs": str(work)},
        "levels": levels,
        "summary": {"max_calls_passed": best["calls"] if best else 0,
                    "calls_per_edge_core_at_max": best["calls_per_edge_core"] if best else None,
                    "first_failure": next(({"calls": lv["calls"], "because": lv["failed_because"]}
                                           for lv in levels if not lv["passed"]), None)},
    }
    save_results(result, args.out, "edge-only", table, plot)


if __name__ == "__main__":
    main()
