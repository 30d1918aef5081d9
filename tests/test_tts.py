"""tts on the real tritonserver: intelligible streamed speech, bad input refused, cancellation that stops the engine."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import numpy as np
import pytest
from tritonclient.grpc.service_pb2 import ModelInferRequest

from edge import audio
from edge.triton import ModelError, Triton, request
from tests.metrics import ascrape, wait_for
from tests.speech import wer

log = logging.getLogger(__name__)

SENTENCE = "Your appointment is confirmed for Tuesday at ten in the morning."
PARAGRAPH = ("Thank you for calling the clinic. Your appointment is confirmed for Tuesday at ten. "
             "Please arrive a few minutes early. Bring your insurance card with you. "
             "If you need to cancel, call us a day before. Have a wonderful afternoon.")
STORY = " ".join(f"This is sentence number {n} of a long answer that the caller will interrupt." for n in range(1, 21))


@pytest.fixture(scope="module")
async def client(triton):
    client = Triton(triton.grpc_url)
    yield client
    await client.close()


async def timed_speech(client: Triton, text: str, **kwargs) -> tuple[list[np.ndarray], int, list[float]]:
    """The chunks of one utterance, their sample rate, and when each arrived (seconds after the request)."""
    start = time.perf_counter()
    chunks, rate, arrivals = [], 0, []
    async for samples, rate in client.tts(text, **kwargs):
        arrivals.append(time.perf_counter() - start)
        chunks.append(samples)
    return chunks, rate, arrivals


async def transcribe(client: Triton, pcm: np.ndarray, rate: int) -> str:
    """What the asr model hears in `pcm`, sent as a call would: 20 ms chunks at 16 kHz, then silence, then the end."""
    pcm16k = audio.resample(pcm, rate, audio.ASR_RATE)
    stream = client.asr(f"tts-test-{uuid.uuid4()}")
    step = audio.ASR_RATE * audio.FRAME_MS // 1000
    for chunk in np.array_split(pcm16k, max(1, len(pcm16k) // step)):
        stream.send(chunk)
    for _ in range(1500 // audio.FRAME_MS):
        stream.send(np.zeros(step, np.int16))
    stream.end()
    finals = [event["text"] async for event in stream.events() if event["type"] == "final"]
    return " ".join(finals)


async def test_speech_streams_and_says_the_text(client, triton):
    chunks, rate, arrivals = await timed_speech(client, SENTENCE)
    assert chunks and rate > 0
    pcm = np.concatenate(chunks)
    seconds = len(pcm) / rate
    assert 1.5 < seconds < 10, f"{seconds:.1f} s of audio for a 12-word sentence"
    assert np.abs(pcm.astype(np.int32)).max() > 1000, "the audio is silent"
    log.info("tts: first chunk %.0f ms, %.2f s of audio in %.2f s (RTF %.2f), %d chunks at %d Hz",
             arrivals[0] * 1000, seconds, arrivals[-1], arrivals[-1] / seconds, len(chunks), rate)
    if "asr" not in triton.models:
        pytest.skip("asr is not loaded (TEST_MODELS); the transcript check needs it")
    heard = await transcribe(client, pcm, rate)
    log.info("asr heard: %r", heard)
    assert wer(SENTENCE, heard) <= 0.2, f"asr heard {heard!r}"


async def test_first_chunk_arrives_before_the_last(client):
    chunks, rate, arrivals = await timed_speech(client, PARAGRAPH)
    seconds = sum(len(c) for c in chunks) / rate
    log.info("tts paragraph: %d chunks, first after %.0f ms, last after %.0f ms, %.1f s of audio",
             len(chunks), arrivals[0] * 1000, arrivals[-1] * 1000, seconds)
    assert len(chunks) >= 3, "a six-sentence paragraph must stream in several chunks"
    assert arrivals[0] < arrivals[-1] / 2, "the first chunk must not wait for the rest of the paragraph"
    assert arrivals[0] < len(chunks[0]) / rate, "the first chunk must arrive faster than it plays"


async def test_rate_and_voice_are_honoured(client):
    slow, rate, _ = await timed_speech(client, SENTENCE, rate=0.75, voice="en_US-joe-medium")
    fast, _, _ = await timed_speech(client, SENTENCE, rate=1.5)
    slow_s, fast_s = sum(map(len, slow)) / rate, sum(map(len, fast)) / rate
    assert slow_s > 1.5 * fast_s, f"rate 0.75 gave {slow_s:.2f} s, rate 1.5 gave {fast_s:.2f} s"


def tts_request(text: bytes | None, voice: bytes | None = None, rate: float | None = None) -> ModelInferRequest:
    """The raw request, so tests can send what the edge's client never would."""
    inputs = {}
    if text is not None:
        inputs["TEXT"] = np.array([text], dtype=np.object_)
    if voice is not None:
        inputs["VOICE"] = np.array([voice], dtype=np.object_)
    if rate is not None:
        inputs["RATE"] = np.array([rate], np.float32)
    return request("tts", inputs)


BAD_REQUESTS = {
    "no TEXT": (None, {}, r"missing required input\(s\) \['TEXT'\]"),  # refused by Triton itself
    "empty text": (b"", {}, "TEXT is empty"),
    "only spaces": (b"   \n ", {}, "TEXT is empty"),
    "not UTF-8": (b"caf\xe9 au lait", {}, "not valid UTF-8"),
    "oversized text": (b"word " * 401, {}, "more than 2000"),
    "oversized bytes": (b"a" * 70_000, {}, "more than the 65536 allowed"),
    "wrong VOICE": (b"Hello.", {"voice": b"en_GB-nobody-high"}, "is not served here"),
    "RATE out of range": (b"Hello.", {"rate": 3.0}, "RATE"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_input_is_refused_and_the_model_keeps_serving(client, case):
    text, kwargs, error = BAD_REQUESTS[case]
    with pytest.raises(ModelError, match=error):
        async for _ in client._stream(tts_request(text, **kwargs)):
            pass
    chunks, _, _ = await timed_speech(client, "Hello.")
    assert sum(map(len, chunks)) > 0


async def test_cancelling_mid_utterance_stops_the_engine(client, triton):
    url, model = triton.metrics_url, {"model": "tts"}
    before = await ascrape(url)
    received = 0
    async with contextlib.aclosing(client.tts(STORY)) as chunks:
        async for _ in chunks:
            received += 1
            break
        cancelled_at = time.time()
    assert received == 1

    def stopped(m):
        cancelled = "voice_requests_cancelled_total"
        more_cancelled = m.value(cancelled, **model) > before.value(cancelled, **model)
        return more_cancelled and m.value("voice_requests_active", **model) == 0

    after = await wait_for(url, stopped, timeout=10)
    assert stopped(after), "the server never reported the cancelled request as stopped"
    stop_latency = after.value("voice_last_cancel_stop_seconds", **model) - cancelled_at
    sent = after.value("voice_outputs_total", **model) - before.value("voice_outputs_total", **model)
    log.info("tts engine stopped %.0f ms after the client cancelled, after %d of 20 sentences sent",
             stop_latency * 1000, sent)
    assert stop_latency < 2.0
    assert sent < 5, "synthesis went on after the cancel"
    later = await wait_for(url, lambda m: False, timeout=1.0)  # a second of quiet: no more chunks come
    assert later.value("voice_outputs_total", **model) == after.value("voice_outputs_total", **model)
    assert later.value("voice_requests_active", **model) == 0
