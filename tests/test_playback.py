"""Outbound pacing, marks and what the caller heard; the clause chunker."""

import asyncio
import time

import numpy as np

from edge import audio
from edge.audio import FRAME_BYTES
from edge.clauses import ClauseChunker, speakable
from edge.playback import FIRST_ECHO_GRACE_S, FrameClock, Playback
from edge.simulate import LineNoise
from tests.speech import recording


class Wire:
    """Stands in for Twilio's socket in these unit tests: records what the pacer sends and when."""

    def __init__(self):
        self.frames: list[tuple[float, bytes]] = []
        self.marks: list[str] = []

    async def media(self, frame: bytes):
        self.frames.append((time.monotonic(), frame))

    async def mark(self, name: str):
        self.marks.append(name)


async def test_frames_are_160_bytes_paced_at_20ms_with_a_mark_after_each_chunk():
    wire = Wire()
    playback = Playback(wire.media, wire.mark, FrameClock(), lead_ms=40)
    pacer = asyncio.create_task(playback.run())
    playback.enqueue("Hello there.", bytes(range(256)) * 25)  # 6400 bytes = 40 frames
    playback.enqueue("How are you?", b"\x7f" * 1000)  # 7 frames, the last padded
    while len(wire.marks) < 2:
        await asyncio.sleep(0.02)
    pacer.cancel()
    assert len(wire.frames) == 47
    assert all(len(f) == FRAME_BYTES for _, f in wire.frames)
    assert wire.marks == ["m1", "m2"]
    times = np.array([t for t, _ in wire.frames])
    # absolute clock: frame n leaves at start + n*20 ms - lead, so the whole run spans (47-1-2)*20 ms
    span = times[-1] - times[2]
    assert abs(span - 44 * 0.020) < 0.03, span
    assert np.median(np.diff(times[3:])) > 0.015


async def test_echoed_marks_decide_what_was_heard_and_clear_keeps_only_that():
    wire = Wire()
    playback = Playback(wire.media, wire.mark, FrameClock(), lead_ms=0)
    pacer = asyncio.create_task(playback.run())
    playback.enqueue("First clause here.", b"\xff" * 1600)  # 0.2 s
    playback.enqueue("second clause with eight words in it now", b"\xff" * 8000)  # 1 s
    while "m1" not in wire.marks:
        await asyncio.sleep(0.01)
    playback.marked("m1")
    assert playback.speaking
    await asyncio.sleep(0.5)  # about half of the second chunk played
    heard = playback.clear()
    pacer.cancel()
    assert heard.cut is not None and heard.cut.text.startswith("second")
    assert 2 <= len(heard.text.split()) <= 6, heard.text
    assert not playback.speaking
    playback.marked("m2")  # echoed after the clear: not played, and nothing to drop
    assert not playback.speaking


def test_first_clause_is_cut_early_and_later_ones_at_sentence_ends():
    chunker = ClauseChunker()
    out = []
    for delta in ["Sure", ",", " I can", " help", " with that", ", of course", ". Your", " order ships",
                  " tomorrow", ", and it", " arrives", " Friday!", " Anything", " else"]:
        out += chunker.push(delta)
    out += chunker.flush()
    assert out == ["Sure, I can help with that,", "of course.", "Your order ships tomorrow, and it arrives Friday!",
                   "Anything else"]


def test_speakable_drops_markdown_and_emoji():
    assert speakable("**Great** news 🎉 - see `below`") == "Great news - see below"


