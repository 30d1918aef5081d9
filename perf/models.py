"""Per-model latency on a real tritonserver: asr, llm and tts, each through its streaming contract.

    python -m perf.models [--out perf/results] [--models asr,llm,tts] [--triton-url host:port]

Without --triton-url it starts its own tritonserver (CPU profile) on free ports
with just the models asked for. It prints a table and writes
`<out>/models-<UTC date and time>.json`, `<out>/models-latest.json` and
`<out>/models-latest.png`.

asr   Each shared recording (tests/speech.py) goes through the phone line
      (8 kHz mu-law and back to 16 kHz) and is streamed in 20 ms chunks paced on
      an absolute clock, as Twilio delivers a call, then silence until the
      turn's final transcript arrives. End of speech = the end of the last
      loud stretch of the sent audio (10 ms RMS above max(peak - 30 dB,
      3 x the noise floor), clicks under 50 ms ignored: end_of_speech()),
      mapped to wall-clock through the time its chunk was sent. Measured
      from there: the asr `speech_stop` event (VAD) and the `final` event
      (endpoint + transcript), and the final's word error rate.
      The whole set runs with --asr-streams (3) calls at once, then again
      (--asr-single: all 18) one call at a time; about 2 minutes in all.
llm   A three-turn conversation (each turn's reply is appended before the
      next user message), --llm-repeats times with a different caller each
      time: time to first delta, deltas/s (one delta is about one token) and
      chars/s per turn. Turns 2 and 3 show the prefix KV cache: their prompts
      are longer, their first token should not be slower. Then each
      conversation has a fourth turn after the other conversations' turns:
      its prompt comes back from the engine's prompt cache.
tts   Sentences of four lengths, --tts-repeats times each: time to first
      audio and real-time factor (synthesis time / audio duration).
      With the llm loaded too, the short and medium ones again while an llm
      reply is being written (as a turn's first clause is synthesized while
      the llm writes the rest): first audio, and the llm's tokens/s meanwhile
      against its tokens/s before the synthesis began.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from edge.triton import Triton
from edge.tritonserver import free_port
from perf.common import ROOT, machine_info, pct, save_results
from tests.speech import Recording, recordings, word_errors

RATE = 16000
CHUNK = RATE * 20 // 1000  # 20 ms at 16 kHz
LEAD_S = 0.3  # silence before the recording, as a call's first words rarely start on its first frame
MAX_TAIL_S = 4.0  # silence after the recording, at most, waiting for the final

SYSTEM_PROMPT = ("You are Ava, the phone receptionist of Bright Smile Dental. You book, move and cancel "
                 "appointments and answer questions about the practice. The practice is open Monday to Friday, "
                 "8 am to 6 pm. A cleaning takes 45 minutes. Speak naturally, as on the phone: one or two short "
                 "sentences per reply, no lists, no markdown.")
USER_TURNS = ("Hi, I'd like to book a cleaning for next week.",
              "Tuesday afternoon works best for me, around three.",
              "Great. Do I need to bring anything with me?")
RETURN_TURN = "One more thing: is there parking near the clinic?"
LLM_MAX_TOKENS = 96

TTS_SENTENCES = {
    "short": "Sure, one moment.",
    "medium": "Your appointment is booked for Tuesday at three in the afternoon.",
    "long": ("I have moved your cleaning to Thursday morning at nine, and I will send a text message to the "
             "number on file to confirm it."),
    "two sentences": ("Thanks for calling Bright Smile Dental. We are open Monday to Friday from eight in the "
                      "morning until six in the evening, so just let me know what works for you."),
}


# ---------------------------------------------------------------- helpers

def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95),
            "mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def end_of_speech(pcm: np.ndarray) -> int:
    """Sample index just after the speech in `pcm`.

    10 ms windows whose RMS is above max(peak - 30 dB, 3 x the noise floor
    (10th percentile)) are loud; loud runs closer than 20 ms are merged and runs
    shorter than 50 ms (a click, a breath) are ignored; speech ends with the
    last run.
    """
    win = RATE // 100
    n = len(pcm) // win
    env = np.sqrt((pcm[: n * win].astype(np.float64).reshape(n, win) ** 2).mean(axis=1))
    threshold = max(env.max() * 10 ** (-30 / 20), 3 * np.percentile(env, 10))
    runs: list[list[int]] = []
    for i in np.nonzero(env > threshold)[0]:
        if runs and i - runs[-1][1] <= 2:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    runs = [r for r in runs if r[1] - r[0] >= 5] or runs
    return int(runs[-1][1] * win) if runs else len(pcm)


async def model_parameters(triton: Triton, model: str) -> dict:
    try:
        config = await triton.model_config(model)
    except Exception as e:  # noqa: BLE001 - informational only
        return {"error": str(e)}
    return {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}


# ---------------------------------------------------------------- asr

async def asr_call(triton: Triton, rec: Recording) -> dict:
    """Stream one recording as a phone call, paced in real time; time its speech_stop and final events."""
    pcm = rec.phone_pcm16k()
    lead = int(LEAD_S * RATE)
    audio = np.concatenate([np.zeros(lead, np.int16), pcm]).astype(np.int16)
    end_sample = lead + end_of_speech(pcm)
    stream = triton.asr(f"perf-{rec.name}-{uuid.uuid4().hex[:8]}")
    events: list[tuple[float, dict]] = []
    turn_open = False  # speech started and no final for it yet

    async def read():
        nonlocal turn_open
        async for event in stream.events():
            events.append((time.perf_counter(), event))
            if event["type"] == "speech_start":
                turn_open = True
            elif event["type"] == "final":
                turn_open = False

    def done() -> bool:  # the whole recording was sent and its last turn got its final
        return i * CHUNK >= len(audio) and not turn_open and any(e["type"] == "final" for _, e in events)

    reader = asyncio.create_task(read())
    end_wall = None
    lag = 0.0
    t0 = time.perf_counter()
    i = 0
    try:
        while not done() and i * CHUNK < len(audio) + MAX_TAIL_S * RATE and not reader.done():
            due = t0 + (i + 1) * CHUNK / RATE  # a frame arrives once its last sample was spoken
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = audio[i * CHUNK:(i + 1) * CHUNK]
            if len(chunk) < CHUNK:
                chunk = np.concatenate([chunk, np.zeros(CHUNK - len(chunk), np.int16)])
            stream.send(chunk)
            now = time.perf_counter()
            lag = max(lag, now - due)
            if end_wall is None and (i + 1) * CHUNK >= end_sample:
                end_wall = now - ((i + 1) * CHUNK - end_sample) / RATE
            i += 1
        by_endpoint = done()
        stream.end()
        await asyncio.wait_for(reader, 60)
    finally:
        if not reader.done():
            stream.cancel()
            reader.cancel()

    finals = [(t, e) for t, e in events if e["type"] == "final"]
    final = finals[-1] if finals and by_endpoint else None  # a final forced by the call's end is no endpoint
    stops = [(t, e) for t, e in events if e["type"] == "speech_stop" and (final is None or t <= final[0])]
    stop = stops[-1] if stops else None
    text = " ".join(e["text"] for _, e in finals).strip()
    errors, n_words = word_errors(rec.transcript, text)
    end_ms = end_sample * 1000 / RATE
    return {
        "recording": rec.name, "audio_s": round(len(pcm) / RATE, 3), "speech_end_audio_ms": round(end_ms),
        "final_ms": round((final[0] - end_wall) * 1000, 1) if final else None,
        "speech_stop_ms": round((stop[0] - end_wall) * 1000, 1) if stop else None,
        "final_by_endpoint": by_endpoint,  # False: no final until the call ended
        "vad_stop_minus_speech_end_ms": round(stop[1]["audio_ms"] - end_ms) if stop else None,
        "final_audio_ms": final[1]["audio_ms"] if final else None,
        "finals": len(finals), "partials": sum(e["type"] == "partial" for _, e in events),
        "text": text, "reference": rec.transcript, "word_errors": errors, "words": n_words,
        "wer": errors / max(n_words, 1), "max_pacing_lag_ms": round(lag * 1000, 1),
    }


async def asr_run(triton: Triton, recs: list[Recording], streams: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for rec in recs:
        queue.put_nowait(rec)
    results = []
    mean_s = statistics.fmean(len(r.phone_pcm16k()) / RATE for r in recs) + LEAD_S + 1.0

    async def worker(k: int):
        await asyncio.sleep(k * mean_s / streams)  # staggered, so the calls' ends do not line up
        while not queue.empty():
            results.append(await asr_call(triton, queue.get_nowait()))

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(streams)))
    order = {r.name: i for i, r in enumerate(recs)}
    results.sort(key=lambda r: order[r["recording"]])
    errors = sum(r["word_errors"] for r in results)
    words = sum(r["words"] for r in results)
    return {"streams": streams, "wall_s": round(time.perf_counter() - started, 1), "recordings": results,
            "summary": {"final_ms": stats([r["final_ms"] for r in results]),
                        "speech_stop_ms": stats([r["speech_stop_ms"] for r in results]),
                        "wer": errors / max(words, 1), "word_errors": errors, "words": words,
                        "missing_finals": sum(r["final_ms"] is None for r in results),
                        "finals_only_at_call_end": sum(not r["final_by_endpoint"] for r in results),
                        "max_pacing_lag_ms": max(r["max_pacing_lag_ms"] for r in results)}}


async def bench_asr(triton: Triton, streams: int, single: int) -> dict:
    recs = recordings()
    await asr_call(triton, recs[0])  # warm-up: first-use costs are not a call's latency
    out = {"runs": [await asr_run(triton, recs, streams)]}
    if single:
        step = max(1, len(recs) // single)
        out["runs"].append(await asr_run(triton, recs[::step][:single], 1))
    return out


# ---------------------------------------------------------------- llm

async def llm_turn(triton: Triton, messages: list[dict]) -> dict:
    started = time.perf_counter()
    times, deltas = [], []
    async for delta in triton.llm(messages, max_tokens=LLM_MAX_TOKENS, temperature=0.0):
        times.append(time.perf_counter())
        deltas.append(delta)
    done = time.perf_counter()
    text = "".join(deltas)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"ttft_ms": round((times[0] - started) * 1000, 1) if times else None,
            "total_ms": round((done - started) * 1000, 1), "deltas": len(deltas), "chars": len(text),
            "deltas_per_s": (len(deltas) - 1) / span if span > 0 else None,
            "chars_per_s": (len(text) - len(deltas[0])) / span if span > 0 else None,
            "prompt_chars": sum(len(m["content"]) for m in messages), "text": text}


async def bench_llm(triton: Triton, repeats: int) -> dict:
    # warm-up: loads the weights' pages and caches the shared system prompt
    await llm_turn(triton, [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Hello?"}])
    runs, conversations = [], []

    async def turn(messages: list[dict], user: str) -> dict:
        messages.append({"role": "user", "content": user})
        reply = await llm_turn(triton, messages)
        messages.append({"role": "assistant", "content": reply["text"]})
        return reply

    for rep in range(repeats):
        # the caller's own context makes each conversation's turn 1 a cold prompt beyond the shared part
        messages = [{"role": "system", "content": f"{SYSTEM_PROMPT} The caller's number is +1 415 555 01{rep:02d}."}]
        runs.append([await turn(messages, user) for user in USER_TURNS])
        conversations.append(messages)
    # each conversation once more, after the others' turns: the engine's contexts hold other calls now, so its
    # prompt comes back from the prompt cache (as most turns do when several calls share the engine)
    for run, messages in zip(runs, conversations):
        run.append(await turn(messages, RETURN_TURN))
    summary = {}
    for k in range(len(USER_TURNS) + 1):
        turns = [run[k] for run in runs]
        name = f"turn{k + 1}" + (" after other calls" if k == len(USER_TURNS) else "")
        summary[name] = {"ttft_ms": stats([t["ttft_ms"] for t in turns]),
                         "deltas_per_s": stats([t["deltas_per_s"] for t in turns]),
                         "chars_per_s": stats([t["chars_per_s"] for t in turns]),
                         "prompt_chars": statistics.fmean(t["prompt_chars"] for t in turns),
                         "deltas": statistics.fmean(t["deltas"] for t in turns)}
    return {"max_tokens": LLM_MAX_TOKENS, "temperature": 0.0, "runs": runs, "summary": summary}


# ---------------------------------------------------------------- tts

async def tts_utterance(triton: Triton, text: str) -> dict:
    started = time.perf_counter()
    first = None
    samples, rate, chunks = 0, 0, 0
    async for pcm, rate in triton.tts(text):
        if first is None:
            first = time.perf_counter()
        samples += len(pcm)
        chunks += 1
    done = time.perf_counter()
    audio_s = samples / rate if rate else 0.0
    return {"first_audio_ms": round((first - started) * 1000, 1) if first else None,
            "total_ms": round((done - started) * 1000, 1), "audio_s": round(audio_s, 3),
            "rtf": (done - started) / audio_s if audio_s else None, "chunks": chunks}


async def bench_tts(triton: Triton, repeats: int) -> dict:
    await tts_utterance(triton, "Hello, this is a warm-up.")
    results = {name: [] for name in TTS_SENTENCES}
    for _ in range(repeats):
        for name, text in TTS_SENTENCES.items():
            results[name].append(await tts_utterance(triton, text))
    summary = {name: {"chars": len(TTS_SENTENCES[name]), "audio_s": statistics.fmean(r["audio_s"] for r in rs),
                      "first_audio_ms": stats([r["first_audio_ms"] for r in rs]),
                      "rtf": stats([r["rtf"] for r in rs])}
               for name, rs in results.items()}
    every = [r for rs in results.values() for r in rs]
    summary["all"] = {"first_audio_ms": stats([r["first_audio_ms"] for r in every]),
                      "rtf": stats([r["rtf"] for r in every])}
    return {"sentences": TTS_SENTENCES, "runs": results, "summary": summary}


async def bench_tts_beside_llm(triton: Triton, repeats: int) -> dict:
    """tts first audio while the llm writes, and what the synthesis costs the llm's writing."""
    results = {name: [] for name in ("short", "medium")}
    for rep in range(repeats):
        for name in results:
            times: list[float] = []
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": f"Caller {rep}: what does a cleaning involve, and how long is it?"}]

            async def write():
                async for _ in triton.llm(messages, max_tokens=LLM_MAX_TOKENS, temperature=0.0):
                    times.append(time.perf_counter())

            writer = asyncio.create_task(write())
            while len(times) < 8 and not writer.done():  # past the prompt, writing at its own pace
                await asyncio.sleep(0.005)
            begun = time.perf_counter()
            utterance = await tts_utterance(triton, TTS_SENTENCES[name])
            ended = time.perf_counter()
            await writer
            during = [t for t in times if begun <= t <= ended]
            before = [t for t in times if t < begun][1:]  # after the first token
            written_through = times and times[-1] > ended  # the llm was still writing when the audio was done
            utterance["llm_tokens_per_s_during"] = len(during) / (ended - begun) if written_through else None
            utterance["llm_tokens_per_s_before"] = (len(before) - 1) / (before[-1] - before[0]) \
                if len(before) > 1 else None
            results[name].append(utterance)
    summary = {name: {"chars": len(TTS_SENTENCES[name]), "first_audio_ms": stats([r["first_audio_ms"] for r in rs]),
                      "llm_tokens_per_s_during": stats([r["llm_tokens_per_s_during"] for r in rs]),
                      "llm_tokens_per_s_before": stats([r["llm_tokens_per_s_before"] for r in rs])}
               for name, rs in results.items()}
    return {"runs": results, "summary": summary}


