"""Side by side: our agent and Pipecat with the same models, the same callers, on the same machine.

    make compare        # makes .venv-pipecat once, then runs this with its defaults
    python -m perf.compare [--agents ours,pipecat] [--calls 1,2] [--turns-per-call 3] [--rounds 2] [--barge-in]
        [--out perf/results]

Each agent runs in processes of its own, one at a time, on the machine's
cores:
  ours     tritonserver (CPU profile, model_repository/) + `python -m edge.serve`
  pipecat  perf/frameworks/pipecat_bot.py in .venv-pipecat (Pipecat 1.14, its Twilio serializer, Silero VAD +
           Smart Turn v3, WhisperSTTService, OpenAILLMService, PiperTTSService) + llama-cpp-python's OpenAI
           server: faster-whisper tiny.en int8, SmolLM2-135M in the same Q8_0 GGUF (one llama.cpp thread for
           decoding, as our llm's), Piper en_US-joe-medium; the same greeting, system prompt, temperature and
           token limit.
  pipecat-silence  the same, but the turn ends after 350 ms of silence (VAD's 0.2 s + 0.15 s), our agent's
           shortest endpoint, where Smart Turn v3 may wait up to 3 s on a turn it judges unfinished.
Both are driven by perf.loadgen's callers (edge/simulate.py: Twilio Media
Streams at 20 ms, real recordings from ../shared/audio, pauses of 0.5-1.2 s
after each reply; with --barge-in later turns talk over the reply). A round
plays every level against each agent with the same seed, so both hear the
same recordings with the same pauses; the agents' order alternates by round,
so a drift of the VM's speed falls on both. One warm-up call (not counted)
precedes each agent's levels.

Per agent and N: voice-to-voice (the simulator's: the caller's last frame of
speech -> the first reply frame with sound), unanswered turns, underruns
(60 ms+ of silence heard inside a reply that the agent did not send: Pipecat
sends 137.5 ms a message ahead of time, ours 20 ms, so gaps between arrivals
do not compare), with --barge-in the caller's onset -> `clear` and -> the
agent quiet as heard, and the agent's CPU cores (its process trees, over the
level). Prints a table, writes
<out>/compare-<stamp>.json, compare-latest.json and compare-latest.png
(compare-barge-in-* with --barge-in).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.tritonserver import TritonServer, free_port
from perf.common import (ROOT, CpuTracker, command_line, machine_info, save_results, start_edge, stats, stop_process,
                         wait_http)
from perf.loadgen import run as run_levels
from perf.loadgen import summarize

PIPECAT_PY = ROOT / ".venv-pipecat" / "bin" / "python"
AGENTS = ("ours", "pipecat", "pipecat-silence")


class Agent:
    """An agent's processes: started, ready for calls at `url`, measured (`cores`), stopped."""

    name = ""

    def __init__(self, work: Path):
        self.work = work
        self.url = ""
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "Agent":
        raise NotImplementedError

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)

    def cpu(self) -> CpuTracker:
        return CpuTracker({str(p.pid): p.pid for p in self.procs}, trees=tuple(str(p.pid) for p in self.procs))


class Ours(Agent):
    name = "ours"

    def start(self) -> "Ours":
        self.server = TritonServer("cpu", free_port(), free_port(), free_port(),
                                   log_file=self.work / "tritonserver.log")
        self.server.start(timeout=900)
        port = free_port()
        self.procs = [self.server.process, start_edge(self.server.grpc_url, port, self.work / "edge.log")]
        wait_http(f"http://127.0.0.1:{port}/readyz", 120, self.procs[1])
        self.url = f"ws://127.0.0.1:{port}/media"
        return self

    def stop(self) -> None:
        stop_process(self.procs[1])
        self.server.stop()