async def test_hold_stops_the_frames_and_release_goes_on_from_the_same_one():
    wire = Wire()
    playback = Playback(wire.media, wire.mark, FrameClock(), lead_ms=0)
    pacer = asyncio.create_task(playback.run())
    frames = [bytes([i]) * FRAME_BYTES for i in range(50)]  # 1 s, every frame different
    playback.enqueue("one two three four five six seven eight nine ten", b"".join(frames))
    await asyncio.sleep(0.2)
    playback.hold()
    sent_at_hold = len(wire.frames)
    await asyncio.sleep(0.3)
    assert len(wire.frames) <= sent_at_hold + 1  # a send already under way may finish
    held = len(wire.frames)
    heard = playback.heard()  # the 0.3 s of the hold were not heard: only what was sent counts
    assert len(heard.text.split()) <= held * 10 // 50 + 1, heard.text
    playback.release()
    while "m1" not in wire.marks:
        await asyncio.sleep(0.02)
    pacer.cancel()
    assert [f for _, f in wire.frames] == frames  # nothing skipped, nothing repeated
    times = [t for t, _ in wire.frames]
    assert max(np.diff(times)) >= 0.25  # the pause


def test_the_mulaw_sound_check_agrees_with_the_decoded_samples():
    for code in range(256):
        frame = bytes([0xFF] * 100 + [code] + [0xFF] * 59)
        loud = int(np.abs(audio.mulaw_to_pcm(frame).astype(np.int32)).max()) > audio.SOUND_THRESHOLD
        assert audio.mulaw_has_sound(frame) == loud, code
    assert not audio.mulaw_has_sound(bytes([audio.MULAW_SILENCE]) * FRAME_BYTES)


def test_the_sound_gate_tells_speech_from_the_lines_own_noise():
    """On digital silence it is the plain sound check; on a noisy line (a frame of -45 dBFS noise is over the
    fixed threshold) the noise is quiet once the gate has heard the line (2 s: until then it is the plain check)
    and speech still starts where the clean recording's does."""
    samples, rate = recording("vm-savefolder").samples()
    speech = audio.resample(samples, rate, audio.TWILIO_RATE)
    speech = np.concatenate([np.zeros(3 * audio.TWILIO_RATE, np.int16), speech, np.zeros(audio.TWILIO_RATE, np.int16)])

    def frames(samples):
        mulaw = audio.pcm_to_mulaw(samples)
        return [mulaw[i:i + FRAME_BYTES] for i in range(0, len(mulaw) - FRAME_BYTES + 1, FRAME_BYTES)]

    clean = [audio.mulaw_has_sound(f) for f in frames(speech)]
    gate = audio.SoundGate()
    assert [gate(f) for f in frames(speech)] == clean
    noise = LineNoise(-45)
    assert all(audio.mulaw_has_sound(f) for f in noise.frames[:50])
    gate = audio.SoundGate()
    noisy = [gate(f) for f in frames(noise.under(speech))]
    onset = clean.index(True)
    assert all(noisy[:90]) and not any(noisy[110:onset]) and any(noisy[onset:onset + 2])
    assert not any(noisy[len(noisy) - 40:])  # the noise after the words
    assert sum(noisy) >= 0.6 * sum(clean)


async def test_a_peer_that_never_echoes_marks_is_heard_once_the_audio_has_had_time_to_play():
    wire = Wire()
    playback = Playback(wire.media, wire.mark, FrameClock(), lead_ms=0)
    pacer = asyncio.create_task(playback.run())
    playback.enqueue("A short clause.", b"\xff" * 1600)  # 0.2 s
    while "m1" not in wire.marks:
        await asyncio.sleep(0.01)
    assert playback.speaking  # no echo yet: still playing, for FIRST_ECHO_GRACE_S
    await asyncio.sleep(FIRST_ECHO_GRACE_S + 0.05)
    assert not playback.speaking and playback.heard().text == ""  # taken as played, none of it cut
    # a peer that has echoed a mark gets the long grace: a missing echo is a late one
    playback.enqueue("Another clause.", b"\xff" * 1600)
    playback.enqueue("And a third.", b"\xff" * 1600)
    while "m3" not in wire.marks:
        await asyncio.sleep(0.01)
    playback.marked("m2")
    await asyncio.sleep(FIRST_ECHO_GRACE_S + 0.05)
    pacer.cancel()
    assert playback.speaking and playback.heard().cut.text == "And a third."
