#!/usr/bin/env bash
# gpu_check_partition.sh - benchmark/sm_partition.py on the GPU host in one device call:
# graph confinement, then the semi-PD server on the Llama-3.1-8B-shaped dummy model with
# --sm-partition green (every split + resize latency) and none; JSON, PNG and logs to RESULT_DIR.
#   bash scripts/gpu_check_partition.sh [RESULT_DIR]     # MODES=green for one mode only
set -u
source "$(dirname "$0")/gpu_common.sh" "${1:-}"
source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
python3 scripts/make_test_models.py /tmp/models --only llama8b > /dev/null 2>&1
timeout -s INT -k 30 $(budget ${BENCH_TIMEOUT:-540}) python3 -m benchmark.sm_partition --model-dir /tmp/models/llama8b \
    --load-format dummy --modes ${MODES:-green,none} --log-dir "$LOG" \
    --out "$LOG/sm_partition.json" > "$LOG/sm_partition.txt" 2>&1
stamp "sm_partition rc=$?"
cp "$LOG/sm_partition.png" "$RES/" 2>/dev/null
tail -n 30 "$LOG/sm_partition.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$LOG/timings.txt"
