"""Input data for perf_analyzer (--input-data): llm.json, tts.json and asr.json.

    python perf/perf_analyzer/make_inputs.py [--out perf/perf_analyzer] [--asr-recordings 2]

llm.json and tts.json are small and checked in; asr.json (real speech from
../shared/audio, through the phone line, in 20 ms chunks) is large and is
generated (ignored by git). Format:
https://github.com/triton-inference-server/perf_analyzer/blob/main/docs/input_data.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.speech import recordings  # noqa: E402

HERE = Path(__file__).resolve().parent
CHUNK = 320  # 20 ms at 16 kHz
TRAILING_SILENCE_S = 1.2  # past asr's endpoint (0.35-0.8 s of silence), so every sequence carries a final

SYSTEM = "You are Ava, the phone receptionist of Bright Smile Dental. Reply in one or two short sentences."
LLM_TURNS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi, I'd like to book a cleaning."}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What are your opening hours?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi, I'd like to book a cleaning."},
     {"role": "assistant", "content": "Of course. What day works best for you?"},
     {"role": "user", "content": "Tuesday afternoon, around three."}],
]
LLM_MAX_TOKENS = 32
TTS_TEXTS = [
    "Sure, one moment.",
    "Your appointment is booked for Tuesday at three in the afternoon.",
    "I have moved your cleaning to Thursday morning at nine, and I will send you a text to confirm it.",
]


def llm_data() -> dict:
    return {"data": [{"MESSAGES": [json.dumps(m)], "MAX_TOKENS": [LLM_MAX_TOKENS], "TEMPERATURE": [0.0]}
                     for m in LLM_TURNS]}


def tts_data() -> dict:
    return {"data": [{"TEXT": [t]} for t in TTS_TEXTS]}


def asr_data(count: int) -> dict:
    """One sequence (a call) per recording: its 20 ms chunks, then silence; each step is one request."""
    streams = []
    for rec in recordings()[:count]:
        pcm = rec.phone_pcm16k()
        pcm = np.concatenate([pcm, np.zeros(int(TRAILING_SILENCE_S * 16000), np.int16)])
        pcm = np.concatenate([pcm, np.zeros(-len(pcm) % CHUNK, np.int16)])
        streams.append([{"AUDIO": {"content": chunk.tolist(), "shape": [CHUNK]}}
                        for chunk in pcm.reshape(-1, CHUNK)])
    return {"data": streams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--asr-recordings", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in (("llm", llm_data()), ("tts", tts_data()), ("asr", asr_data(args.asr_recordings))):
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(data, indent=1 if name != "asr" else None) + "\n")
        steps = sum(len(s) if isinstance(s, list) else 1 for s in data["data"])
        print(f"{path}: {len(data['data'])} data streams, {steps} requests, {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
