"""The floor under the edge's CPU: a bare aiohttp + uvloop WebSocket server carrying the same Twilio traffic.

    python -m perf.ws_floor [--calls 50] [--seconds 12] [--out perf/results]

What `perf.edge_only` measures minus everything the edge does: the server reads
each `media` message and decodes its JSON, nothing else; with `outbound` it also
sends one 20 ms `media` frame per call on a 20 ms clock the whole time (the
edge sends them only while a reply plays). Calls come from this process, one
shared 20 ms clock. Prints the server's CPU cores for both and the calls per
core that would leave; writes <out>/ws-floor-<stamp>.json and ws-floor-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from edge import audio, protocol
from edge.tritonserver import free_port
from perf.common import ROOT, CpuTracker, callers_session, command_line, machine_info, save_results, wait_http

FRAME_S = audio.FRAME_MS / 1000
SID = "MZ00000000000000000000000000000000"
SILENCE = bytes([audio.MULAW_SILENCE]) * audio.FRAME_BYTES
SETTLE_S = 3.0  # connections made and the clocks steady before the CPU is read


def serve(port: int, outbound: bool) -> None:
    """The bare server: read and decode every message; with `outbound`, a frame every 20 ms per call."""
    import uvloop

    frame = protocol.media_message(SID, SILENCE)

    async def media(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)

        async def speak() -> None:
            due = time.monotonic()
            while True:
                due += FRAME_S
                await asyncio.sleep(max(due - time.monotonic(), 0))
                await ws.send_str(frame)

        speaker = asyncio.create_task(speak()) if outbound else None
        async for message in ws:
            json.loads(message.data)
        if speaker:
            speaker.cancel()
        return ws

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/media", media)
    app.router.add_get("/healthz", healthz)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def drive(url: str, calls: int, seconds: float, cpu: CpuTracker) -> float:
    """`calls` Twilio-like callers on one 20 ms clock; the server's cores over the last `seconds`."""
    async with callers_session() as session:
        sockets = [await session.ws_connect(url) for _ in range(calls)]
        readers = [asyncio.create_task(_drain(ws)) for ws in sockets]
        start = time.monotonic()
        tick, first = 0, None
        while (now := time.monotonic()) < start + SETTLE_S + seconds:
            if first is None and now >= start + SETTLE_S:
                first = (now, cpu.read()["server"])
            message = protocol.caller_media_message(tick + 1, SID, tick + 1, round(tick * audio.FRAME_MS),
                                                    SILENCE)
            for ws in sockets:
                await ws.send_str(message)
            tick += 1
            await asyncio.sleep(max(start + tick * FRAME_S - time.monotonic(), 0))
        cores = (cpu.read()["server"] - first[1]) / (time.monotonic() - first[0])
        for ws in sockets:
            await ws.close()
        for reader in readers:
            reader.cancel()
        return cores


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


def measure(calls: int, seconds: float, outbound: bool) -> float:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "perf.ws_floor", "--serve", str(port)]
                              + (["--outbound"] if outbound else []), cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 30, server)
        return asyncio.run(drive(f"ws://127.0.0.1:{port}/media", calls, seconds,
                                 CpuTracker({"server": server.pid})))
    finally:
        server.terminate()
        server.wait(timeout=15)


def table(result: dict) -> str:
    lines = ["traffic                                   calls  server cores  calls per core"]
    for row in result["rows"]:
        lines.append(f"{row['traffic']:<41} {row['calls']:>5} {row['cores']:>13.3f} {row['calls_per_core']:>15.0f}")
    m = result["machine"]
    lines.append(f"(a bare aiohttp + uvloop server, NOT the edge) machine: {m['cpu']}, {m['cores_usable']} cores, "
                 f"load {m['loadavg_start']} at start, {m['date']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=12.0, help="CPU measured over this long, per traffic")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--outbound", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.outbound)
        return
    result = {"command": command_line(), "machine": machine_info(), "rows": []}
    for traffic, outbound in (("inbound media only", False), ("inbound + a 20 ms outbound frame always", True)):
        cores = measure(args.calls, args.seconds, outbound)
        result["rows"].append({"traffic": traffic, "calls": args.calls, "cores": round(cores, 4),
                               "calls_per_core": round(args.calls / cores) if cores else None})
    save_results(result, args.out, "ws-floor", table)


if __name__ == "__main__":
    main()
