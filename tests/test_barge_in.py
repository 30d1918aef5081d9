"""Barge-in end to end: the caller talks over the agent through the real edge and the real tritonserver.

Real speech stops the agent at once (`clear`, no more audio), cancels the turn's llm and tts requests on
the server, and the history keeps only what the caller heard. Noise and a backchannel do not interrupt. A
string of backchannels long enough to stop the agent brings no words, so the agent resumes the clause it
was cut in. Ten interruptions in a row leak no task, no request and no call.

Replies must still be playing (and being generated) when the caller talks, so these edges ask the llm for
long stories at temperature 0 (the same story for the same words).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import weakref

import numpy as np
import pytest

from edge.app import CALLS
from edge.call import Call, PartialWords, backchannel, repeats, words_of
from edge.settings import DEFAULT_BACKCHANNELS
from edge.simulate import CallerTurn
from tests.barge import (INTERRUPTIONS, CallWatch, CancelWatch, caller, clear_unix, frames_between, run_call,
                         speech_level, storyteller_edge, synthesize, white_noise, with_silence)
from tests.metrics import wait_for
from tests.speech import recording, wer

pytestmark = pytest.mark.usefixtures("triton")
log = logging.getLogger("test_barge_in")

QUESTION = "tt-weasels"  # "Weasels have eaten our phone system": a story whose first clauses are short
NO_GREETING = {"params": {"greeting": ""}, "wait_for_greeting": False}
CANCEL_STOP_LIMIT_S = 1.0  # clear -> the engine stopped (loose: CI machines are busy)


@pytest.fixture(scope="module")
async def storyteller(triton):
    """Replies of up to 512 tokens (minutes of speech): the llm is still writing when the caller talks."""
    server = await storyteller_edge(triton, llm_max_tokens=512)
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def brief_storyteller(triton):
    """Replies of 30 tokens (about eight seconds of speech): long enough to talk over, short enough to hear out.
    FALSE_INTERRUPTION_MS is long enough that the asr's final comes before the agent resumes."""
    server = await storyteller_edge(triton, llm_max_tokens=30, false_interruption_ms=1500)
    yield server
    await server.stop()


def edge_log(caplog, call_sid: str, event: str) -> list[dict]:
    records = []
    for r in caplog.records:
        if r.name == "edge.call" and r.getMessage().startswith("{"):
            record = json.loads(r.getMessage())
            if record.get("call") == call_sid and record.get("event") == event:
                records.append(record)
    return records


def transcripts(caplog, call_sid: str) -> list[dict]:
    """The asr's partial and final transcripts of the call, as the edge logged them (for failure messages)."""
    return [e for e in edge_log(caplog, call_sid, "asr") if e["type"] in ("partial", "final")]


async def no_requests_left(triton) -> None:
    """Every llm and tts request on the server has ended (a cancelled one stops its engine)."""
    metrics = await wait_for(triton.metrics_url, lambda m: all(
        m.value("voice_requests_active", model=k) == 0 for k in ("llm", "tts")), timeout=15)
    assert metrics.value("voice_requests_active", model="llm") == 0
    assert metrics.value("voice_requests_active", model="tts") == 0


def assistant_before(history: list[dict], user_text: str) -> str:
    """The assistant message stored just before the user message `user_text`."""
    for i, message in enumerate(history):
        if message["role"] == "user" and message["content"] == user_text and i and \
                history[i - 1]["role"] == "assistant":
            return history[i - 1]["content"]
    raise AssertionError(f"no assistant message before user {user_text!r} in {history}")


