"""What one asr request costs the client process: the edge's own client against tritonclient's standard one.

    python -m perf.asr_client [--calls 50] [--rate 25] [--seconds 8] [--rounds 2] [--out perf/results]

Each asr request is a gRPC write on the call's stream, and the edge sends several
a second per call, so its cost per request bounds how many calls one edge core
carries. N streams (one per "call") each send a 40 ms chunk --rate times a second
against the real tritonserver serving perf/models/ (trivial, measurement-only
models that answer at once: NOT the product), for --seconds, and the CPU time of
this whole process (every thread) is divided by the requests sent. Two clients,
alternated --rounds times:
  * edge: `edge.triton.AsrStream` (protobufs built straight from numpy arrays,
    sent on Triton's generated gRPC stub);
  * tritonclient: `tritonclient.grpc.aio.InferenceServerClient.stream_infer`
    with `InferInput` tensors, the library's documented way.
Writes <out>/asr-client-<stamp>.json and asr-client-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput

from edge.triton import Triton
from edge.tritonserver import free_port
from perf.common import ROOT, command_line, machine_info, save_results
from perf.edge_only import TrivialTriton

CHUNK = np.zeros(640, np.int16)  # 40 ms at 16 kHz
CHUNK[::7] = 3000


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def paced(send, calls: int, rate: float, seconds: float) -> int:
    """`send(call)` for every call, `rate` times a second on an absolute clock; the requests sent."""
    start, ticks = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        ticks += 1
        for call in range(calls):
            send(call)
        await asyncio.sleep(max(0.0, start + ticks / rate - time.monotonic()))
    return ticks * calls


async def edge_client(url: str, calls: int, rate: float, seconds: float) -> tuple[int, float]:
    triton = Triton(url)
    streams = [triton.asr(f"asr-client-edge-{i}-{time.time()}") for i in range(calls)]

    async def read(stream):
        async for _ in stream.events():
            pass

    readers = [asyncio.create_task(read(s)) for s in streams]
    await asyncio.sleep(0.5)
    cpu = process_cpu()
    sent = await paced(lambda c: streams[c].send(CHUNK), calls, rate, seconds)
    used = process_cpu() - cpu
    for s in streams:
        s.end()
    await asyncio.gather(*readers)
    await triton.close()
    return sent, used


async def tritonclient_client(url: str, calls: int, rate: float, seconds: float) -> tuple[int, float]:
    client = grpc_aio.InferenceServerClient(url)
    outboxes = [asyncio.Queue() for _ in range(calls)]

    async def requests(outbox: asyncio.Queue, sequence: str):
        start = True
        while (chunk := await outbox.get()) is not None:
            tensor = InferInput("AUDIO", list(chunk.shape), "INT16")
            tensor.set_data_from_numpy(chunk)
            yield {"model_name": "asr", "inputs": [tensor], "sequence_id": sequence, "sequence_start": start}
            start = False
        tensor = InferInput("AUDIO", [0], "INT16")
        tensor.set_data_from_numpy(np.zeros(0, np.int16))
        yield {"model_name": "asr", "inputs": [tensor], "sequence_id": sequence, "sequence_end": True}

    async def read(responses):
        async for result, error in responses:
            if error is None and b'"end"' in result.as_numpy("EVENT")[0]:
                return

    readers = [asyncio.create_task(read(client.stream_infer(requests(q, f"asr-client-tc-{i}-{time.time()}"))))
               for i, q in enumerate(outboxes)]
    await asyncio.sleep(0.5)
    cpu = process_cpu()
    sent = await paced(lambda c: outboxes[c].put_nowait(CHUNK), calls, rate, seconds)
    used = process_cpu() - cpu
    for q in outboxes:
        q.put_nowait(None)
    await asyncio.gather(*readers)
    await client.close()
    return sent, used


CLIENTS = {"edge": edge_client, "tritonclient": tritonclient_client}


async def measure(url: str, args) -> dict:
    runs = {name: [] for name in CLIENTS}
    for _ in range(args.rounds):
        for name, client in CLIENTS.items():
            sent, used = await client(url, args.calls, args.rate, args.seconds)
            runs[name].append({"requests": sent, "cpu_s": round(used, 3),
                               "us_per_request": round(used / sent * 1e6, 1)})
    return runs


def table(result: dict) -> str:
    s = result["setup"]
    lines = [f"{s['calls']} streams x {s['rate']} requests/s, {s['seconds']} s each, {s['rounds']} rounds; "
             f"CPU of this process per request:",
             f"{'client':>13} {'us/request (each round)':>28} {'median':>7}"]
    for name, runs in result["runs"].items():
        each = ", ".join(f"{r['us_per_request']:.0f}" for r in runs)
        lines.append(f"{name:>13} {each:>28} {statistics.median(r['us_per_request'] for r in runs):>7.0f}")
    m = result["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores_usable']} cores, {m['date']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rate", type=float, default=25.0, help="requests per second per call")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perf-asr-client-"))
    server = TrivialTriton("trivial", free_port(), free_port(), free_port(), log_file=work / "tritonserver.log")
    server.start(timeout=300)
    try:
        import uvloop  # as the edge runs

        runs = uvloop.run(measure(server.grpc_url, args))
    finally:
        server.stop()
    result = {"command": command_line(), "machine": machine_info(),
              "setup": {"calls": args.calls, "rate": args.rate, "seconds": args.seconds, "rounds": args.rounds,
                        "models": "perf/models (trivial, measurement only)"},
              "runs": runs}
    save_results(result, args.out, "asr-client", table)


if __name__ == "__main__":
    main()
