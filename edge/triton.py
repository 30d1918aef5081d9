"""Async clients for our three Triton models, written against model_repository/README.md alone.

One gRPC stream per in-flight llm or tts request and one long stream per
call for asr, because cancelling a stream cancels every request on it. Leaving
an `llm()` / `tts()` iteration early (break, exception, task cancel) cancels its
stream, and Triton's `request.is_cancelled()` stops the engine.

Requests are protobufs built straight from numpy arrays (`request()`) and sent
on Triton's generated gRPC stub: a call's asr stream carries several requests a
second, and tritonclient's dict -> InferInput -> protobuf path costs more per
request (`python -m perf.asr_client`). Responses are read with tritonclient's
`InferResult`.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import AsyncIterator

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

MODELS = ("asr", "llm", "tts")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a tts response carries a sentence of audio; far less in practice


class ModelError(RuntimeError):
    """A model answered a request with an error."""


def request(model: str, inputs: dict[str, np.ndarray], request_id: str = "",
            **parameters: str | bool) -> service_pb2.ModelInferRequest:
    """One inference request: each array becomes a raw input tensor (object arrays of bytes are BYTES);
    `parameters` are Triton's request parameters (sequence_id, sequence_start, sequence_end)."""
    r = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        r.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=array.shape)
        r.raw_input_contents.append(serialize_byte_tensor(array).item() if array.dtype == np.object_
                                    else array.tobytes())
    for key, value in parameters.items():
        if isinstance(value, bool):
            r.parameters[key].bool_param = value
        else:
            r.parameters[key].string_param = value
    return r


def _texts(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


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
        self._channel = grpc.aio.insecure_channel(url, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self) -> bool:
        try:
            if not (await self.stub.ServerReady(service_pb2.ServerReadyRequest())).ready:
                return False
            return all([(await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=m))).ready for m in MODELS])
        except grpc.aio.AioRpcError:
            return False

    async def model_config(self, model: str) -> dict:
        """The model's config as served (JSON field names, as Triton's own JSON shows it)."""
        response = await self.stub.ModelConfig(service_pb2.ModelConfigRequest(name=model))
        return MessageToDict(response.config, preserving_proto_field_name=True)

    async def _stream(self, one: service_pb2.ModelInferRequest) -> AsyncIterator[InferResult]:
        responses = self.stub.ModelStreamInfer(iter([one]))
        done = False
        try:
            async for response in responses:
                if response.error_message:
                    done = True
                    await _drain(responses)
                    raise ModelError(f"{one.model_name}: {response.error_message}")
                result = InferResult(response.infer_response)
                done = _is_final(result)
                yield result
                if done:
                    break
            await _drain(responses)
        finally:
            if not done:
                responses.cancel()  # we left early: Triton cancels the request and the model stops

    def llm(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.7,
            stop: list[str] | None = None, request_id: str = "") -> "LlmReply":
        """The reply's text deltas, as the engine produces them (`LlmReply`)."""
        inputs = {"MESSAGES": _texts([json.dumps(messages)]), "MAX_TOKENS": np.array([max_tokens], np.int32),
                  "TEMPERATURE": np.array([temperature], np.float32)}
        if stop:
            inputs["STOP"] = _texts(stop)
        return LlmReply(self._stream(request("llm", inputs, request_id)))

    async def tts(self, text: str, rate: float = 1.0, voice: str | None = None,
                  request_id: str = "") -> AsyncIterator[tuple[np.ndarray, int]]:
        """(int16 samples, sample rate) pieces of the spoken text, as the engine produces them.

        Close the iteration (`aclosing`, or let the task be cancelled) to cancel the request."""
        inputs = {"TEXT": _texts([text]), "RATE": np.array([rate], np.float32)}
        if voice:
            inputs["VOICE"] = _texts([voice])
        async with aclosing(self._stream(request("tts", inputs, request_id))) as results:
            async for result in results:
                samples = result.as_numpy("AUDIO")
                if samples is not None and samples.size:
                    yield samples.astype(np.int16), int(result.as_numpy("SAMPLE_RATE")[0])

    def asr(self, call_id: str) -> "AsrStream":
        return AsrStream(self.stub, call_id)


class LlmReply:
    """An llm reply: an async iterator of its text deltas; `finish_reason` is "stop" or "length" once the
    last came. Close it (`aclose`, `aclosing`, or let the task be cancelled) to cancel the request."""

    def __init__(self, results: AsyncIterator[InferResult]):
        self._results = results
        self.finish_reason = ""

    def __aiter__(self) -> "LlmReply":
        return self

    async def __anext__(self) -> str:
        while True:
            result = await anext(self._results)
            self.finish_reason = _text(result, "FINISH_REASON") or self.finish_reason
            if delta := _text(result, "TEXT"):
                return delta

    async def aclose(self) -> None:
        await self._results.aclose()


class AsrStream:
    """The call's one long asr stream: `send()` caller audio (16 kHz int16), iterate `events()`."""

    _END = object()

    def __init__(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, call_id: str):
        self.call_id = call_id
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._responses = stub.ModelStreamInfer(self._requests())

    async def _requests(self):
        start = True
        while True:
            item = await self._outbox.get()
            end = item is self._END
            samples, partials = (np.zeros(0, np.int16), True) if end else item
            yield request("asr", {"AUDIO": samples, "PARTIALS": np.array([partials])}, sequence_id=self.call_id,
                          sequence_start=start, sequence_end=end)
            start = False
            if end:
                return

    def send(self, pcm16k: np.ndarray, partials: bool = True) -> None:
        """`partials`: whether the caller's words are wanted while they speak (asr contract: `PARTIALS`)."""
        if pcm16k.size:
            self._outbox.put_nowait((pcm16k.astype(np.int16, copy=False), partials))

    def end(self) -> None:
        """Finish the stream: the server answers with any last final event, then an `end` event."""
        self._outbox.put_nowait(self._END)

    async def events(self) -> AsyncIterator[dict]:
        async for response in self._responses:
            if response.error_message:
                raise ModelError(f"asr: {response.error_message}")
            event = json.loads(_text(InferResult(response.infer_response), "EVENT"))
            yield event
            if event["type"] == "end":
                await _drain(self._responses)
                return

    def cancel(self) -> None:
        self._responses.cancel()
