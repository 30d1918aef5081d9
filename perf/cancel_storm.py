"""Reproduce a tritonserver crash: llm and tts streams of two "calls" at once, cancelled at random points.

    python -m perf.cancel_storm [--seconds 120] [--models llm,tts] [--cancel-after 0,1.5] [--server-arg ARG]

Two workers per model each loop: open a stream (one llm request of 64 tokens,
or one tts sentence) and cancel it after uniform(--cancel-after) seconds unless
it finished. Under that load the tritonserver 2.51 of nvidia-pytriton 0.7.0
(Python backend, CPU profile) died here (2026-11-28) in 9 runs of 9 with
llm + tts, within 1-120 s: SIGSEGV inside libtriton_python.so, once
`boost::interprocess::lock_exception` + SIGABRT. It also died with
`--cancel-after 30,31` (nothing cancelled) and with a 64 MiB
`shm-default-byte-size`; `--models llm` or `--models tts` alone survived 60 s.
perf/loadgen.py saw the same SIGSEGV in 4 of 9 two-call levels.
Exit status 1 when the server died (the end of its log is printed), 0 when it survived.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

from edge.triton import Triton
from edge.tritonserver import TritonServer, free_port

MESSAGES = [{"role": "system", "content": "You are a helpful assistant on the phone."},
            {"role": "user", "content": "Tell me about the weather and your day, please."}]
TEXT = "Sure, I can help you with that. Let me check the weather for you."


async def worker(triton: Triton, server: TritonServer, kind: str, rng: random.Random, until: float,
                 cancel_after: tuple[float, float]) -> int:
    n = 0
    while time.time() < until and server.process.poll() is None:
        async def one():
            stream = triton.llm(MESSAGES, 64, request_id=f"{kind}{n}") if kind == "llm" else \
                triton.tts(TEXT, request_id=f"{kind}{n}")
            async with aclosing(stream) as it:
                async for _ in it:
                    pass
        try:
            await asyncio.wait_for(one(), rng.uniform(*cancel_after))  # cancelled at a random point, or finished
        except asyncio.TimeoutError:
            pass
        except Exception as e:  # the server went away, or a request failed
            if server.process.poll() is not None:
                break
            print(f"{kind}: {e!r}"[:300], file=sys.stderr)
        n += 1
    return n


async def storm(server: TritonServer, models: list[str], seconds: float, cancel_after: tuple[float, float]) -> dict:
    triton = Triton(server.grpc_url)
    until = time.time() + seconds
    kinds = [m for m in models if m in ("llm", "tts")] * 2  # two calls
    counts = await asyncio.gather(*(worker(triton, server, k, random.Random(i), until, cancel_after)
                                    for i, k in enumerate(kinds)))
    await triton.close()
    return {f"{k}#{i}": c for i, (k, c) in enumerate(zip(kinds, counts))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--models", default="llm,tts")
    parser.add_argument("--server-arg", action="append", default=[], help="extra tritonserver argument (repeat)")
    parser.add_argument("--cancel-after", default="0,1.5", help="cancel each request after uniform(a,b) seconds")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    log = Path(tempfile.mkdtemp(prefix="cancel-storm-")) / "tritonserver.log"
    server = TritonServer("cpu", free_port(), free_port(), free_port(), log_file=log, models=tuple(models))
    if args.server_arg:  # e.g. --server-arg=--backend-config=python,shm-default-byte-size=67108864
        command = server.command
        server.command = lambda: command() + args.server_arg
    server.start(timeout=600)
    t0 = time.time()
    try:
        a, b = (float(x) for x in args.cancel_after.split(","))
        counts = asyncio.run(storm(server, models, args.seconds, (a, b)))
    finally:
        alive = server.process.poll() is None
        server.stop()
    print(f"requests per worker: {counts}; after {time.time() - t0:.0f} s the server is "
          f"{'alive' if alive else 'DEAD (exit %s)' % server.process.returncode}; log {log}")
    if not alive:
        text = log.read_text(errors="replace")
        start = max(text.rfind("Signal ("), text.rfind("terminate called"))
        print(text[max(start - 600, 0):start + 1200])
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