async def test_speech_over_a_reply_stops_it_cancels_its_requests_and_keeps_only_what_was_heard(
        storyteller, triton, caplog):
    caplog.set_level(logging.INFO, logger="edge.call")
    interruption = recording("please-try-call-later")
    watch, cancels = CallWatch(storyteller.app[CALLS]).start(), await CancelWatch(triton.metrics_url).start_now()
    try:
        report = await run_call(storyteller.ws_url, [caller(QUESTION), CallerTurn(caller(interruption.name),
                                                                                  barge_in_ms=2500)],
                                hangup_after_reply_ms=600, **NO_GREETING)
    finally:
        await watch.stop()
        await cancels.stop()
    assert not report.errors, report.errors
    _, second = report.turns

    # `clear` came, once, soon after the caller began
    assert len(report.clears) == 1, report.clears
    clear = report.clears[0]
    assert second.clear_after_speech_ms is not None
    record, = watch.call.barge_ins
    log.info("barge-in: caller onset -> clear %.0f ms (simulator), %.0f ms (edge, %s)",
             second.clear_after_speech_ms, record["onset_to_clear_ms"], record["why"])
    # its words stop the agent, or, where the asr's first words come after the words' wait (a slow CPU), the
    # speech's duration does: either way while the caller speaks, not at their final
    assert record["why"] in ("words", "duration"), record
    assert second.clear_after_speech_ms < 2000

    # outbound audio stopped: nothing after the clear but a frame already on its way, until the caller finished
    late = frames_between(report, clear, second.speech_end)
    assert late <= 2, f"{late} frames of the interrupted reply came after the clear"
    assert not any(m.played for m in report.marks_echoed if m.t > clear and m.t < second.speech_end)

    # the turn's llm and tts requests were cancelled on the server, and their engines stopped soon after
    at = clear_unix(report, clear)
    in_flight = [m for m in ("llm", "tts") if cancels.in_flight_at(m, at)]
    assert in_flight, "neither llm nor tts was working when the caller interrupted: the reply was too short"
    for model in in_flight:
        stop = cancels.stop_after(model, at, within=2 * CANCEL_STOP_LIMIT_S)
        assert stop is not None, f"{model} was working at the clear and was not cancelled"
        log.info("barge-in: clear -> %s engine stopped %.0f ms", model, (stop - at) * 1000)
        assert stop - at < CANCEL_STOP_LIMIT_S
    await no_requests_left(triton)

    # the history keeps what the caller heard: the clauses whose marks came back played, plus the words of
    # the clause cut, then " [interrupted]"; not the reply the llm wrote
    interrupted, = watch.interrupted()
    played = {m.name for m in report.marks_echoed if m.played and m.t < clear}
    chunks = interrupted.chunks
    heard_whole = [c.text for c in chunks if c.mark in played]
    assert [c.text for c in chunks[:len(heard_whole)]] == heard_whole, "played marks are not the reply's first"
    assert heard_whole, "no clause played before the interruption: interrupt later to test the history"
    said_in_full = " ".join(interrupted.clauses)
    stored = assistant_before(watch.call.history, edge_log(caplog, report.call_sid, "caller_said")[1]["text"])
    log.info("barge-in: stored %r of %r", stored, said_in_full)
    assert stored.endswith(" [interrupted]")
    stored_words = stored.removesuffix(" [interrupted]").split()
    expected = " ".join(heard_whole).split()
    cut = chunks[len(heard_whole)].text.split() if len(chunks) > len(heard_whole) else []
    assert stored_words[:len(expected)] == expected, (stored, heard_whole)
    assert stored_words[len(expected):] == cut[:len(stored_words) - len(expected)], (stored, cut)
    assert len(stored_words) < len(expected) + len(cut) or not cut, "the cut clause was kept whole"
    assert record["heard"] == " ".join(stored_words[len(expected):])
    assert len(stored_words) < len(said_in_full.split())

    # the interruption is the caller's next turn, and it is answered
    said = edge_log(caplog, report.call_sid, "caller_said")
    assert len(said) == 2 and wer(interruption.transcript, said[1]["text"]) < 0.5, said
    assert second.reply_first_frame_at is not None and second.reply_first_frame_at > second.speech_end
    assert not storyteller.app[CALLS]


