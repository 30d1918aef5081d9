"""One real tritonserver for the whole test session (never a fake), on free ports."""

from __future__ import annotations

import os
import socket

import pytest

from edge.tritonserver import MODELS, TritonServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """The CPU profile's three models on a real tritonserver. TEST_MODELS=asr,tts loads fewer while developing."""
    models = tuple(m for m in os.environ.get("TEST_MODELS", ",".join(MODELS)).split(",") if m)
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer("cpu", free_port(), free_port(), free_port(), log_file=log, models=models)
    server.start(timeout=600)
    yield server
    server.stop()
    print(f"tritonserver log: {log}")
