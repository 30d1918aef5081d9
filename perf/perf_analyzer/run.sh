#!/usr/bin/env bash
# perf_analyzer against our streaming models: first-response latency over gRPC streaming.
#
#   perf/perf_analyzer/run.sh [-u HOST:GRPC_PORT] [MODEL ...]      (models: llm tts asr; default all three)
#
# Without -u it starts its own tritonserver (CPU profile, free ports) with the
# models asked for, and stops it at the end. Sets up, once and idempotently:
# Debian's libb64 (apt-get), and a small venv (.cache/perf-venv) with
# tritonclient 2.41, whose wheel ships the perf_analyzer binary, plus the CUDA
# runtime library it links against even on CPU (nvidia-cuda-runtime-cu12). The
# project's own venv keeps its newer tritonclient.
#
# Writes to perf/results/ (OUT=...): pa-<model>-<stamp>.csv (perf_analyzer's
# own CSV), pa-<model>-<stamp>.profile.json (every request's timestamps) and
# pa-summary-<stamp>.csv + pa-summary-latest.csv (report.py: first-response
# p50/p90/p95/p99 computed from those timestamps).
#
# Knobs (environment): LLM_CONCURRENCY (default 1), TTS_CONCURRENCY (1),
# ASR_CALLS (concurrent calls, 1; each call sends a 20 ms chunk every 20 ms),
# COUNT (requests per window for llm/tts, 8), TRIALS (max windows, 6).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
VENV=${PERF_VENV:-$ROOT/.cache/perf-venv}
OUT=${OUT:-$ROOT/perf/results}
URL=""
while getopts "u:h" opt; do
  case $opt in
    u) URL=$OPTARG ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
MODELS=("$@")
[ ${#MODELS[@]} -eq 0 ] && MODELS=(llm tts asr)
LLM_CONCURRENCY=${LLM_CONCURRENCY:-1}
TTS_CONCURRENCY=${TTS_CONCURRENCY:-1}
ASR_CALLS=${ASR_CALLS:-1}
COUNT=${COUNT:-8}
TRIALS=${TRIALS:-6}

# --- setup (idempotent) -------------------------------------------------------------
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  echo "installing libb64-0d (apt-get)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -q && apt-get install -y -q libb64-0d
  else
    sudo apt-get update -q && sudo apt-get install -y -q libb64-0d
  fi
fi
if [ ! -x "$VENV/bin/perf_analyzer" ] || ! "$VENV/bin/python" -c 'import nvidia.cuda_runtime' 2>/dev/null; then
  echo "setting up $VENV (tritonclient 2.41 with perf_analyzer)" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q "tritonclient==2.41.0" "nvidia-cuda-runtime-cu12"
fi
CUDART=$("$VENV/bin/python" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
export LD_LIBRARY_PATH="$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PA="$VENV/bin/perf_analyzer"
"$PA" --version >/dev/null 2>&1 || { echo "perf_analyzer does not start:" >&2; ldd "$PA" | grep 'not found' >&2; exit 1; }

# --- inputs --------------------------------------------------------------------------
if [ ! -f "$HERE/asr.json" ] || [ ! -f "$HERE/llm.json" ] || [ ! -f "$HERE/tts.json" ]; then
  "$PY" "$HERE/make_inputs.py" --out "$HERE"
fi

# --- server ---------------------------------------------------------------------------
SERVER_PID=""
cleanup() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT
mkdir -p "$OUT"
if [ -z "$URL" ]; then
  LOG="$OUT/pa-tritonserver.log"
  PORTS=$("$PY" -c 'import socket
ps=[]
for _ in range(3):
    s=socket.socket(); s.bind(("127.0.0.1",0)); ps.append(s)
print(*[s.getsockname()[1] for s in ps])')
  read -r HTTP GRPC METRICS <<<"$PORTS"
  LIST=$(IFS=,; echo "${MODELS[*]}")
  echo "starting tritonserver (cpu: $LIST) on gRPC $GRPC, log $LOG" >&2
  (cd "$ROOT" && exec "$PY" - "$HTTP" "$GRPC" "$METRICS" "$LIST" "$LOG" <<'PYEOF'
import signal, sys
from edge.tritonserver import TritonServer
http, grpc, metrics, models, log = sys.argv[1:]
server = TritonServer("cpu", int(http), int(grpc), int(metrics), log_file=log, models=tuple(models.split(",")))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server.start(timeout=900)
try:
    print("READY", flush=True)
    server.process.wait()
finally:
    server.stop()
PYEOF
  ) > "$OUT/pa-server.out" 2>&1 &
  SERVER_PID=$!
  until grep -q READY "$OUT/pa-server.out" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/pa-server.out" >&2; exit 1; }
    sleep 1
  done
  URL="127.0.0.1:$GRPC"
fi

# --- runs ------------------------------------------------------------------------------
STAMP=$(date -u +%Y%m%d-%H%M%S)
SUMMARY="$OUT/pa-summary-$STAMP.csv"
for MODEL in "${MODELS[@]}"; do
  common=(-m "$MODEL" -i grpc -u "$URL" --streaming --input-data "$HERE/$MODEL.json"
          --measurement-mode count_windows --max-trials "$TRIALS"
          -f "$OUT/pa-$MODEL-$STAMP.csv" --profile-export-file "$OUT/pa-$MODEL-$STAMP.profile.json")
  case $MODEL in
    llm) extra=(--concurrency-range "$LLM_CONCURRENCY" --measurement-request-count "$COUNT" --stability-percentage 50) ;;
    tts) extra=(--concurrency-range "$TTS_CONCURRENCY" --measurement-request-count "$COUNT" --stability-percentage 50) ;;
    # asr is a sequence model that keeps each call's latest chunk open until the next one arrives, so
    # concurrency mode (next request after the previous completes) would wait forever: send at the
    # phone's pace instead, 50 chunks/s per call, ASR_CALLS calls at once. Only chunks that carry an
    # event (speech_start/stop, partial, final, end) get a data response; their latency is what counts.
    asr) extra=(--request-rate-range "$((50 * ASR_CALLS))" --num-of-sequences "$ASR_CALLS"
                --measurement-request-count "$((250 * ASR_CALLS))" --stability-percentage 1000) ;;
    *) echo "unknown model $MODEL" >&2; exit 2 ;;
  esac
  echo "=== $MODEL: perf_analyzer ${common[*]} ${extra[*]}"
  "$PA" "${common[@]}" "${extra[@]}" 2>&1 | sed -n '/^Request concurrency\|^Request Rate/,$p'
  echo "--- $MODEL from the request timestamps (first response = streamed latency):"
  min=1; [ "$MODEL" = asr ] && min=2
  "$PY" "$HERE/report.py" "$MODEL" "$OUT/pa-$MODEL-$STAMP.profile.json" --csv "$SUMMARY" --min-responses $min
done
cp "$SUMMARY" "$OUT/pa-summary-latest.csv"
echo "wrote $SUMMARY (and pa-summary-latest.csv), pa-<model>-$STAMP.csv/.profile.json in $OUT"
