"""llm on the real tritonserver: a streamed conversation, cancellation that stops the engine, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc.service_pb2 import ModelInferRequest

from edge.triton import ModelError, Triton, request
from tests.metrics import ascrape, wait_for

log = logging.getLogger(__name__)

SYSTEM = {"role": "system", "content": "You are the receptionist of a dental clinic, answering the phone. "
                                       "Answer in one or two short sentences."}
CALLER_TURNS = ["Hi, I'd like to book a cleaning next week.",
                "Is Tuesday morning possible?",
                "Great. How much does a cleaning cost without insurance?"]


@pytest.fixture(scope="module")
async def client(triton):
    client = Triton(triton.grpc_url)
    yield client
    await client.close()


async def timed_reply(client: Triton, messages: list[dict], **kwargs) -> tuple[list[str], float, float]:
    """The deltas of one reply, the time to the first and the time to the last (seconds)."""
    start = time.perf_counter()
    deltas, first = [], None
    async for delta in client.llm(messages, **kwargs):
        first = first if first is not None else time.perf_counter() - start
        deltas.append(delta)
    return deltas, first or 0.0, time.perf_counter() - start


def llm_request(messages: bytes, max_tokens: int | None = None, temperature: float | None = None,
                stop: list[str] | None = None) -> ModelInferRequest:
    """The raw request, so tests can send what the edge's client never would."""
    inputs = {"MESSAGES": np.array([messages], dtype=np.object_)}
    if max_tokens is not None:
        inputs["MAX_TOKENS"] = np.array([max_tokens], np.int32)
    if temperature is not None:
        inputs["TEMPERATURE"] = np.array([temperature], np.float32)
    if stop:
        inputs["STOP"] = np.array([s.encode() for s in stop], dtype=np.object_)
    return request("llm", inputs)


async def raw_reply(client: Triton, messages: bytes, **kwargs) -> tuple[str, str]:
    """(the whole text, FINISH_REASON of the FINAL response) of one request."""
    texts, reason = [], None
    async for result in client._stream(llm_request(messages, **kwargs)):
        texts.append(result.as_numpy("TEXT")[0].decode())
        reason = result.as_numpy("FINISH_REASON")[0].decode()
    return "".join(texts), reason


async def test_conversation_streams_deltas_turn_by_turn(client):
    messages = [SYSTEM]
    firsts = []
    for turn, words in enumerate(CALLER_TURNS, 1):
        messages.append({"role": "user", "content": words})
        deltas, first, total = await timed_reply(client, messages, max_tokens=48, temperature=0.3)
        reply = "".join(deltas)
        assert len(deltas) >= 2, f"turn {turn} came in one piece: {deltas!r}"
        assert reply.strip(), f"turn {turn} is empty"
        firsts.append(first)
        rate = (len(deltas) - 1) / (total - first) if total > first else float("nan")
        log.info("turn %d: first delta %.0f ms, %d deltas in %.2f s (%.0f deltas/s after the first): %r",
                 turn, first * 1000, len(deltas), total, rate, reply)
        messages.append({"role": "assistant", "content": reply})  # the next turn carries this reply as history
    log.info("first-delta times by turn (ms): %s", [round(f * 1000) for f in firsts])


async def test_concurrent_calls_are_answered_side_by_side(client):
    calls = [[SYSTEM, {"role": "user", "content": words}] for words in CALLER_TURNS[:2]]
    replies = await asyncio.gather(*(timed_reply(client, messages, max_tokens=24) for messages in calls))
    for deltas, first, total in replies:
        assert "".join(deltas).strip()
    log.info("two calls at once: first deltas after %s ms", [round(first * 1000) for _, first, _ in replies])


async def test_final_response_says_why_the_reply_ended(client):
    ask = json.dumps([SYSTEM, {"role": "user", "content": CALLER_TURNS[0]}]).encode()
    text, reason = await raw_reply(client, ask, max_tokens=3, temperature=0.0)
    assert reason == "length" and text
    text, reason = await raw_reply(client, ask, max_tokens=64, temperature=0.0, stop=[" "])
    assert reason == "stop" and " " not in text


async def test_cancelling_the_stream_stops_the_engine(client, triton):
    url, model = triton.metrics_url, {"model": "llm"}
    before = await ascrape(url)
    story = [{"role": "user", "content": "Tell me a very long story about a dragon who wants to become a dentist. "
                                         "Make it at least ten paragraphs long."}]
    received = 0
    async with contextlib.aclosing(client.llm(story, max_tokens=512, temperature=0.8)) as deltas:
        async for _ in deltas:
            received += 1
            if received == 5:
                break
        cancelled_at = time.time()
    assert received == 5

    def stopped(m):
        cancelled = m.value("voice_requests_cancelled_total", **model)
        return cancelled > before.value("voice_requests_cancelled_total", **model) and \
            m.value("voice_requests_active", **model) == 0

    after = await wait_for(url, stopped, timeout=10)
    assert stopped(after), "the server never reported the cancelled request as stopped"
    stop_latency = after.value("voice_last_cancel_stop_seconds", **model) - cancelled_at
    sent = after.value("voice_outputs_total", **model) - before.value("voice_outputs_total", **model)
    log.info("engine stopped %.0f ms after the client cancelled, after %d deltas sent (client read %d)",
             stop_latency * 1000, sent, received)
    assert stop_latency < 2.0
    assert sent < 512
    later = await wait_for(url, lambda m: False, timeout=1.0)  # a second of quiet: no more deltas come
    assert later.value("voice_outputs_total", **model) == after.value("voice_outputs_total", **model)
    assert later.value("voice_requests_active", **model) == 0