async def test_a_noise_burst_and_a_backchannel_do_not_interrupt(brief_storyteller, triton, caplog):
    caplog.set_level(logging.DEBUG, logger="edge.call")
    level = speech_level(caller(QUESTION))
    yeah = await synthesize(triton.grpc_url, "Yeah.")
    over = with_silence(white_noise(150, level), 1200, yeah, 300)  # noise, then "Yeah." while the agent talks
    watch = CallWatch(brief_storyteller.app[CALLS]).start()
    try:
        report = await run_call(brief_storyteller.ws_url, [caller(QUESTION), CallerTurn(over, barge_in_ms=400)],
                                **NO_GREETING)
    finally:
        await watch.stop()
    assert not report.errors, report.errors
    overlap = report.turns[1]
    asr = transcripts(caplog, report.call_sid)
    assert not report.clears and not watch.call.barge_ins, (watch.call.barge_ins, asr)
    # the reply was playing before the noise and went on after "Yeah." (the simulator's `barge_in` flag can miss
    # it when the turn starts in a pause between two clauses)
    assert frames_between(report, overlap.started_at - 0.5, overlap.started_at, audible=True)
    assert frames_between(report, overlap.speech_end, overlap.speech_end + 1.0, audible=True), asr
    assert any(e["text"].strip(" .!").lower() == "yeah" for e in asr), f"the asr did not hear 'Yeah': {asr}"
    # "Yeah." may pause the agent at the minimum duration (no words yet); then it went on, every time
    assert len(edge_log(caplog, report.call_sid, "unpaused")) == len(edge_log(caplog, report.call_sid, "paused"))
    # the reply played to its end: every mark came back played, and the whole reply is in the history
    assert report.marks_received and len(report.marks_echoed) == len(report.marks_received)
    assert all(m.played for m in report.marks_echoed)
    reply, = [t for t in watch.turns if t.committed.is_set()]
    assert not reply.interrupted and reply.task.done() and not reply.task.cancelled()
    assert watch.call.history[-1] == {"role": "assistant", "content": " ".join(reply.clauses)}
    assert watch.call.turns == 1, "the backchannel became a turn of its own"


async def test_a_false_interruption_stops_the_agent_then_it_says_the_cut_clause_again(
        brief_storyteller, triton, caplog):
    """White noise never makes Silero VAD report speech (so it cannot even stop the agent), and speech muffled
    by a wall gets random words from Whisper; a run of backchannels is real speech that lasts long enough to
    stop the agent (BARGE_IN_MIN_SPEECH_MS + BARGE_IN_WAIT_WORDS_MS) and still brings no words. Its final
    transcript ("Okay, okay, okay.") comes while the agent waits to resume: it must not become a turn."""
    caplog.set_level(logging.DEBUG, logger="edge.call")
    okays = await synthesize(triton.grpc_url, "Okay okay okay.")
    watch = CallWatch(brief_storyteller.app[CALLS]).start()
    try:
        report = await run_call(brief_storyteller.ws_url, [caller(QUESTION), CallerTurn(okays, barge_in_ms=2000)],
                                **NO_GREETING)
    finally:
        await watch.stop()
    assert not report.errors, report.errors
    assert len(report.clears) == 1, report.clears
    clear = report.clears[0]
    record, = watch.call.barge_ins
    asr = transcripts(caplog, report.call_sid)
    # the run lasts past the words' wait ("duration"); a partial may mishear its first word cut short
    # ("Okay, old.", 1 run in ~20): a barge-in on "words" that no final confirms, resumed all the same
    assert record["why"] in ("duration", "words"), (record, asr)
    resumed = edge_log(caplog, report.call_sid, "resume")
    assert len(resumed) == 1, "the agent did not resume"
    # the resumed turn says the cut clause again, from its start, then the rest of the reply
    interrupted, = watch.interrupted()
    again = [t for t in watch.turns if t.user_text == "" and t is not interrupted]
    assert len(again) == 1
    cut = next(c for c in interrupted.chunks if not c.played)
    assert again[0].clauses[0] == cut.text
    assert again[0].clauses == interrupted.clauses[interrupted.clauses.index(cut.text):]
    audible_after = frames_between(report, clear + 0.5, report.duration, audible=True)
    assert audible_after * 20 >= 500, "no audio followed the resume"
    assert watch.call.turns == 1, "the backchannels became a turn of their own"
    # the caller heard the whole reply after all: the history holds all of it, without "[interrupted]"
    assert watch.call.history[-1] == {"role": "assistant", "content": " ".join(interrupted.clauses)}, \
        watch.call.history


