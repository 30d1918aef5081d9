"""One real tritonserver for the whole test session (never a fake), on free ports."""

from __future__ import annotations

import os

import pytest

from edge.tritonserver import MODELS, TritonServer, free_port


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


class EdgeServer:
    """The real aiohttp edge on a free port, in the test session's event loop."""

    def __init__(self, settings):
        from edge.app import create_app

        self.settings = settings
        self.app = create_app(settings)
        self.port = settings.edge_port
        self.http_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/media"
        self._runner = None

    async def start(self) -> "EdgeServer":
        from aiohttp import web

        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def phrases_ready(self, timeout: float = 120.0) -> None:
        """Wait until the fixed phrases (greeting, filler...) are synthesized, as a served edge would be."""
        import asyncio

        from edge.app import PHRASES

        deadline = asyncio.get_running_loop().time() + timeout
        while self.app[PHRASES].get(self.settings.greeting) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the edge could not synthesize its fixed phrases")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        await self._runner.cleanup()


def edge_settings(triton, **overrides):
    from edge.settings import Settings

    values = dict(triton_url=triton.grpc_url, edge_port=free_port(), start_triton=False,
                  llm_max_tokens=48, idle_prompt_seconds=60.0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
async def edge(triton):
    """The edge in development mode (no signatures), talking to the session's tritonserver."""
    server = await EdgeServer(edge_settings(triton)).start()
    await server.phrases_ready()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def signed_edge(triton):
    """The edge with TWILIO_AUTH_TOKEN set, as deployed behind https://agent.example.com."""
    server = await EdgeServer(edge_settings(triton, twilio_auth_token="12345678901234567890123456789012",
                                            public_url="https://agent.example.com")).start()
    yield server
    await server.stop()
