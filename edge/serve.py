"""`make serve`: the local tritonserver (CPU profile) and the edge, stopped together on Ctrl-C.

    python -m edge.serve [--port 8080] [--no-triton]
"""

from __future__ import annotations

import argparse
import logging

import uvloop
from aiohttp import web

from edge.app import CallsAccessLogger, create_app
from edge.settings import Settings, media_url, public_url, signatures_required
from edge.telemetry import setup_tracing
from edge.tritonserver import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="EDGE_HOST")
    parser.add_argument("--port", type=int, help="EDGE_PORT")
    parser.add_argument("--no-triton", action="store_true", help="START_TRITON=false: use TRITON_URL as it is")
    args = parser.parse_args()
    overrides = {k: v for k, v in {"edge_host": args.host, "edge_port": args.port}.items() if v is not None}
    if args.no_triton:
        overrides["start_triton"] = False
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    setup_tracing(settings.traces)
    log = logging.getLogger("edge.serve")

    server = None
    if settings.start_triton:
        host, _, port = settings.triton_url.rpartition(":")
        grpc_port = int(port)
        server = TritonServer(settings.triton_profile, http_port=grpc_port - 1, grpc_port=grpc_port,
                              metrics_port=grpc_port + 1)
        log.info("starting tritonserver (%s profile); loading the models takes a minute", settings.triton_profile)
        server.start(timeout=900)
        server.supervise(timeout=900)
    try:
        log.info("edge on http://%s:%d", settings.edge_host, settings.edge_port)
        log.info("Twilio voice webhook (POST): %s -> streams to %s%s", public_url(settings, "/twiml"),
                 media_url(settings), "" if signatures_required(settings) else " (signatures NOT checked)")
        # uvloop: the same asyncio API with a libuv loop, a third less CPU per call on the edge (perf/README.md)
        web.run_app(create_app(settings), host=settings.edge_host, port=settings.edge_port, print=None,
                    access_log_class=CallsAccessLogger, loop=uvloop.new_event_loop())
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
