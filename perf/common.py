"""Helpers shared by the benchmarks: machine facts, CPU time, loop lag, Prometheus, writing the results."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: fine buckets for event-loop lag (seconds)
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


def save_results(result: dict, out: Path, name: str, table, plot=None) -> None:
    """`<out>/<name>-<UTC stamp>.json` and `<name>-latest.json` (and `<name>-latest.png` from `plot`), then print
    `table(result)` and what was written."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=1)
    (out / f"{name}-{stamp}.json").write_text(text)
    (out / f"{name}-latest.json").write_text(text)
    written = [f"{name}-latest.json"]
    if plot is not None:
        plot(result, out / f"{name}-latest.png")
        written.append(f"{name}-latest.png")
    print(table(result))
    print(f"wrote {out / f'{name}-{stamp}.json'}, " + ", ".join(written))


def command_line() -> str:
    """The exact command that produced a result, as one could type it again."""
    return shlex.join([Path(sys.executable).relative_to(ROOT).as_posix() if Path(sys.executable).is_relative_to(ROOT)
                       else sys.executable, "-m", _module()] + sys.argv[1:])


def _module() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        mem_gib = None
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        git, dirty = None, None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "memory_gib": mem_gib,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git,
            "git_dirty": dirty, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def busy_processes(exclude: set[int], min_cores: float = 0.05) -> list[dict]:
    """Other processes' CPU use over the last second (who else shares the machine: contention)."""
    def snapshot() -> dict[int, tuple[float, str]]:
        out = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in exclude:
                try:
                    out[int(entry.name)] = (_stat_cpu(entry / "stat"), (entry / "comm").read_text().strip())
                except (OSError, ValueError, IndexError):
                    pass
        return out
    a = snapshot()
    time.sleep(1.0)
    b = snapshot()
    busy = [{"pid": pid, "comm": name, "cores": round(cpu - a[pid][0], 2)}
            for pid, (cpu, name) in b.items() if pid in a and cpu - a[pid][0] >= min_cores]
    return sorted(busy, key=lambda p: -p["cores"])[:8]


# ---------------------------------------------------------------- CPU time from /proc