# ---------------------------------------------------------------- report

def rows(result: dict) -> list[tuple[str, dict, str]]:
    """(stage, stats, unit/note) rows for the table and the plot."""
    out = []
    for run in result.get("asr", {}).get("runs", []):
        s = run["summary"]
        tag = f"{run['streams']} stream{'s' if run['streams'] > 1 else ''}"
        out.append((f"asr speech_stop after end of speech ({tag})", s["speech_stop_ms"], "ms"))
        out.append((f"asr final after end of speech ({tag})", s["final_ms"],
                    f"ms  WER {s['wer']:.1%} ({s['word_errors']}/{s['words']})"))
    for turn, s in result.get("llm", {}).get("summary", {}).items():
        out.append((f"llm first token, {turn} (prompt {s['prompt_chars']:.0f} chars)", s["ttft_ms"],
                    f"ms  {s['deltas_per_s']['p50']:.0f} tok/s  {s['chars_per_s']['p50']:.0f} chars/s"
                    if s["deltas_per_s"]["n"] else "ms"))
    for name, s in result.get("tts", {}).get("summary", {}).items():
        if name == "all":
            continue
        out.append((f"tts first audio, {name} ({s['chars']} chars, {s['audio_s']:.1f} s)", s["first_audio_ms"],
                    f"ms  RTF p50 {s['rtf']['p50']:.2f}"))
    if "tts" in result:
        s = result["tts"]["summary"]["all"]
        out.append(("tts first audio, all sentences", s["first_audio_ms"], f"ms  RTF p50 {s['rtf']['p50']:.2f}"))
    for name, s in result.get("tts_beside_llm", {}).get("summary", {}).items():
        during, before = s["llm_tokens_per_s_during"], s["llm_tokens_per_s_before"]
        out.append((f"tts first audio, {name} ({s['chars']} chars), the llm writing", s["first_audio_ms"],
                    f"ms  llm {during['p50']:.0f} tok/s meanwhile, {before['p50']:.0f} before"
                    if during["n"] and before["n"] else "ms"))
    return out