def _messages(content) -> bytes:
    return json.dumps([{"role": "user", "content": content}]).encode()


BAD_REQUESTS = {
    "invalid JSON": (b'[{"role": "user", "content": "hi"}', {}, "not valid JSON"),
    "not UTF-8": (b'[{"role": "user", "content": "caf\xe9"}]', {}, "not valid UTF-8"),
    "not a list": (json.dumps({"role": "user", "content": "hi"}).encode(), {}, "non-empty JSON list"),
    "empty list": (b"[]", {}, "non-empty JSON list"),
    "unknown role": (json.dumps([{"role": "robot", "content": "hi"}]).encode(), {}, "role is 'robot'"),
    "content not text": (json.dumps([{"role": "user", "content": 5}]).encode(), {}, "content must be a string"),
    "oversized": (_messages("a" * 70_000), {}, "more than the 65536 allowed"),
    "longer than the context": (_messages("tell me more " * 1500), {}, "does not fit"),
    "MAX_TOKENS out of range": (_messages("hi"), {"max_tokens": 0}, "MAX_TOKENS"),
    "TEMPERATURE out of range": (_messages("hi"), {"temperature": 5.0}, "TEMPERATURE"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_input_is_refused_and_the_model_keeps_serving(client, case):
    messages, kwargs, error = BAD_REQUESTS[case]
    with pytest.raises(ModelError, match=error):
        await raw_reply(client, messages, **kwargs)
    text, reason = await raw_reply(client, _messages("Say hello."), max_tokens=4)
    assert text and reason in ("stop", "length")


def engine_module():
    """model_repository/llm/1/llama_cpp_engine.py, imported without Triton."""
    path = Path(__file__).resolve().parents[1] / "model_repository/llm/1/llama_cpp_engine.py"
    spec = importlib.util.spec_from_file_location("llama_cpp_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_engine(**kwargs):
    """The llama.cpp engine itself, without Triton."""
    return engine_module().LlamaCppEngine(**kwargs)


def test_a_turn_evaluates_only_what_is_new_even_after_another_call():
    """The system prompt and history stay in llama.cpp's KV cache between turns, and the prompt cache brings
    them back when another call used the context in between."""
    engine = load_engine(gguf="smollm2", n_ctx=1024, instances=1, prompt_cache_mb=64)
    llama = engine._instances[0].llama
    prompts = []  # per generation: (prompt tokens evaluated, prompt length), from its first eval
    evaluate = llama.eval

    def counting_eval(tokens):
        evaluate(tokens)
        if prompts and prompts[-1] is None:
            prompts[-1] = (len(tokens), llama.n_tokens)

    llama.eval = counting_eval

    def reply(messages):
        prompts.append(None)
        text = "".join(delta for delta, _ in engine.generate(messages, 16, 0.0, []))
        return prompts[-1], text

    system = {"role": "system", "content": SYSTEM["content"] + " The clinic is open Monday to Friday from 8 am "
              "to 6 pm; a cleaning costs 120 dollars without insurance; Dr. Patel and Dr. Gomez are the dentists; "
              "the clinic is at 12 Harbor Street, next to the pharmacy, with free parking behind the building."}
    call, other = [system], [{"role": "system", "content": "You take pizza orders. Be brief."}]
    try:
        seen = []
        for turn, words in enumerate(CALLER_TURNS):
            call.append({"role": "user", "content": words})
            (evaluated, length), text = reply(call)
            call.append({"role": "assistant", "content": text})
            seen.append((evaluated, length))
            other.append({"role": "user", "content": f"One pizza number {turn}, please."})
            other.append({"role": "assistant", "content": reply(other)[1]})  # another call takes the context
    finally:
        engine.shutdown()
    log.info("prompt tokens evaluated / prompt length, by turn: %s", seen)
    assert seen[0][0] == seen[0][1]  # the first turn evaluates its whole prompt
    for evaluated, length in seen[1:]:
        assert evaluated < length / 2


def test_gemma3_270m_can_serve():
    """The other GGUF the CPU profile can pick (config parameter gguf)."""
    engine = load_engine(gguf="gemma3-270m", n_ctx=512, instances=1, prompt_cache_mb=0)
    try:
        pieces = list(engine.generate([SYSTEM, {"role": "user", "content": CALLER_TURNS[0]}],
                                      max_tokens=8, temperature=0.0, stop=[]))
    finally:
        engine.shutdown()
    text = "".join(delta for delta, _ in pieces)
    log.info("gemma3-270m: %r", text)
    assert text.strip()
    assert pieces[-1][1] in ("stop", "length")


def test_a_conversation_restored_from_the_prompt_cache_is_sampled_afresh():
    """llama-cpp-python restores the sampler's seed with a cached prompt: without a seed per request, every
    reply to a conversation that comes back from the cache is the same one, whatever the temperature."""
    engine = load_engine(gguf="smollm2", n_ctx=1024, instances=1, prompt_cache_mb=64)
    call = [SYSTEM, {"role": "user", "content": "Tell me something about your clinic."}]
    other = [{"role": "system", "content": "You take pizza orders."}, {"role": "user", "content": "One pizza."}]

    def reply(messages):
        return "".join(delta for delta, _ in engine.generate(messages, 24, 1.0, []))

    try:
        replies = []
        for _ in range(4):
            replies.append(reply(call))
            reply(other)  # another call takes the context: the next reply to `call` comes from the cache
    finally:
        engine.shutdown()
    log.info("replies: %s", replies)
    assert len(set(replies[1:])) == 3


def test_a_reply_ends_at_a_sentence_when_another_call_waits_for_its_context():
    """One llama.cpp context writes one reply at a time, seconds on CPU: while a request waits for it, the
    reply being written ends at its first sentence end past yield_after_chars, and the waiting one starts."""
    engine = load_engine(gguf="smollm2", n_ctx=1024, instances=1, prompt_cache_mb=0, yield_after_chars=40)
    story = [SYSTEM, {"role": "user", "content": "Tell me a long story about your clinic, in many sentences."}]
    short = [SYSTEM, {"role": "user", "content": "Hello?"}]

    def reply(messages, on_delta=lambda: None):
        deltas, reason = [], None
        for delta, reason in engine.generate(messages, 200, 0.0, []):
            deltas.append(delta)
            on_delta()
        return "".join(deltas), reason

    try:
        alone, alone_reason = reply(story)
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(reply(short)))

        def start_waiter():  # once the story has begun: its context is taken
            if waiter.ident is None:
                waiter.start()

        contended, reason = reply(story, start_waiter)
        waiter.join(60)
    finally:
        engine.shutdown()
    log.info("alone (%s): %r / contended (%s): %r", alone_reason, alone, reason, contended)
    assert len(alone) > len(contended) + 40, "the reply written alone should be the longer one"
    assert reason == "length" and len(contended.strip()) >= 40 and contended.rstrip().endswith((".", "!", "?"))
    assert alone.startswith(contended)  # the same reply (temperature 0), only ended sooner
    assert answers and answers[0][0], "the waiting request got no reply"


def test_smollm2_is_requantized_once_to_q8_0_and_keeps_its_weights(tmp_path, monkeypatch):
    """The CPU profile serves SmolLM2's shipped Q4_1 as Q8_0 (llama.cpp's CPU kernels for Q4_1 are slow): made
    once into the cache, read from it after, and the same model: its perplexity on our prompts stays within 1 %."""
    import llama_cpp

    module = engine_module()
    monkeypatch.setattr(module, "CACHE", tmp_path / "cache")
    shipped, _ = module.gguf_file("smollm2")
    made = module.requantized(shipped, "q8_0")
    assert Path(made).parent == tmp_path / "cache"
    written = Path(made).stat().st_mtime_ns
    assert module.requantized(shipped, "q8_0") == made and Path(made).stat().st_mtime_ns == written
    copy = tmp_path / "another-venv" / Path(shipped).name  # each clone installs its own copy: one cached file
    copy.parent.mkdir()
    shutil.copy(shipped, copy)
    assert module.requantized(str(copy), "q8_0") == made
    assert module.requantized(shipped, "") == shipped
    with pytest.raises(ValueError, match="unknown quantize"):
        module.requantized(shipped, "q2_k")

    text = " ".join([SYSTEM["content"], *CALLER_TURNS]).encode()

    def perplexity(path: str) -> tuple[float, str]:
        llama = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False)
        try:
            tokens = llama.tokenize(text)
            llama.eval(tokens)
            logits = np.asarray(llama.scores[:len(tokens) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_p = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
            nll = -log_p[np.arange(len(tokens) - 1), tokens[1:]].mean()
            return float(np.exp(nll)), llama.metadata["general.file_type"]
        finally:
            llama.close()

    (before, shipped_type), (after, made_type) = perplexity(shipped), perplexity(made)
    assert (shipped_type, made_type) == (str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1), str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0))
    log.info("perplexity shipped Q4_1 %.3f, requantized Q8_0 %.3f", before, after)
    assert abs(after - before) / before < 0.01
