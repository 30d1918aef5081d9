"""Quantize Gemma 3 27B-it with NVIDIA ModelOpt into a Hugging Face checkpoint for TensorRT-LLM's PyTorch backend.

  python build/quantize_gemma.py --source W/gemma-3-27b-it --output W/gemma-3-27b-it-fp8 --qformat fp8
  python build/quantize_gemma.py --source W/gemma-3-27b-it --output W/gemma-3-27b-it-w4a16-awq --qformat awq

`fp8` (H100 and later): FP8 weights and activations, per-tensor scales from max calibration
(`mtq.FP8_DEFAULT_CFG`), plus an FP8 KV cache (`FP8_KV_CFG`): serve with `kv_cache_dtype: fp8`.
`awq` (A100, which has no FP8): W4A16 AWQ, INT4 weights in groups of 128 (`mtq.INT4_AWQ_CFG`), BF16 KV cache.

As ModelOpt's own examples/llm_ptq/hf_ptq.py does for Gemma 3, only the language model is quantized:
the vision tower and projector stay BF16 (TensorRT-LLM's Gemma3VLM loads them unquantized). The export
(`export_hf_checkpoint`) writes safetensors, config.json with its quantization_config and
hf_quant_config.json; the tokenizer, chat template and processor files are copied from the source, so the
directory alone is what `llm/configs/gpu.pbtxt` names. Needs one GPU with >= 80 GB (the BF16 model is
55 GB; device_map="auto" spills the rest to CPU memory), torch, transformers and nvidia-modelopt[hf]
(NVIDIA's tritonserver trtllm image has all three). Writes OUTPUT.partial, renames it when done, and
leaves OUTPUT/.complete.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

CHAT = [{"role": "user", "content": "In one sentence: why do people call a phone line instead of sending an email?"}]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, type=Path, help="the BF16 Hugging Face checkpoint directory")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--qformat", choices=["fp8", "awq"], default="fp8")
    p.add_argument("--kv-cache", choices=["fp8", "none"], default=None,
                   help="KV cache quantization (default: fp8 with --qformat fp8, none with awq)")
    p.add_argument("--dataset", default="cnn_dailymail", help="calibration set, by ModelOpt's dataset name")
    p.add_argument("--calib-file", type=Path, help="calibration texts instead: one sample per line")
    p.add_argument("--calib-size", type=int, default=None, help="samples (default 512 for fp8, 128 for awq)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    return p.parse_args()


def calibration_batches(args, tokenizer, device) -> list[dict]:
    """Tokenized calibration samples, padded on the left, in batches."""
    size = args.calib_size or (512 if args.qformat == "fp8" else 128)
    if args.calib_file:
        texts = [t for t in args.calib_file.read_text().splitlines() if t.strip()][:size]
        batches = []
        for i in range(0, len(texts), args.batch_size):
            enc = tokenizer(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=args.calib_seq_len)
            batches.append({k: v.to(device) for k, v in enc.items()})
        return batches
    from modelopt.torch.utils.dataset_utils import get_dataset_dataloader

    loader = get_dataset_dataloader(dataset_name=args.dataset, tokenizer=tokenizer, batch_size=args.batch_size,
                                    num_samples=size, max_sample_length=args.calib_seq_len, device=device)
    return [{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")} for batch in loader]


def quant_config(mtq, qformat: str, kv_cache: str) -> dict:
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG if qformat == "fp8" else mtq.INT4_AWQ_CFG)
    if kv_cache == "fp8":
        kv = getattr(mtq, "FP8_KV_CFG", None)
        kv = kv["quant_cfg"] if kv else {"*[kv]_bmm_quantizer": {"num_bits": (4, 3), "axis": None, "enable": True}}
        cfg["quant_cfg"].update({k: v for k, v in kv.items() if k != "default"})
    return cfg


def sample(model, tokenizer, device) -> str:
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(device) for k, v in ids.items()}
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    args = parse()
    kv_cache = args.kv_cache or ("fp8" if args.qformat == "fp8" else "none")
    if args.qformat == "awq" and kv_cache == "fp8":
        raise SystemExit("an FP8 KV cache needs FP8 hardware; the awq checkpoint is for A100")

    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if not (args.source / "config.json").is_file():
        raise SystemExit(f"{args.source} is not a Hugging Face checkpoint (run build/fetch_gpu_models.sh first)")
    if not torch.cuda.is_available():
        raise SystemExit("quantization needs a CUDA GPU (ModelOpt calibrates on it)")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    config = AutoConfig.from_pretrained(args.source)
    architecture = getattr(transformers, config.architectures[0])  # Gemma3ForConditionalGeneration
    dtype_key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
    started = time.time()
    model = architecture.from_pretrained(args.source, device_map="auto", low_cpu_mem_usage=True,
                                         **{dtype_key: torch.bfloat16}).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = model.get_input_embeddings().weight.device  # where token ids go (device_map may split the model)
    print(f"loaded {config.architectures[0]} in {time.time() - started:.0f} s; "
          f"sample: {sample(model, tokenizer, device)!r}")

    # Only the language model: every other child gets a disabled quantizer, so the export lists it unquantized.
    parent = model.model if hasattr(getattr(model, "model", None), "language_model") else model
    language_model = getattr(parent, "language_model", model)
    if language_model is not model:
        for child in parent.children():
            if child is not language_model:
                mtq.quantize(child, {"quant_cfg": {"default": {"enable": False}}, "algorithm": "max"},
                             forward_loop=None)

    batches = calibration_batches(args, tokenizer, device)

    def forward_loop(m) -> None:
        for batch in batches:
            m(**batch)

    started = time.time()
    mtq.quantize(language_model, quant_config(mtq, args.qformat, kv_cache), forward_loop=forward_loop)
    mtq.print_quant_summary(language_model)
    print(f"calibrated on {len(batches)} batches in {time.time() - started:.0f} s; "
          f"sample: {sample(model, tokenizer, device)!r}")

    partial = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(partial))
    tokenizer.padding_side = padding_side
    # tokenizer, chat template, processor and generation config exactly as the source has them
    for f in args.source.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".model") and not (partial / f.name).exists() \
                and f.name != "model.safetensors.index.json":
            shutil.copy2(f, partial / f.name)
    if (partial / "hf_quant_config.json").is_file():
        quant = json.loads((partial / "hf_quant_config.json").read_text())["quantization"]
    else:  # newer ModelOpt writes it only into config.json
        quant = json.loads((partial / "config.json").read_text()).get("quantization_config", {})
    print(f"exported: quant_algo={quant.get('quant_algo')} kv_cache_quant_algo={quant.get('kv_cache_quant_algo')}")

    shutil.rmtree(args.output, ignore_errors=True)
    partial.rename(args.output)
    (args.output / ".complete").touch()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