def table(result: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.0f}"

    lines = [f"{'stage':<62} {'n':>3} {'p50':>6} {'p95':>6}  note", "-" * 100]
    for stage, s, note in rows(result):
        lines.append(f"{stage:<62} {s.get('n', 0):>3} {f(s.get('p50')):>6} {f(s.get('p95')):>6}  {note}")
    m = result["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores_usable']} cores, Python {m['python']}, {m['date']}, "
                 f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(stage, s) for stage, s, _ in rows(result) if s.get("n")]
    if not data:
        return
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(data) + 1.6))
    y = np.arange(len(data))
    p50 = [s["p50"] for _, s in data]
    p95 = [s["p95"] for _, s in data]
    colors = {"asr": "#3b75af", "llm": "#519e3e", "tts": "#c53a32"}
    for yy, (stage, _), a, b in zip(y, data, p50, p95):
        color = colors.get(stage.split()[0], "#777777")
        ax.barh(yy - 0.2, a, height=0.4, color=color)
        ax.barh(yy + 0.2, b, height=0.4, color=color, alpha=0.45)
        ax.text(a, yy - 0.2, f" {a:.0f}", va="center", fontsize=7)
        ax.text(b, yy + 0.2, f" {b:.0f}", va="center", fontsize=7)
    ax.margins(x=0.08)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#555555", label="p50"), Patch(color="#555555", alpha=0.45, label="p95")],
              loc="lower right", fontsize=8)
    ax.set_yticks(y, [stage for stage, _ in data], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds")
    m = result["machine"]
    ax.set_title(f"Per-model latency: {m['cores_usable']} cores ({m['cpu']}), {m['date'][:16]} UTC, "
                 f"load {m['loadavg_start'][0]:.1f}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

async def run(url: str, models: list[str], args, server_info: dict) -> dict:
    result: dict = {"machine": machine_info(), "server": server_info, "models": models}
    triton = Triton(url)
    try:
        for model in models:
            result["server"].setdefault("parameters", {})[model] = await model_parameters(triton, model)
        if "asr" in models:
            t = time.perf_counter()
            result["asr"] = await bench_asr(triton, args.asr_streams, args.asr_single)
            print(f"asr done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        if "llm" in models:
            t = time.perf_counter()
            result["llm"] = await bench_llm(triton, args.llm_repeats)
            print(f"llm done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        if "tts" in models:
            t = time.perf_counter()
            result["tts"] = await bench_tts(triton, args.tts_repeats)
            if "llm" in models:
                result["tts_beside_llm"] = await bench_tts_beside_llm(triton, args.tts_repeats)
            print(f"tts done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    finally:
        await triton.close()
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--models", default="asr,llm,tts")
    parser.add_argument("--triton-url", help="host:port of a running server's gRPC; default: start one here")
    parser.add_argument("--profile", default="cpu", help="config profile when starting the server")
    parser.add_argument("--asr-streams", type=int, default=3, help="calls at once for the whole set")
    parser.add_argument("--asr-single", type=int, default=18,
                        help="how many recordings (spread over the set) also run one call at a time; 0: none")
    parser.add_argument("--llm-repeats", type=int, default=3)
    parser.add_argument("--tts-repeats", type=int, default=5)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - {"asr", "llm", "tts"}
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")

    if args.triton_url:
        result = asyncio.run(run(args.triton_url, models, args, {"url": args.triton_url, "started_here": False}))
    else:
        from edge.tritonserver import TritonServer

        log = Path(tempfile.mkdtemp(prefix="perf-models-")) / "tritonserver.log"
        server = TritonServer(args.profile, free_port(), free_port(), free_port(), log_file=log, models=tuple(models))
        print(f"starting tritonserver ({args.profile}: {', '.join(models)}), log {log}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        server.start(timeout=900)  # (not `with server.start()`: __enter__ would start a second one)
        try:
            info = {"url": server.grpc_url, "started_here": True, "profile": args.profile,
                    "load_s": round(time.perf_counter() - t, 1), "log": str(log)}
            result = asyncio.run(run(server.grpc_url, models, args, info))
        finally:
            server.stop()

    save_results(result, args.out, "models", table, plot)


if __name__ == "__main__":
    main()