class Pipecat(Agent):
    name = "pipecat"
    turn = "smart"

    def start(self) -> "Pipecat":
        from edge.settings import Settings

        if not PIPECAT_PY.exists():
            raise SystemExit(f"{PIPECAT_PY} is missing: `make compare` makes it")
        settings = Settings()
        llm_port, bot_port = free_port(), free_port()
        llm = subprocess.Popen([str(PIPECAT_PY), "-m", "llama_cpp.server", "--model", smollm2_q8_0(),
                                "--model_alias", "smollm2", "--n_ctx", "2048", "--n_threads", "1",
                                "--host", "127.0.0.1", "--port", str(llm_port)],
                               cwd=ROOT, stdout=open(self.work / "llama-server.log", "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        self.procs = [llm]
        wait_http(f"http://127.0.0.1:{llm_port}/v1/models", 120, llm)
        bot = subprocess.Popen([str(PIPECAT_PY), str(ROOT / "perf" / "frameworks" / "pipecat_bot.py"),
                                "--port", str(bot_port), "--llm-url", f"http://127.0.0.1:{llm_port}/v1",
                                "--greeting", settings.greeting, "--system-prompt", settings.system_prompt,
                                "--temperature", str(settings.llm_temperature),
                                "--max-tokens", str(settings.llm_max_tokens), "--turn", self.turn],
                               cwd=ROOT, stdout=open(self.work / "pipecat.log", "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
        self.procs.append(bot)
        wait_http(f"http://127.0.0.1:{bot_port}/healthz", 120, bot)
        self.url = f"ws://127.0.0.1:{bot_port}/ws"
        return self


class PipecatSilence(Pipecat):
    """Pipecat with a turn end after 350 ms of silence (VAD's 0.2 s + 0.15 s), our agent's shortest endpoint."""

    name = "pipecat-silence"
    turn = "silence"


def smollm2_q8_0() -> str:
    """The GGUF our llm serves on the CPU profile (SmolLM2 requantized to Q8_0, cached once per machine)."""
    sys.path.insert(0, str(ROOT / "model_repository" / "llm" / "1"))
    import llama_cpp_engine

    return llama_cpp_engine.requantized(llama_cpp_engine.gguf_file("smollm2")[0], "q8_0")


def loadgen_args(args, calls: list[int], turns: int, seed: int) -> argparse.Namespace:
    return argparse.Namespace(calls=calls, rounds=1, turns_per_call=turns, seed=seed, barge_in=args.barge_in,
                              max_recording_s=5.5, line_noise_dbfs=None, reply_timeout=20.0, call_timeout=300.0,
                              wait_quiet_s=0.0, quiet_cores=0.3, max_tick_lag_ms=20.0)


def measure(agent: Agent, args, seed: int) -> list[dict]:
    """A warm-up call, then every level of --calls against the running agent."""
    asyncio.run(run_levels(loadgen_args(args, [1], 1, seed + 1000), agent.url, None, None))
    levels = []
    for n in args.calls:
        cpu = agent.cpu()
        c0, t0 = sum(cpu.read().values()), time.monotonic()
        [lv] = asyncio.run(run_levels(loadgen_args(args, [n], args.turns_per_call, seed), agent.url, None, None))
        lv["agent_cores"] = round((sum(cpu.read().values()) - c0) / (time.monotonic() - t0), 2)
        lv["agent"] = agent.name
        levels.append(lv)
    return levels


def summary(levels: list[dict], args) -> dict:
    out = {}
    for name in args.agents:
        mine = [lv for lv in levels if lv["agent"] == name]
        s = summarize(mine, loadgen_args(args, args.calls, args.turns_per_call, 0))
        for n, sn in s.items():
            sn["agent_cores"] = stats([lv["agent_cores"] for lv in mine if str(lv["calls"]) == n], (50,))
            sn.pop("stages_ms", None)
        out[name] = s
    return out


def table(result: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.0f}"
    lines = [f"{'agent':>15} {'calls':>5} {'turns':>5} {'v2v p50':>7} {'v2v p95':>7} {'max':>6} {'unans':>5} "
             f"{'underrun':>8} {'clear p50':>9} {'clear p95':>9} {'quiet p50':>9} {'quiet p95':>9} {'cores':>5}"]
    for name, per_n in result["summary"].items():
        for n, s in per_n.items():
            v = s["voice_to_voice_ms"]
            longest = max((r["voice_to_voice_ms"] for r in _rows(result, name, n) if r["answered"]), default=None)
            barge = " ".join(f"{f(s[key].get(q)):>9}" for key in ("barge_in_clear_ms", "barge_in_quiet_ms")
                             for q in ("p50", "p95"))
            lines.append(f"{name:>15} {n:>5} {s['turns']:>5} {f(v.get('p50')):>7} {f(v.get('p95')):>7} {f(longest):>6} "
                         f"{s['unanswered']:>5} {s['underruns']:>8} {barge} {s['agent_cores'].get('p50') or 0:>5.2f}")
    m = result["machine"]
    lines.append(f"(ms, the simulator's: last caller speech frame -> first reply frame with sound; clear / quiet = "
                 f"caller onset over a reply -> `clear` / the agent quiet as heard; cores = the agent's processes) "
                 f"machine: {m['cpu']}, {m['cores_usable']} cores, {m['date']}")
    return "\n".join(lines)


def _rows(result: dict, name: str, n: str) -> list[dict]:
    return [r for lv in result["levels"] if lv["agent"] == name and str(lv["calls"]) == n for r in lv["turns"]]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    ns = sorted({n for per_n in result["summary"].values() for n in per_n}, key=int)
    fig, ax = plt.subplots(figsize=(4 + 2.2 * len(ns) * len(names) / 2, 4.8))
    labels, data, colors = [], [], []
    for n in ns:
        for k, name in enumerate(names):
            labels.append(f"{name}\n{n} call{'s' if n != '1' else ''}")
            data.append([r["voice_to_voice_ms"] for r in _rows(result, name, n) if r["voice_to_voice_ms"] is not None])
            colors.append(f"C{k}")
    ax.boxplot([d or [np.nan] for d in data], whis=(5, 95), showfliers=False)
    rng = np.random.default_rng(0)
    for k, (d, c) in enumerate(zip(data, colors), 1):
        ax.scatter(k + rng.uniform(-0.12, 0.12, len(d)), d, s=14, alpha=0.6, color=c)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("voice-to-voice, ms (simulator)")
    ax.set_title("Same models, same callers: voice-to-voice per turn (box p25-p75, whiskers p5-p95)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    m = result["machine"]
    fig.suptitle(f"perf/compare.py: {m['cores_usable']} cores ({m['cpu']}), {m['date'][:16]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="ours,pipecat", help="comma-separated, of: " + ", ".join(AGENTS))
    parser.add_argument("--calls", default="1,2", help="concurrent calls per level, comma-separated")
    parser.add_argument("--turns-per-call", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="each round: every level against each agent")
    parser.add_argument("--barge-in", action="store_true", help="turns after the first talk over the reply")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--replot", type=Path, help="only redraw the table and PNG of a result JSON")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot(result, args.replot.with_suffix(".png"))
        print(table(result))
        return
    args.agents = [a for a in args.agents.split(",") if a]
    if unknown := set(args.agents) - set(AGENTS):
        parser.error(f"unknown agents: {', '.join(sorted(unknown))}")
    args.calls = [int(x) for x in args.calls.split(",") if x]
    kinds = {"ours": Ours, "pipecat": Pipecat, "pipecat-silence": PipecatSilence}
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="perf-compare-"))
    levels = []
    for round_ in range(1, args.rounds + 1):
        order = args.agents if round_ % 2 else args.agents[::-1]
        for name in order:
            agent = kinds[name](work)
            print(f"round {round_}: starting {name} (logs in {work})", file=sys.stderr, flush=True)
            try:
                agent.start()
                for lv in measure(agent, args, args.seed + round_):
                    lv["round"] = round_
                    levels.append(lv)
            finally:
                agent.stop()
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    setup = {"agents": args.agents, "turns_per_call": args.turns_per_call, "rounds": args.rounds,
             "barge_in": args.barge_in, "simulator": "edge/simulate.py run_call (perf.loadgen's levels)",
             "logs": str(work)}
    result = {"command": command_line(), "machine": machine, "setup": setup, "levels": levels}
    result["summary"] = summary(levels, args)
    save_results(result, args.out, "compare-barge-in" if args.barge_in else "compare", table, plot)


if __name__ == "__main__":
    main()
