#!/usr/bin/env bash
# gpu_check_reliability.sh - the reliability checks on the GPU host in one device call:
# optionally the kill -9 tests (tests/gpu/test_semipd_crash_gpu.py), then benchmark/soak.py on
# the tiny bf16 model (20,000 requests, 10% aborted); JSON and logs to RESULT_DIR.
#   bash scripts/gpu_check_reliability.sh [RESULT_DIR]
#   CRASH=0 bash scripts/gpu_check_reliability.sh     # the soak only
#   SOAK=0 bash scripts/gpu_check_reliability.sh      # the crash tests only
#   REQUESTS=2000 SOAK_TIMEOUT=200 ...                # a shorter soak
#   CRASH_K="scheduler or memory_manager" ...         # some victims only (pytest -k)
set -u
RESULT_FILES="pytest_gpu.log soak.txt"
source "$(dirname "$0")/gpu_common.sh" "${1:-}"
source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
python3 scripts/make_test_models.py /tmp/models --only tiny-bf16 > /dev/null 2>&1
if [ "${CRASH:-1}" = 1 ]; then
  timeout -s INT -k 30 $(budget ${CRASH_TIMEOUT:-400}) python3 -m pytest $(each_test_timeout) -m gpu -v -rA -s -p no:cacheprovider \
      tests/gpu/test_semipd_crash_gpu.py ${CRASH_K:+-k "$CRASH_K"} > "$LOG/pytest_gpu.log" 2>&1
  stamp "crash tests rc=$?: $(tail -n 1 "$LOG/pytest_gpu.log")"
  grep -E "PASSED|FAILED|ERROR" "$LOG/pytest_gpu.log" | head -n 10
fi
if [ "${SOAK:-1}" = 1 ]; then
  timeout -s INT -k 30 $(budget ${SOAK_TIMEOUT:-330}) python3 -m benchmark.soak --model-dir /tmp/models/tiny-bf16 \
      --requests ${REQUESTS:-20000} --log-dir "$LOG" --out "$LOG/soak.json" \
      > "$LOG/soak.txt" 2>&1
  stamp "soak rc=$?"
  tail -n 20 "$LOG/soak.txt"
fi
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$LOG/timings.txt"
cat "$LOG/timings.txt"