def _stat_cpu(path: Path) -> float:
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def children(pid: int) -> list[int]:
    kids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by one process."""
    try:
        return _stat_cpu(Path(f"/proc/{pid}/stat"))
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine so far: busy (all but idle and iowait) and stolen by the hypervisor."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLK_TCK, "steal": steal / CLK_TCK}


class CpuTracker:
    """CPU seconds of a set of processes (and the children they have when it is made), robust to one of them
    exiting meanwhile: a process that is gone keeps the last value read."""

    def __init__(self, pids: dict[str, int], trees: tuple[str, ...] = ()):
        self.pids: dict[str, list[int]] = {}
        for name, pid in pids.items():
            self.pids[name] = _tree([pid]) if name in trees else [pid]
        self._last: dict[int, float] = {}

    def read(self) -> dict[str, float]:
        out = {}
        for name, pids in self.pids.items():
            total = 0.0
            for p in pids:
                try:
                    self._last[p] = _stat_cpu(Path(f"/proc/{p}/stat"))
                except (OSError, IndexError, ValueError):
                    pass
                total += self._last.get(p, 0.0)
            out[name] = total
        return out


def _tree(pids) -> list[int]:
    out, stack = [], list(pids)
    while stack:
        p = stack.pop()
        if p not in out:
            out.append(p)
            stack += children(p)
    return out


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += _stat_cpu(Path(f"/proc/{p}/stat"))
        except (OSError, IndexError, ValueError):
            continue
        stack += children(p)
    return total


# ---------------------------------------------------------------- memory from /proc

def rss_mib(pid: int) -> float | None:
    """Resident memory of one process (VmRSS), MiB; None once it is gone."""
    return _proc_mib(Path(f"/proc/{pid}/status"), "VmRSS:")


def pss_mib(pid: int) -> float | None:
    """Proportional set size (shared pages split among the processes sharing them), MiB."""
    return _proc_mib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")


def _proc_mib(path: Path, key: str) -> float | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- processes

def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def callers_session() -> aiohttp.ClientSession:
    """One client session for many simulated calls: aiohttp's connector holds at most 100 connections by
    default, and the 101st call would wait, unanswered, for one of them to close."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def start_edge(triton_url: str, port: int, log: Path) -> subprocess.Popen:
    """The real edge in its own process (`python -m edge.serve --no-triton`), against a running tritonserver."""
    env = dict(os.environ, TRITON_URL=triton_url, START_TRITON="false", EDGE_PORT=str(port), EDGE_HOST="127.0.0.1",
               TWILIO_AUTH_TOKEN="", PUBLIC_URL="")
    return subprocess.Popen([sys.executable, "-m", "edge.serve", "--no-triton", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- statistics

def pct(values, q: float) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else None


def stats(values, qs=(50, 95, 99)) -> dict:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"n": 0}
    out = {"n": len(values)}
    for q in qs:
        out[f"p{q}"] = round(float(np.percentile(values, q)), 2)
    out["max"] = round(max(values), 2)
    out["mean"] = round(float(np.mean(values)), 2)
    return out


# ---------------------------------------------------------------- event-loop lag

class LoopLag:
    """Samples this process's event-loop lag: how late a `sleep(interval)` wakes up."""

    def __init__(self, interval: float = 0.01, stall_s: float = 0.05):
        self.interval, self.stall_s = interval, stall_s
        self.samples: list[float] = []  # (seconds)
        self.stalls: list[tuple[float, float]] = []  # (unix time the loop woke, seconds late) over stall_s
        self._task: asyncio.Task | None = None

    def start(self) -> "LoopLag":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(loop.time() - t - self.interval, 0.0)
            self.samples.append(lag)
            if lag > self.stall_s:
                self.stalls.append((time.time(), lag))

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


# ---------------------------------------------------------------- Prometheus histograms

def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def histograms(text: str, name: str, label: str | None = None) -> dict:
    """{label value (or ''): {"buckets": [(le, cumulative count)], "sum": s, "count": n}} of one histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            key = s.labels.get(label, "") if label else ""
            h = out.setdefault(key, {"buckets": [], "sum": 0.0, "count": 0.0})
            if s.name.endswith("_bucket"):
                h["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_sum"):
                h["sum"] = s.value
            elif s.name.endswith("_count"):
                h["count"] = s.value
    for h in out.values():
        h["buckets"].sort()
    return out


def histogram_delta(after: dict, before: dict) -> dict:
    """What was observed between two scrapes, per label."""
    out = {}
    for key, h in after.items():
        b = before.get(key, {"buckets": [], "sum": 0.0, "count": 0.0})
        prev = dict(b["buckets"])
        out[key] = {"buckets": [(le, c - prev.get(le, 0.0)) for le, c in h["buckets"]],
                    "sum": h["sum"] - b["sum"], "count": h["count"] - b["count"]}
    return out


def histogram_quantile(h: dict, q: float) -> float | None:
    """Prometheus-style quantile (linear inside the bucket) of a histogram; q in [0, 1]."""
    total = h["count"]
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, cumulative in h["buckets"]:
        if cumulative >= rank:
            if le == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower


# ---------------------------------------------------------------- the agent's audio as the simulator got it

FRAME_MS = 20.0
GLITCH_GAP_MS = 60.0  # a gap this long inside a reply outruns the edge's 80 ms lead: the caller may hear it


def reply_gaps(report) -> list[dict]:
    """The agent's replies in one simulated call (the greeting, then one per caller turn), each with the
    inter-arrival gaps (ms) of its frames from its first audible frame to the next caller turn.

    A reply's first frames arrive at once by design (the edge sends `OUTBOUND_LEAD_MS` ahead of real time):
    `lead` counts those leading near-zero gaps, which jitter (|gap - 20 ms|) leaves out. `ends[k]` is when the
    frame that closed `gaps[k]` arrived."""
    inf = float("inf")
    bounds = [t.started_at for t in report.turns] + [inf]
    windows = [("greeting", -inf, bounds[0])]
    for i, turn in enumerate(report.turns):
        lo = turn.speech_end if turn.speech_end is not None else (turn.ended_at or turn.started_at)
        windows.append((f"turn{i}", lo, bounds[i + 1]))
    out = []
    frames = report.frames
    for name, lo, hi in windows:
        ts = [f.t for f in frames if lo <= f.t < hi]
        first = next((k for k, f in enumerate(f for f in frames if lo <= f.t < hi) if f.audible), None)
        if first is None or len(ts) - first < 2:
            continue
        times = np.asarray(ts[first:])
        gaps = np.diff(times) * 1000
        lead = 0
        while lead < min(len(gaps), 10) and gaps[lead] < FRAME_MS / 2:
            lead += 1
        out.append({"reply": name, "gaps": gaps, "ends": times[1:], "lead": lead})
    return out


def jitter_and_glitches(replies: list[dict], since: float = -float("inf"), until: float = float("inf"),
                        offset: float = 0.0) -> tuple[np.ndarray, int]:
    """|gap - 20 ms| of the replies' steady gaps whose two frames arrived in [since, until) (times + offset),
    and how many of those gaps were longer than GLITCH_GAP_MS. A gap that straddles a bound is not the
    window's: after a steady window the simulator is busy with its own work (calls hanging up, its reports
    gathered), and a stall of its loop reads as a gap in every call at once."""
    jitter, glitches = [np.zeros(0)], 0
    for r in replies:
        ends = r["ends"] + offset
        inside = (ends - r["gaps"] / 1000 >= since) & (ends < until)
        jitter.append(np.abs(r["gaps"][r["lead"]:][inside[r["lead"]:]] - FRAME_MS))
        glitches += int((r["gaps"][inside] > GLITCH_GAP_MS).sum())
    return np.concatenate(jitter), glitches


async def wait_quiet(ours, limit_cores: float, max_wait_s: float) -> dict:
    """On a shared machine: wait (at most `max_wait_s`) until the processes that are not ours use less than
    `limit_cores`, measured over 1 s windows. `ours()` returns our processes' CPU seconds so far.
    Returns what the last window saw and how long we waited."""
    start = time.monotonic()
    while True:
        m0, o0, t0 = machine_cpu()["busy"], ours(), time.monotonic()
        await asyncio.sleep(1.0)
        wall = time.monotonic() - t0
        others = max((machine_cpu()["busy"] - m0 - (ours() - o0)) / wall, 0.0)
        waited = time.monotonic() - start
        if others < limit_cores or waited >= max_wait_s:
            return {"others_cores": round(others, 2), "waited_s": round(waited, 1), "quiet": others < limit_cores}


class GcPauses:
    """Garbage-collector pauses of this process (each collection's wall time), to tell them from other stalls."""

    def __init__(self):
        import gc

        self.pauses: list[tuple[float, int, float]] = []  # (unix time, generation, seconds)
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((time.time(), info.get("generation", -1), time.perf_counter() - self._start))
