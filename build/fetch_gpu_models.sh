#!/usr/bin/env bash
# Fetch (and for the LLM, quantize) the GPU profile's weights into one directory, which the Triton
# container mounts read-only at /models-weights (docker/compose.yaml, docker/k8s/triton.yaml).
#
#   HF_TOKEN=hf_... build/fetch_gpu_models.sh            # H100: Gemma 3 27B-it -> FP8 (ModelOpt)
#   GEMMA=bf16 build/fetch_gpu_models.sh                 # A100: serve the BF16 checkpoint as downloaded
#   GEMMA=awq  build/fetch_gpu_models.sh                 # A100: W4A16 AWQ (ModelOpt INT4_AWQ)
#
# Environment: WEIGHTS_DIR (default build/weights), GEMMA (fp8 | awq | bf16, default fp8),
# HF_TOKEN (google/gemma-3-27b-it and sesame/csm-1b are gated: accept their terms on the hub first),
# PYTHON (the interpreter that has torch + nvidia-modelopt, default python3), SKIP_QUANTIZE=1 to only download.
# Idempotent: a finished download or checkpoint leaves a `.complete` marker and is skipped next time.
# Layout and which GPU uses what: build/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEIGHTS_DIR="${WEIGHTS_DIR:-$ROOT/build/weights}"
GEMMA="${GEMMA:-fp8}"
PYTHON="${PYTHON:-python3}"

case "$GEMMA" in
  fp8|awq|bf16) ;;
  *) echo "GEMMA must be fp8 (H100), awq or bf16 (A100), not '$GEMMA'" >&2; exit 2 ;;
esac

if command -v hf >/dev/null 2>&1; then
  HF=(hf download)
elif command -v huggingface-cli >/dev/null 2>&1; then
  HF=(huggingface-cli download)
else
  echo "needs the Hugging Face CLI: pip install -U 'huggingface_hub[cli]'" >&2
  exit 1
fi
if [[ -z "${HF_TOKEN:-}" && ! -s "${HF_HOME:-$HOME/.cache/huggingface}/token" ]]; then
  echo "HF_TOKEN is not set (and no saved login): google/gemma-3-27b-it and sesame/csm-1b are gated" >&2
  exit 1
fi

mkdir -p "$WEIGHTS_DIR"

# fetch REPO DIR [download args...]: the repo's files into $WEIGHTS_DIR/DIR, once
fetch() {
  local repo="$1" dest="$WEIGHTS_DIR/$2"
  shift 2
  if [[ -e "$dest/.complete" ]]; then
    echo "have  $repo -> $dest"
    return
  fi
  echo "fetch $repo -> $dest"
  "${HF[@]}" "$repo" --local-dir "$dest" "$@"
  touch "$dest/.complete"
}

# ASR: faster-whisper distil-large-v3 in CTranslate2 format (fp16 on GPU is chosen at load time)
fetch Systran/faster-distil-whisper-large-v3 faster-distil-whisper-large-v3

# TTS: CSM-1B in transformers format; csm_engine.py reads the voice prompt beside the weights
# (config parameter voice_prompt_audio = prompts/conversational_a.wav, relative to the model dir).
# The original `ckpt.pt` is not needed by transformers.
fetch sesame/csm-1b csm-1b --exclude "*.pt"
VOICE_PROMPT=prompts/conversational_a.wav
if [[ ! -s "$WEIGHTS_DIR/csm-1b/$VOICE_PROMPT" ]]; then
  "${HF[@]}" sesame/csm-1b "$VOICE_PROMPT" --local-dir "$WEIGHTS_DIR/csm-1b"
fi
if [[ ! -s "$WEIGHTS_DIR/csm-1b/$VOICE_PROMPT" ]]; then
  echo "sesame/csm-1b has no $VOICE_PROMPT (the tts voice prompt)" >&2
  exit 1
fi

# LLM: Gemma 3 27B-it in BF16 (the A100 BF16 checkpoint, and the source of the quantized ones)
fetch google/gemma-3-27b-it gemma-3-27b-it

if [[ "$GEMMA" == bf16 ]]; then
  LLM_DIR=gemma-3-27b-it KV=auto
else
  if [[ "$GEMMA" == fp8 ]]; then LLM_DIR=gemma-3-27b-it-fp8 KV=fp8; else LLM_DIR=gemma-3-27b-it-w4a16-awq KV=auto; fi
  if [[ -e "$WEIGHTS_DIR/$LLM_DIR/.complete" ]]; then
    echo "have  $WEIGHTS_DIR/$LLM_DIR"
  elif [[ "${SKIP_QUANTIZE:-0}" == 1 ]]; then
    echo "SKIP_QUANTIZE=1: $WEIGHTS_DIR/$LLM_DIR not made"
  else
    # needs one GPU with >= 80 GB (the BF16 model is 55 GB) and nvidia-modelopt; an H100 can make both
    "$PYTHON" "$ROOT/build/quantize_gemma.py" --source "$WEIGHTS_DIR/gemma-3-27b-it" \
      --output "$WEIGHTS_DIR/$LLM_DIR" --qformat "$GEMMA"
  fi
fi

cat <<EOF

Weights in $WEIGHTS_DIR (mounted at /models-weights). model_repository/*/configs/gpu.pbtxt expects:
  asr  model = /models-weights/faster-distil-whisper-large-v3
  tts  model = /models-weights/csm-1b
  llm  model = /models-weights/$LLM_DIR   kv_cache_dtype = $KV
EOF
