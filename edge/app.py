"""The aiohttp application: Twilio's webhook, the Media Streams socket, health and metrics.

    POST /twiml    signed voice webhook -> <Connect><Stream url="wss://PUBLIC_URL/media">
    GET  /media    signed WebSocket upgrade -> one `Call`
    GET  /healthz  the process is up
    GET  /readyz   Triton is reachable and its three models are ready
    GET  /metrics  Prometheus
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_log import AccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twilio.twiml.voice_response import Connect, VoiceResponse

from edge import signature, telemetry
from edge.call import Call, Phrases
from edge.playback import FrameClock
from edge.settings import Settings, media_url, public_url, signatures_required
from edge.triton import Triton

log = logging.getLogger("edge.app")

SETTINGS = web.AppKey("settings", Settings)
TRITON = web.AppKey("triton", Triton)
PHRASES = web.AppKey("phrases", Phrases)
CALLS = web.AppKey("calls", set)
CLOCK = web.AppKey("clock", FrameClock)

#: polled by load balancers and Prometheus every few seconds: in the access log they would bury the calls' lines
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

#: webhook form fields handed to the call as <Parameter>s (Twilio strips the stream URL's query string)
CALL_PARAMETERS = {"From": "from", "To": "to", "CallSid": "call_sid", "Direction": "direction"}


async def twiml(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    form = await request.post()
    url = public_url(settings, request.path_qs)
    if not signature.validate_webhook(settings, url, form, request.headers.get(signature.SIGNATURE_HEADER)):
        log.warning("refused /twiml: bad or missing X-Twilio-Signature")
        raise web.HTTPForbidden(text="invalid Twilio signature")
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=media_url(settings))
    for field, name in CALL_PARAMETERS.items():
        if form.get(field):
            stream.parameter(name=name, value=str(form[field]))
    response.append(connect)
    return web.Response(text=str(response), content_type="application/xml")


async def media(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not signature.validate_websocket(settings, request.headers.get(signature.SIGNATURE_HEADER)):
        log.warning("refused /media upgrade: bad or missing X-Twilio-Signature")
        raise web.HTTPForbidden(text="invalid Twilio signature")
    ws = web.WebSocketResponse(max_msg_size=256 * 1024, decode_text=False)  # bytes: pydantic parses JSON bytes
    await ws.prepare(request)
    call = Call(ws, settings, request.app[TRITON], request.app[PHRASES], request.app[CLOCK])
    request.app[CALLS].add(call)
    try:
        await call.serve()
    finally:
        request.app[CALLS].discard(call)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "calls": len(request.app[CALLS])})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[TRITON].ready():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "triton not ready"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class CallsAccessLogger(AccessLogger):
    """aiohttp's access log without the probes: the webhook and stream requests stay, one line each."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path not in PROBE_PATHS:
            super().log(request, response, time)


async def _triton_client(app: web.Application):
    """One gRPC channel for all calls; fixed phrases synthesized as soon as Triton answers."""
    settings = app[SETTINGS]
    app[TRITON] = Triton(settings.triton_url)
    app[PHRASES] = Phrases()
    app[CALLS] = set()
    texts = [settings.greeting, settings.filler_text, settings.apology_text,
             settings.idle_prompt_text, settings.idle_hangup_text]
    warmup = asyncio.create_task(_warm_up(app[TRITON], app[PHRASES], texts, settings))
    lag = asyncio.create_task(telemetry.watch_loop_lag())
    yield
    warmup.cancel()
    lag.cancel()
    for call in list(app[CALLS]):
        await call.ws.close()
    await app[TRITON].close()


async def _warm_up(triton: Triton, phrases: Phrases, texts: list[str], settings: Settings) -> None:
    """Synthesize the fixed phrases, and put the system prompt in the llm's KV cache so that every call's
    first turn only evaluates its own words."""
    while True:
        try:
            if await triton.ready():
                await phrases.prepare(triton, texts, settings.tts_rate)
                messages = [{"role": "system", "content": settings.system_prompt}, {"role": "user", "content": "Hi"}]
                async for _ in triton.llm(messages, max_tokens=1):
                    pass
                log.info("fixed phrases ready, system prompt cached")
                return
        except Exception as e:  # Triton still loading or gone: try again
            log.warning("could not prepare fixed phrases yet: %r", e)
        await asyncio.sleep(1.0)


def create_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[CLOCK] = FrameClock()  # every call's 20 ms pacing on one clock
    if not signatures_required(settings):
        log.warning("TWILIO_AUTH_TOKEN is unset: Twilio signatures are NOT checked (development mode)")
    app.cleanup_ctx.append(_triton_client)
    app.router.add_post("/twiml", twiml)
    app.router.add_get("/media", media)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.metrics:
        app.router.add_get("/metrics", metrics)
    return app
