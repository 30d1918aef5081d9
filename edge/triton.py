"""Async clients for our three Triton models, written against model_repository/README.md alone.

One gRPC stream per in-flight llm or tts request and one long stream per
call for asr, because cancelling a stream cancels every request on it. Leaving
an `llm()` / `tts()` iteration early (break, exception, task cancel) cancels its
stream, and Triton's `request.is_cancelled()` stops the engine.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import InferenceServerException

MODELS = ("asr", "llm", "tts")


class ModelError(RuntimeError):
    """A model answered a request with an error."""


def _bytes_input(name: str, values: list[str]) -> InferInput:
    t = InferInput(name, [len(values)], "BYTES")
    t.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_))
    return t


def _input(name: str, array: np.ndarray, datatype: str) -> InferInput:
    t = InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def _is_final(result: InferResult) -> bool:
    p = result.get_response().parameters.get("triton_final_response")
    return bool(p and p.bool_param)


def _text(result: InferResult, name: str) -> str:
    value = result.as_numpy(name)
    return b"".join(value.reshape(-1)).decode() if value is not None else ""


async def _drain(responses, timeout: float = 2.0) -> None:
    """Let the server end a finished stream itself: cancelling a request that has just completed is
    needless work on the server and races with its release in Triton's gRPC frontend (server#7840)."""
    async def rest():
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(rest(), timeout)
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        responses.cancel()


class Triton:
    """One channel to the server; methods open a stream per request (llm, tts) or per call (asr)."""

    def __init__(self, url: str):
        self.url = url
        self.client = grpc_aio.InferenceServerClient(url)

    async def close(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        try:
            if not await self.client.is_server_ready():
                return False
            return all([await self.client.is_model_ready(m) for m in MODELS])
        except InferenceServerException:
            return False

    async def _stream(self, request: dict) -> AsyncIterator[InferResult]:
        async def requests():
            yield request

        responses = self.client.stream_infer(requests())
        done = False
        try:
            async for result, error in responses:
                if error is not None:
                    done = True
                    await _drain(responses)
                    raise ModelError(f"{request['model_name']}: {error.message()}")
                done = _is_final(result)
                yield result
                if done:
                    break
            await _drain(responses)
        finally:
            if not done:
                responses.cancel()  # we left early: Triton cancels the request and the model stops

    async def llm(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.7,
                  stop: list[str] | None = None, request_id: str = "") -> AsyncIterator[str]:
        """Text deltas of the reply, as the engine produces them."""
        inputs = [_bytes_input("MESSAGES", [json.dumps(messages)]),
                  _input("MAX_TOKENS", np.array([max_tokens], np.int32), "INT32"),
                  _input("TEMPERATURE", np.array([temperature], np.float32), "FP32")]
        if stop:
            inputs.append(_bytes_input("STOP", stop))
        async with aclosing(self._stream({"model_name": "llm", "inputs": inputs, "request_id": request_id})) as results:
            async for result in results:
                delta = _text(result, "TEXT")
                if delta:
                    yield delta

    async def tts(self, text: str, rate: float = 1.0, voice: str | None = None,
                  request_id: str = "") -> AsyncIterator[tuple[np.ndarray, int]]:
        """(int16 samples, sample rate) pieces of the spoken text, as the engine produces them.

        Close the iteration (`aclosing`, or let the task be cancelled) to cancel the request."""
        inputs = [_bytes_input("TEXT", [text]), _input("RATE", np.array([rate], np.float32), "FP32")]
        if voice:
            inputs.append(_bytes_input("VOICE", [voice]))
        async with aclosing(self._stream({"model_name": "tts", "inputs": inputs, "request_id": request_id})) as results:
            async for result in results:
                samples = result.as_numpy("AUDIO")
                if samples is not None and samples.size:
                    yield samples.astype(np.int16), int(result.as_numpy("SAMPLE_RATE")[0])

    def asr(self, call_id: str) -> "AsrStream":
        return AsrStream(self.client, call_id)


class AsrStream:
    """The call's one long asr stream: `send()` caller audio (16 kHz int16), iterate `events()`."""

    _END = object()

    def __init__(self, client: grpc_aio.InferenceServerClient, call_id: str):
        self.call_id = call_id
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._started = False
        self._responses = client.stream_infer(self._requests())

    async def _requests(self):
        while True:
            item = await self._outbox.get()
            end = item is self._END
            samples = np.zeros(0, np.int16) if end else item
            request = {"model_name": "asr", "inputs": [_input("AUDIO", samples, "INT16")],
                       "sequence_id": self.call_id, "sequence_start": not self._started, "sequence_end": end}
            self._started = True
            yield request
            if end:
                return

    def send(self, pcm16k: np.ndarray) -> None:
        if pcm16k.size:
            self._outbox.put_nowait(pcm16k.astype(np.int16))

    def end(self) -> None:
        """Finish the stream: the server answers with any last final event, then an `end` event."""
        self._outbox.put_nowait(self._END)

    async def events(self) -> AsyncIterator[dict]:
        async for result, error in self._responses:
            if error is not None:
                raise ModelError(f"asr: {error.message()}")
            event = json.loads(_text(result, "EVENT"))
            yield event
            if event["type"] == "end":
                await _drain(self._responses)
                return

    def cancel(self) -> None:
        self._responses.cancel()
