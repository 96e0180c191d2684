#!/usr/bin/env bash
# gpu_check_foundation.sh - the foundation's proof on the GPU host, in one call:
#   activate the offline kit, make the test models, run the gpu-marked tests,
#   then the stock-SGLang baseline (8B-shaped dummy model, CUDA graphs on).
#
#   bash scripts/gpu_check_foundation.sh [RESULT_DIR]   # defaults to $OUT or /tmp/semipd-out
# Logs go to /tmp/semipd-logs; RESULT_DIR gets baseline.json, timings.txt and logs.tgz
# (few files: the device tool brings back at most 8).
set -u
RESULT_FILES="baseline.json"; source "$(dirname "$0")/gpu_common.sh" "${1:-}"

{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader
  python3 -V; command -v nvidia-cuda-mps-control; } > "$LOG/host.txt" 2>&1
source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
python3 -c "import sglang, sglang_semipd, torch; print(sglang.__version__, sglang_semipd.__file__, torch.__version__, torch.cuda.get_device_name())" >> "$LOG/host.txt" 2>&1
stamp "imports checked"
python3 scripts/make_test_models.py /tmp/models --sharegpt > "$LOG/models.txt" 2>&1
stamp "models made"

timeout 300 python3 -m pytest $(each_test_timeout) -m gpu tests/gpu -v -rA -p no:cacheprovider > "$LOG/pytest_gpu.log" 2>&1
stamp "gpu tests rc=$?: $(tail -n 1 "$LOG/pytest_gpu.log")"

timeout 400 python3 -m benchmark.baseline_sglang --model-dir /tmp/models/llama8b \
  --load-format dummy --dataset-path /tmp/models/sharegpt_synth.json --num-prompts 200 \
  --input-len 1024 --output-len 256 --log-dir "$LOG" \
  --out "$LOG/baseline.json" > "$LOG/baseline_stdout.txt" 2>&1
stamp "baseline rc=$?"
cat "$LOG/baseline_stdout.txt" | tail -n 12
cat "$LOG/timings.txt"
