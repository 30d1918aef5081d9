"""asr on the real tritonserver: real recordings through a phone line, endpointing, isolation, bad input, cancel."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferResult
from tritonclient.grpc.service_pb2 import ModelInferRequest

from edge import audio
from edge.triton import ModelError, Triton, request
from tests.metrics import ascrape, wait_for
from tests.speech import recording, recordings, word_errors, words

log = logging.getLogger(__name__)

STEP = audio.ASR_RATE * audio.FRAME_MS // 1000  # samples in a 20 ms frame
TRAILING_SILENCE_S = 1.5

# Eight of the shared recordings (28 s of speech): three voices, short prompts, two long sentences with pauses.
SUBSET = ["demo-nomatch", "pls-hold-while-try", "privacy-incorrect", "tt-weasels", "vm-savefolder",
          "queue-youarenext", "sense_and_sensibility_01_austen_64kb-0890", "ps_something"]


@pytest.fixture(scope="module")
async def client(triton):
    if "asr" not in triton.models:
        pytest.skip("asr is not loaded (TEST_MODELS)")
    client = Triton(triton.grpc_url)
    yield client
    await client.close()


def frames(pcm: np.ndarray) -> list[np.ndarray]:
    return [pcm[i:i + STEP] for i in range(0, len(pcm), STEP)]


def line_noise(seconds: float, level: float, seed: int = 0) -> np.ndarray:
    """Low-level hiss after the trip through 8 kHz mu-law that a real line gives it."""
    noise = np.random.default_rng(seed).normal(0, level, int(seconds * audio.TWILIO_RATE))
    return audio.resample(audio.mulaw_to_pcm(audio.pcm_to_mulaw(noise.astype(np.int16))), audio.TWILIO_RATE,
                          audio.ASR_RATE)


async def stream_call(client: Triton, pcm: np.ndarray, realtime: bool = True, delay: float = 0.0,
                      partials: bool = True) -> dict:
    """One call: `pcm` in 20 ms frames (paced like a phone when `realtime`), 1.5 s of silence, the end.

    Returns the events with the time each arrived, and when each frame was sent, so a test can tell how
    long after the caller's last syllable the final came.
    """
    await asyncio.sleep(delay)
    stream = client.asr(f"test-asr-{uuid.uuid4()}")
    pcm = np.concatenate([pcm, np.zeros(int(TRAILING_SILENCE_S * audio.ASR_RATE), np.int16)])
    sent_at: list[float] = []
    events: list[tuple[float, dict]] = []

    async def read():
        async for event in stream.events():
            events.append((time.perf_counter(), event))

    reader = asyncio.create_task(read())
    start = time.perf_counter()
    for i, frame in enumerate(frames(pcm)):
        if realtime:
            await asyncio.sleep(max(0.0, start + i * audio.FRAME_MS / 1000 - time.perf_counter()))
        sent_at.append(time.perf_counter())
        stream.send(frame, partials)
    stream.end()
    await asyncio.wait_for(reader, timeout=120)
    return {"events": events, "sent_at": sent_at, "audio_ms": round(len(pcm) * 1000 / audio.ASR_RATE)}


def of_type(call: dict, kind: str) -> list[dict]:
    return [e for _, e in call["events"] if e["type"] == kind]


def finals_text(call: dict) -> str:
    return " ".join(e["text"] for e in of_type(call, "final"))


def sent_time(call: dict, audio_ms: int) -> float:
    """When the frame holding `audio_ms` of the call's audio left the client."""
    return call["sent_at"][min(audio_ms // audio.FRAME_MS, len(call["sent_at"]) - 1)]


def check_event_order(call: dict) -> None:
    kinds = [e["type"] for _, e in call["events"]]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert call["events"][-1][1]["audio_ms"] == call["audio_ms"]
    for i, kind in enumerate(kinds):
        if kind == "final":
            assert "speech_start" in kinds[:i], "a final without a speech_start before it"
            assert "partial" in kinds[:i], "a final without a partial before it"
            final = call["events"][i][1]
            assert final["speech_start_ms"] < final["speech_end_ms"] <= final["audio_ms"]


async def test_phone_recordings_are_transcribed_as_spoken(client):
    """The eight SUBSET recordings, each as a phone delivers it (8 kHz mu-law and back) in 20 ms frames paced in
    real time, all eight calls at once (staggered by 0.4 s); aggregate WER over their finals <= 20 %."""
    recs = [recording(name) for name in SUBSET]
    calls = await asyncio.gather(*(stream_call(client, r.phone_pcm16k(), delay=0.4 * i) for i, r in enumerate(recs)))
    errors = total = 0
    latency: dict[str, list[float]] = {"speech_start": [], "first partial": [], "final": [], "silence": []}
    for rec, call in zip(recs, calls):
        heard = finals_text(call)
        e, n = word_errors(rec.transcript, heard)
        errors, total = errors + e, total + n
        log.info("asr %s: %r (%d/%d word errors)", rec.name, heard, e, n)
        assert of_type(call, "speech_start"), f"{rec.name}: no speech_start"
        check_event_order(call)
        onset = sent_time(call, of_type(call, "speech_start")[0]["audio_ms"])
        for t, event in call["events"]:
            if event["type"] == "speech_start" and not latency["speech_start"][len(latency["final"]):]:
                latency["speech_start"].append(t - onset)
            if event["type"] == "partial" and len(latency["first partial"]) == len(latency["final"]):
                latency["first partial"].append(t - onset)
            if event["type"] == "final":
                latency["final"].append(t - sent_time(call, event["speech_end_ms"]))
                latency["silence"].append((event["audio_ms"] - event["speech_end_ms"]) / 1000)
    log.info("asr: aggregate WER %.1f %% over %d words; 8 calls at once; median (max) ms: %s", 100 * errors / total,
             total, ", ".join(f"{k} {1000 * np.median(v):.0f} ({1000 * max(v):.0f})" for k, v in latency.items() if v))
    assert errors / total <= 0.2


async def test_without_partials_a_turn_still_gets_the_partial_of_its_pause_and_its_final(client):
    """A client that only listens (PARTIALS false) gets no partials while the caller speaks, and still the
    transcript of each pause (to start a reply on) and the final."""
    rec = recording("queue-youarenext")
    call = await stream_call(client, rec.phone_pcm16k(), partials=False)  # in real time: a partial every 100 ms
    # of its first second, every 600 ms after, if they were wanted
    check_event_order(call)
    partials, stops = of_type(call, "partial"), of_type(call, "speech_stop")
    assert 1 <= len(partials) <= len(stops), [e for _, e in call["events"]]  # one a pause
    assert all(p["audio_ms"] > stops[0]["audio_ms"] for p in partials)
    assert word_errors(rec.transcript, finals_text(call))[0] <= 2, finals_text(call)


async def test_silence_and_line_noise_yield_no_final(client):
    quiet = np.concatenate([np.zeros(2 * audio.ASR_RATE, np.int16), line_noise(3, 30), line_noise(2, 150, seed=1)])
    call = await stream_call(client, quiet, realtime=False)
    assert not of_type(call, "final"), f"a final from noise: {of_type(call, 'final')}"
    assert not of_type(call, "partial")
    check_event_order(call)


async def test_concurrent_calls_keep_their_own_transcripts(client):
    one, two = recording("tt-weasels"), recording("vm-nobodyavail")
    a, b = await asyncio.gather(stream_call(client, one.phone_pcm16k()), stream_call(client, two.phone_pcm16k()))
    for rec, call, other in ((one, a, two), (two, b, one)):
        heard = finals_text(call)
        errors, n = word_errors(rec.transcript, heard)
        assert errors / n <= 0.25, f"{rec.name}: heard {heard!r}"
        crosstalk = (set(words(other.transcript)) - set(words(rec.transcript))) & set(words(heard))
        assert not crosstalk, f"{rec.name}: heard {heard!r}"


async def test_call_ending_mid_sentence_gets_its_final(client):
    rec = recording("queue-youarenext")
    pcm = rec.phone_pcm16k()[: 3 * audio.ASR_RATE]
    stream = client.asr(f"test-asr-{uuid.uuid4()}")
    for frame in frames(pcm):
        stream.send(frame)
    stream.end()
    events = [e async for e in stream.events()]
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 1 and events[-1]["type"] == "end"
    assert "your call is now" in finals[0]["text"].lower()


def asr_request(call_id: str, samples: np.ndarray, start: bool = False, end: bool = False,
                **inputs: np.ndarray) -> ModelInferRequest:
    """A raw request, so tests can send what the edge's client never would."""
    return request("asr", {"AUDIO": samples, **inputs}, sequence_id=call_id, sequence_start=start,
                   sequence_end=end)


async def test_bad_input_fails_that_request_only(client):
    """Wrong dtype, empty audio before the end, a 2-D chunk, two PARTIALS: each gets its error; the same call goes
    on."""
    call_id = f"test-asr-{uuid.uuid4()}"
    speech = frames(recording("please-try-call-later").phone_pcm16k()) + [np.zeros(STEP, np.int16)] * 60
    requests = [asr_request(call_id, np.zeros(STEP, np.int16), start=True),
                asr_request(call_id, np.zeros(STEP, np.float32)),
                asr_request(call_id, np.zeros(0, np.int16)),
                asr_request(call_id, np.zeros((2, STEP), np.int16)),
                asr_request(call_id, np.zeros(STEP, np.int16), PARTIALS=np.array([True, False])),
                *(asr_request(call_id, f) for f in speech),
                asr_request(call_id, np.zeros(0, np.int16), end=True)]

    errors, events = [], []
    async for response in client.stub.ModelStreamInfer(iter(requests)):
        if response.error_message:
            errors.append(response.error_message)
            continue
        events.append(json.loads(InferResult(response.infer_response).as_numpy("EVENT")[0]))
        if events[-1]["type"] == "end":
            break
    assert len(errors) == 4, errors
    assert any("FP32" in e for e in errors) and any("AUDIO is empty" in e for e in errors)
    assert any("'PARTIALS'" in e and "Expected [1], got [2]" in e for e in errors), errors
    finals = " ".join(e["text"] for e in events if e["type"] == "final")
    assert word_errors("Please try your call again later.", finals)[0] <= 1, finals
    # and a fresh call through the edge's own client is served as usual
    call = await stream_call(client, recording("tt-monkeysintro").phone_pcm16k(), realtime=False)
    assert word_errors(recording("tt-monkeysintro").transcript, finals_text(call))[0] <= 1


async def test_cancelled_call_is_dropped(client, triton):
    url, model = triton.metrics_url, {"model": "asr"}
    before = await ascrape(url)
    stream = client.asr(f"test-asr-{uuid.uuid4()}")
    events = []

    async def read():
        try:
            async for event in stream.events():
                events.append(event)
        except ModelError:
            pass

    reader = asyncio.create_task(read())
    for frame in frames(recording("vm-sorry").phone_pcm16k()[: 2 * audio.ASR_RATE]):
        stream.send(frame)
        await asyncio.sleep(0.005)
    await wait_for(url, lambda m: m.value("voice_requests_active", **model) > before.value("voice_requests_active",
                                                                                         **model), timeout=10)
    stream.cancel()
    reader.cancel()

    def dropped(m):
        cancelled = "voice_requests_cancelled_total"
        return (m.value(cancelled, **model) > before.value(cancelled, **model)
                and m.value("voice_requests_active", **model) == before.value("voice_requests_active", **model))

    after = await wait_for(url, dropped, timeout=10)
    assert dropped(after), "the server kept the cancelled call's state"
    # Triton's sequence batcher keeps a sequence open until its END or an idle timeout; an END after the
    # cancel closes it at once (the model, which has dropped the call, answers it with an error)
    async for response in client.stub.ModelStreamInfer(iter([asr_request(stream.call_id, np.zeros(0, np.int16),
                                                                          end=True)])):
        assert "no asr state" in response.error_message
        break


# -- the turn logic on its own, without the server --------------------------------------------------------------

ASR_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "asr" / "1"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"asr_{name}", ASR_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


listener = load("listener")


class LoudnessVad:
    """Stands in for Silero where the test is about timing: a 32 ms window is speech when it is loud."""

    def __init__(self):
        self.pending = np.zeros(0, np.float32)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.concatenate([self.pending, pcm])
        n = len(pcm) // listener.WINDOW
        self.pending = pcm[n * listener.WINDOW:]
        loudest = np.abs(pcm[:n * listener.WINDOW]).reshape(n, listener.WINDOW).max(axis=1, initial=0)
        return (loudest > 0.1).astype(np.float32)


def listen(ears, pcm: np.ndarray, transcribe) -> list[dict]:
    """Feed `pcm` in 20 ms frames, running each transcription the listener asks for at once."""
    events = []
    for frame in frames(pcm):
        events += ears.feed(frame)
        job = ears.next_job()
        if job is not None:
            events += ears.done(job, transcribe(job))
    return events


@pytest.mark.parametrize("text, wait_ms", [("I need a taxi to the airport.", 350), ("I need a taxi to the", 800),
                                           ("I need a taxi to the...", 800)])
def test_endpoint_is_shorter_after_a_finished_sentence(text, wait_ms):
    ears = listener.Listener(listener.Settings(endpoint_silence_ms=800, endpoint_silence_complete_ms=350),
                             LoudnessVad())
    speech = np.concatenate([np.zeros(8000), np.full(24000, 0.5), np.zeros(32000)]).astype(np.float32)
    events = listen(ears, speech, lambda job: text)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "speech_start" and kinds.count("final") == 1 and "speech_stop" in kinds
    final = events[kinds.index("final")]
    assert final["text"] == text and 480 <= final["speech_start_ms"] <= 520 and 2000 <= final["speech_end_ms"] <= 2040
    assert wait_ms <= final["audio_ms"] - final["speech_end_ms"] < wait_ms + 64
    partials = [e for e in events if e["type"] == "partial"]
    assert partials[0]["audio_ms"] - final["speech_start_ms"] < 300 + 40, "the first partial must come early"


def test_speech_stop_says_when_the_turn_can_end_and_audio_up_to_then_ends_it():
    """The contract a batching client relies on: the silence held back and sent when the call's audio reaches
    speech_stop's first `endpoint_ms` brings the final with that request, even a request that completes no VAD
    window and falls a few samples short (a streaming resampler holds some back)."""
    ears = listener.Listener(listener.Settings(endpoint_silence_ms=800, endpoint_silence_complete_ms=350),
                             LoudnessVad())
    speech = np.concatenate([np.zeros(8000), np.full(24000, 0.5), np.zeros(3200)]).astype(np.float32)
    events = listen(ears, speech, lambda job: "I need a taxi to the airport.")
    stop = next(e for e in events if e["type"] == "speech_stop")
    assert stop["endpoint_ms"] == [stop["audio_ms"] + 350, stop["audio_ms"] + 800]
    assert not [e for e in events if e["type"] == "final"]
    short = listener.samples(stop["endpoint_ms"][0]) - ears.n - 4
    assert not [e for e in ears.feed(np.zeros(short - 300, np.float32)) if e["type"] == "final"]
    final = [e for e in ears.feed(np.zeros(300, np.float32)) if e["type"] == "final"]
    assert final and final[0]["text"] == "I need a taxi to the airport."


def test_a_transcriber_behind_the_audio_never_runs_two_turns_together():
    """Turns are decided in the call's audio time: when the whole call arrives before any transcript is done (a
    sender faster than real time, a transcriber far behind), each turn still ends where its silence says."""
    ears = listener.Listener(listener.Settings(endpoint_silence_ms=800, endpoint_silence_complete_ms=350),
                             LoudnessVad())
    turn = np.concatenate([np.full(24000, 0.5), np.zeros(32000)]).astype(np.float32)  # 1.5 s of speech, 2 s quiet
    events = []
    for frame in frames(np.concatenate([np.zeros(8000, np.float32), turn, turn])):
        events += ears.feed(frame)
    events += ears.finish()
    while (job := ears.next_job()) is not None:
        events += ears.done(job, f"Turn {job.turn} is done.")
    finals = [e for e in events if e["type"] == "final"]
    assert [f["text"] for f in finals] == ["Turn 1 is done.", "Turn 2 is done."]
    assert [(f["speech_start_ms"], f["speech_end_ms"]) for f in finals] == [(480, 2016), (4000, 5504)]
    assert 350 <= finals[0]["audio_ms"] - finals[0]["speech_end_ms"] < 350 + 32
    assert ears.idle and ears.audio_ms == 7500


def test_noise_turn_gets_no_final():
    ears = listener.Listener(listener.Settings(), LoudnessVad())
    burst = np.concatenate([np.full(4000, 0.5), np.zeros(32000)]).astype(np.float32)
    events = listen(ears, burst, lambda job: "")
    assert [e["type"] for e in events] == ["speech_start", "speech_stop"]
    assert ears.idle


def test_long_turn_is_committed_at_pauses_and_heard_whole():
    """Five sentences, 100 ms apart, as one 25 s turn: jobs after a commit transcribe only the new audio."""
    engine = load("whisper_engine")
    transcriber = engine.Transcriber("tiny.en", cpu_threads=2, min_window_s=10)
    ears = listener.Listener(listener.Settings(endpoint_silence_ms=1500, endpoint_silence_complete_ms=1500,
                                               partial_interval_ms=2000, commit_after_s=7),
                             engine.SileroVad().stream())
    recs = [r for r in recordings() if r.name.startswith("sense_and_sensibility")]
    gap = np.zeros(1600, np.int16)
    pcm = np.concatenate([x for r in recs for x in (r.phone_pcm16k(), gap)] + [np.zeros(32000, np.int16)])
    jobs = []

    def transcribe(job):
        jobs.append(job)
        return transcriber.transcribe(job.audio, job.prompt).text

    events = listen(ears, pcm.astype(np.float32) / 32768, transcribe)
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 1, finals
    errors, n = word_errors(" ".join(r.transcript for r in recs), finals[0]["text"])
    assert errors / n <= 0.1, finals[0]["text"]
    longest = max(job.end - job.start for job in jobs) / listener.SAMPLE_RATE
    turn = (finals[0]["speech_end_ms"] - finals[0]["speech_start_ms"]) / 1000
    assert turn > 20 and longest < 13, f"a {longest:.1f} s job in a {turn:.1f} s turn"
    assert any(job.prompt for job in jobs), "nothing was committed"


def test_partials_come_every_first_partial_ms_in_the_turns_first_second():
    """A barge-in waits on the first words that are not "um": early partials come often, later ones less."""
    ears = listener.Listener(listener.Settings(first_partial_ms=150, partial_interval_ms=600), LoudnessVad())
    speech = np.concatenate([np.zeros(8000), np.full(48000, 0.5), np.zeros(32000)]).astype(np.float32)
    jobs = []

    def transcribe(job):
        jobs.append(job)
        return f"word{len(jobs)}"

    listen(ears, speech, transcribe)
    onset = 8000
    partial_ends = [(job.end - onset) * 1000 // listener.SAMPLE_RATE for job in jobs if job.kind == "partial"]
    early = [t for t in partial_ends if t <= listener.EARLY_PARTIALS_MS]
    assert early[0] <= 150 + 64 and len(early) >= 5, partial_ends
    late = [t for t in partial_ends if t > listener.EARLY_PARTIALS_MS + 150]
    assert all(b - a >= 600 for a, b in zip(late, late[1:])) and late, partial_ends


@pytest.mark.parametrize("speech_ms", range(1504, 2144, 32))
def test_no_partial_starts_while_the_callers_speech_may_be_ending(speech_ms):
    """The endpoint waits on the transcript made at speech_stop, and a call runs one transcription at a time: a
    partial begun in the silence before speech_stop would hold that transcript back by a whole transcription.
    Whichever way a turn's length falls against the partials' schedule, the first job after the speech is the
    pause's."""
    ears = listener.Listener(listener.Settings(), LoudnessVad())
    speech = np.concatenate([np.zeros(8000), np.full(listener.samples(speech_ms), 0.5), np.zeros(16000)])
    jobs = []

    def transcribe(job):
        jobs.append(job)
        return "I need a taxi to the airport."

    events = listen(ears, speech.astype(np.float32), transcribe)
    silence = listener.samples(next(e for e in events if e["type"] == "speech_stop")["audio_ms"])
    # (a job handed out inside the first quiet window is the VAD's to miss: it has not judged that window yet)
    after = [job.kind for job in jobs if job.end > silence + listener.WINDOW]
    assert after[:1] == ["pause"], [(job.kind, job.end - silence) for job in jobs]