async def test_ten_interruptions_in_a_row_leak_no_task_request_or_call(storyteller, triton, monkeypatch):
    """The CPU profile's 135M llm imitates the history: after a few cut-off replies (" [interrupted]") it writes
    replies of a few words, too short to be interrupted. What is tested here is the plumbing, so for this call
    the llm sees the system prompt and the caller's last words only, and every reply is a long story."""
    monkeypatch.setattr(Call, "_context", lambda call: [{"role": "system", "content": call.settings.system_prompt}])
    tasks_before = set(asyncio.all_tasks())
    turns = [caller(QUESTION)] + [CallerTurn(caller(INTERRUPTIONS[i % len(INTERRUPTIONS)]), barge_in_ms=700)
                                  for i in range(10)]
    watch = CallWatch(storyteller.app[CALLS]).start()
    try:
        report = await run_call(storyteller.ws_url, turns, hangup_after_reply_ms=600, **NO_GREETING)
    finally:
        await watch.stop()
    assert not report.errors, report.errors
    barged = report.turns[1:]
    # each turn talked over the reply to the one before (the simulator's `barge_in` flag may miss it when the
    # turn starts in a pause between two clauses) and got one `clear`
    assert [t.clears for t in barged] == [1] * 10, [(t.barge_in, t.clears) for t in barged]
    assert len(watch.call.barge_ins) == 10
    latencies = [t.clear_after_speech_ms for t in barged]
    assert None not in latencies
    log.info("ten barge-ins: caller onset -> clear median %.0f ms, max %.0f ms", np.median(latencies),
             max(latencies))
    assert barged[-1].reply_first_frame_at is not None, "the last turn got no answer"
    assert not storyteller.app[CALLS]
    await no_requests_left(triton)
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        left = set(asyncio.all_tasks()) - tasks_before - {asyncio.current_task()}
        if not left or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert not left, f"tasks left behind: {sorted(t.get_name() for t in left)}"
    call = weakref.ref(watch.call)
    del watch
    gc.collect()
    assert call() is None, f"the call's state outlived it, held by {[type(r) for r in gc.get_referrers(call())]}"


def test_echo_is_our_words_in_our_order_not_just_our_words():
    said = words_of("I'm sorry, I didn't catch that. Could you say your response again? I did not hear it.")
    assert repeats(words_of("could you say your response again"), said)  # our voice, back through a speakerphone
    assert repeats(words_of("sorry I didn't catch that could"), said)
    assert not repeats(words_of("I'm sorry I did not understand your response."), said)  # the caller's own
    assert not repeats(words_of("I'm sorry"), said)  # too short to tell


def test_backchannels_and_hums_are_not_a_turn_but_words_are():
    listen = set(DEFAULT_BACKCHANNELS)
    for heard in ("Uh-huh.", "Yeah, yeah.", "Okay.", "I see.", "m m m m m", "Mm.", "Hmm?", "mhm", "mm-mm", "Hm-hmm."):
        assert backchannel(words_of(heard), listen), heard
    for heard in ("No.", "Please", "Yeah, but wait", "I'm", "Nope. Nope.", "Uh-uh.", "mm-hmm, no"):
        assert not backchannel(words_of(heard), listen), heard


def test_a_last_word_cut_short_counts_only_when_the_next_partial_keeps_it():
    listen = set(DEFAULT_BACKCHANNELS)
    partials = PartialWords(listen)
    assert partials.settled(words_of("in")) == []  # tiny.en's guess at the first 150 ms of "Mm-hmm."
    assert partials.settled(words_of("Ah.")) == []  # another short word: still a guess
    assert partials.settled(words_of("ah")) == ["ah"]  # kept: settled
    partials = PartialWords(listen)
    assert partials.settled(words_of("Okay, o")) == ["okay"]  # "o": the start of the next "okay"
    assert partials.settled(words_of("Okay, okay, oka")) == ["okay", "okay"]  # the start of a backchannel
    assert partials.settled(words_of("Okay, okay, okay")) == ["okay", "okay", "okay"]
    assert PartialWords(listen).settled(words_of("I'm...")) == ["i'm"]  # long enough to be no guess
    assert PartialWords(listen).settled(words_of("Please")) == ["please"]
    assert PartialWords(listen).settled(words_of("No, no")) == ["no"]  # the first "no" was followed by more
    assert PartialWords(listen).settled([]) == []
