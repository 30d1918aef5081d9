"""Memory of the whole agent on the CPU profile: each process at rest, during calls, and after them.

    python -m perf.memory [--calls 1,4] [--rounds 3] [--turns-per-call 3] [--out perf/results]

It starts the real tritonserver (CPU profile, model_repository/) and the real
edge in its own process (`python -m edge.serve --no-triton`), then plays
--rounds rounds of N concurrent simulated Twilio calls for each N in --calls
(edge/simulate.py's `run_call`, shared recordings as the callers' turns, as
perf/loadgen.py plays them). Every --sample-s it reads each process's resident
memory (VmRSS from /proc): tritonserver itself, one Python backend stub per
model instance (asr, llm, tts) and the edge. At rest after loading and after
each round it also reads PSS (/proc/<pid>/smaps_rollup: shared pages counted
once across the processes, so the PSS column adds up to what the agent holds).

What to look at: the agent's total at rest; each process's peak during calls
(what N calls add); and each process after round 1 against after the last
round at the same N (what stays behind: a leak grows round after round, a
bounded cache stops growing). Writes <out>/memory-<UTC date>.json,
memory-latest.json and memory-latest.png (RSS of each process over time, the
rounds shaded).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge.simulate import run_call
from edge.tritonserver import TritonServer, free_port
from perf.common import (ROOT, callers_session, children, command_line, machine_info, pss_mib, rss_mib, save_results,
                         start_edge, stop_process, wait_http)
from perf.loadgen import STAGGER_S, caller_pool, plan_calls

STUB = "triton_python_backend_stub"


# ---------------------------------------------------------------- reading /proc

def agent_processes(server_pid: int, edge_pid: int) -> dict[str, int]:
    """tritonserver, its Python backend stubs by model instance (`asr_0_0`...) and the edge."""
    found = {"tritonserver": server_pid}
    for pid in children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].decode().endswith(STUB):
            # the stub's arguments: model.py, shm region, sizes, parent pid, backend dir, ipc size, instance name
            instance = next((a.decode() for a in argv if a.count(b"_") >= 2 and a.rsplit(b"_", 2)[-1].isdigit()),
                            f"stub_{pid}")
            found[instance] = pid
    found["edge"] = edge_pid
    return found


class Sampler:
    """RSS of each process every `interval` s, in a thread (the calls' event loop stays the simulator's)."""

    def __init__(self, pids: dict[str, int], interval: float):
        self.pids, self.interval = pids, interval
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, dict[str, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic() - self.t0, {n: rss_mib(p) for n, p in self.pids.items()}))

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def peak(self, since: float, until: float) -> dict[str, float | None]:
        window = [s for t, s in self.samples if since <= t <= until]
        return {n: _round(max((s[n] for s in window if s[n] is not None), default=None)) for n in self.pids}


def snapshot(pids: dict[str, int]) -> dict:
    rss = {n: _round(rss_mib(p)) for n, p in pids.items()}
    pss = {n: _round(pss_mib(p)) for n, p in pids.items()}
    return {"rss_mib": rss, "pss_mib": pss, "pss_total_mib": _round(sum(v for v in pss.values() if v))}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


# ---------------------------------------------------------------- the calls

async def rounds(args, url: str, pids: dict[str, int], sampler: Sampler) -> list[dict]:
    pool = caller_pool(args.max_recording_s)
    rng = random.Random(args.seed)
    out = []
    async with callers_session() as session:
        for n in args.calls:
            for round_ in range(1, args.rounds + 1):
                print(f"{n} call(s), round {round_} ...", file=sys.stderr, flush=True)
                plans = plan_calls(n, args.turns_per_call, pool, rng, barge_in=False)
                start = sampler.now()

                async def one(i: int, turns):
                    await asyncio.sleep(i * STAGGER_S)
                    return await run_call(url, turns, session=session, reply_timeout_s=args.reply_timeout,
                                          timeout_s=args.call_timeout)

                reports = await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)), return_exceptions=True)
                end = sampler.now()
                await asyncio.sleep(args.settle_s)  # the calls' state is released once their sockets are closed
                ended = [r for r in reports if not isinstance(r, BaseException)]
                errors = [repr(r) for r in reports if isinstance(r, BaseException)]
                errors += [e for r in ended for e in r.errors]
                turns = sum(len(r.turns) for r in ended)
                out.append({"calls": n, "round": round_, "span_s": [round(start, 1), round(end, 1)], "turns": turns,
                            "errors": errors, "peak_rss_mib": sampler.peak(start, end), "after": snapshot(pids)})
    return out


# ---------------------------------------------------------------- report

def summarize(result: dict) -> dict:
    """Per process: at rest, peak during calls, after the first and the last round of each N, and growth."""
    rest = result["at_rest"]
    out = {}
    for name in rest["rss_mib"]:
        row = {"rest_rss_mib": rest["rss_mib"][name], "rest_pss_mib": rest["pss_mib"][name], "by_calls": {}}
        for n in sorted({r["calls"] for r in result["rounds"]}):
            mine = [r for r in result["rounds"] if r["calls"] == n]
            first, last = mine[0]["after"]["rss_mib"][name], mine[-1]["after"]["rss_mib"][name]
            row["by_calls"][str(n)] = {
                "peak_rss_mib": max((r["peak_rss_mib"][name] for r in mine if r["peak_rss_mib"][name]), default=None),
                "after_first_round_rss_mib": first, "after_last_round_rss_mib": last,
                "growth_first_to_last_round_mib": _round(last - first) if first and last else None}
        out[name] = row
    return out


def table(result: dict) -> str:
    s = result["summary"]
    ns = sorted({r["calls"] for r in result["rounds"]})
    head = ["process", "rest RSS", "rest PSS"] + [h for n in ns for h in (f"peak {n}c", f"after r1 {n}c",
                                                                          f"after r{result['setup']['rounds']} {n}c")]
    lines = [" ".join(f"{h:>14}" for h in head)]
    for name, row in s["processes"].items():
        cells = [name, row["rest_rss_mib"], row["rest_pss_mib"]]
        for n in ns:
            b = row["by_calls"][str(n)]
            cells += [b["peak_rss_mib"], b["after_first_round_rss_mib"], b["after_last_round_rss_mib"]]
        lines.append(" ".join(f"{'-' if c is None else c:>14}" for c in cells))
    lines.append(f"(MiB) the agent at rest: {s['at_rest_pss_total_mib']} MiB PSS; after the last round: "
                 f"{s['after_last_round_pss_total_mib']} MiB PSS; turns {s['turns']}, errors {s['errors']}")
    m = result["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['date']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    times = [t for t, _ in result["timeline"]]
    for name in result["at_rest"]["rss_mib"]:
        ax.plot(times, [s.get(name) for _, s in result["timeline"]], label=name)
    for r in result["rounds"]:
        ax.axvspan(*r["span_s"], alpha=0.12, color="grey")
        ax.text(r["span_s"][0], ax.get_ylim()[1] * 0.97, f"{r['calls']}c r{r['round']}", fontsize=7, va="top")
    ax.set_xlabel("seconds since the agent was ready")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"memory of each process, CPU profile ({result['machine']['date']})")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", default="1,4", help="concurrent calls per level, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of calls at each level")
    parser.add_argument("--turns-per-call", type=int, default=3)
    parser.add_argument("--max-recording-s", type=float, default=5.5, help="use recordings up to this long")
    parser.add_argument("--sample-s", type=float, default=0.5, help="how often RSS is read")
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after a round before reading what stays")
    parser.add_argument("--reply-timeout", type=float, default=20.0)
    parser.add_argument("--call-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    args = parser.parse_args()
    args.calls = [int(x) for x in args.calls.split(",") if x]

    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="perf-memory-"))
    server = TritonServer("cpu", free_port(), free_port(), free_port(), log_file=work / "tritonserver.log")
    print(f"starting tritonserver (cpu profile) and the edge, logs in {work}", file=sys.stderr, flush=True)
    server.start(timeout=900)
    edge = None
    try:
        port = free_port()
        edge = start_edge(server.grpc_url, port, work / "edge.log")
        wait_http(f"http://127.0.0.1:{port}/readyz", 300, edge)
        time.sleep(args.settle_s)  # fixed phrases synthesized, system prompt cached
        pids = agent_processes(server.process.pid, edge.pid)
        at_rest = snapshot(pids)
        sampler = Sampler(pids, args.sample_s).start()
        try:
            played = asyncio.run(rounds(args, f"ws://127.0.0.1:{port}/media", pids, sampler))
        finally:
            sampler.stop()
    finally:
        stop_process(edge)
        server.stop()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"command": command_line(), "machine": machine,
              "setup": {"triton": "tritonserver cpu profile (model_repository/)", "edge": "edge.serve (own process)",
                        "calls": args.calls, "rounds": args.rounds, "turns_per_call": args.turns_per_call,
                        "simulator": "edge/simulate.py run_call", "logs": str(work)},
              "processes": pids, "at_rest": at_rest, "rounds": played,
              "timeline": [(round(t, 2), s) for t, s in sampler.samples]}
    result["summary"] = {"processes": summarize(result), "at_rest_pss_total_mib": at_rest["pss_total_mib"],
                         "after_last_round_pss_total_mib": played[-1]["after"]["pss_total_mib"] if played else None,
                         "turns": sum(r["turns"] for r in played), "errors": sum(len(r["errors"]) for r in played)}
    save_results(result, args.out, "memory", table, plot)


if __name__ == "__main__":
    main()
