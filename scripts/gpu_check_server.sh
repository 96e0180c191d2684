#!/usr/bin/env bash
# gpu_check_server.sh - the semi-PD server end to end on the GPU host, in one device call:
# stock SGLang and sglang_semipd.launch_server on the tiny bf16 model, same flags, same
# prompts (benchmark/correctness.py); results and server logs under RESULT_DIR.
#   bash scripts/gpu_check_server.sh [RESULT_DIR]      # ONLY=semipd for a smoke test
#   EXTRA_FLAGS=--enable-deterministic-inference MODEL=tiny-f32 bash scripts/gpu_check_server.sh
#     (more flags for both servers; another test model of scripts/make_test_models.py)
#   SERVER_TESTS=1 bash scripts/gpu_check_server.sh   # first the server's gpu tests
#     (tests/gpu/test_semipd_server_gpu.py and the "semipd" launcher of test_stock_serving_gpu.py)
set -u
source "$(dirname "$0")/gpu_common.sh" "${1:-}"
source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
MODEL=${MODEL:-tiny-bf16}
python3 scripts/make_test_models.py /tmp/models --only $MODEL > /dev/null 2>&1
if [ "${SERVER_TESTS:-0}" = 1 ]; then
  timeout -s INT -k 30 $(budget ${TESTS_TIMEOUT:-420}) python3 -m pytest $(each_test_timeout) -m gpu -v -rA -s -p no:cacheprovider \
      tests/gpu/test_semipd_server_gpu.py "tests/gpu/test_stock_serving_gpu.py" -k "semipd and not launcher" \
      > "$LOG/pytest_gpu.log" 2>&1
  stamp "server gpu tests rc=$?: $(tail -n 1 "$LOG/pytest_gpu.log")"
fi
timeout -s INT -k 30 $(budget ${SERVER_TIMEOUT:-540}) python3 -m benchmark.correctness --model-dir /tmp/models/$MODEL \
    --prompts ${PROMPTS:-200} ${ONLY:+--only $ONLY} --extra-flags="${EXTRA_FLAGS:-}" --log-dir "$LOG" \
    --out "$LOG/correctness.json" > "$LOG/correctness.txt" 2>&1
stamp "correctness rc=$?"
tail -n 25 "$LOG/correctness.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$LOG/timings.txt"
ps aux | grep -c "nvidia-cuda-mps" >> "$LOG/timings.txt"
