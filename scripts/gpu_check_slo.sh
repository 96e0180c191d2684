#!/usr/bin/env bash
# gpu_check_slo.sh - in one device call: the semi-PD server's gpu tests (tiny model), then
# benchmark/slo_controller.py (load step on the Llama-3.1-8B-shaped dummy model with
# --partition-policy slo, then the same load once per pinned static split: PHASE_S,
# STATIC_SHARES); JSON, PNG and logs to RESULT_DIR.
#   bash scripts/gpu_check_slo.sh [RESULT_DIR]       # SKIP_TESTS=1: the benchmark only
#   SLO_ARGS="--input-len 256 --output-len 512 --step-input-len 2048 --step-output-len 64" ...
#     (more benchmark flags, e.g. a mix step after which another static split is best)
set -u
source "$(dirname "$0")/gpu_common.sh" "${1:-}"
source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 30 $(budget ${TESTS_TIMEOUT:-240}) python3 -m pytest $(each_test_timeout) -m gpu -v -rA -s -p no:cacheprovider \
      tests/gpu/test_semipd_server_gpu.py > "$LOG/pytest_gpu.log" 2>&1
  stamp "server gpu tests rc=$?: $(tail -n 1 "$LOG/pytest_gpu.log")"
fi
python3 scripts/make_test_models.py /tmp/models --only llama8b > /dev/null 2>&1
timeout -s INT -k 30 $(budget ${BENCH_TIMEOUT:-480}) python3 -m benchmark.slo_controller --model-dir /tmp/models/llama8b \
    --load-format dummy --phase-s ${PHASE_S:-15} --static-shares "${STATIC_SHARES:-0.375,0.5,0.625,0.75}" \
    ${SLO_ARGS:-} --log-dir "$LOG" --out "$LOG/slo_controller.json" \
    > "$LOG/slo_controller.txt" 2>&1
stamp "slo_controller rc=$?"
cp "$LOG/slo_controller.png" "$RES/" 2>/dev/null
tail -n 20 "$LOG/slo_controller.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$LOG/timings.txt"
