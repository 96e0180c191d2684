#!/usr/bin/env bash
# gpu_check_compare.sh - a slice of benchmark/compare.py on the GPU host in one device call
# (an 8B server start took about 1 minute on the H100 with the carried Triton cache, and each
# rate ~30-40 s: a few systems per call):
#   SYSTEMS=sglang_chunked_2048,semipd_green_slo bash scripts/gpu_check_compare.sh [RESULT_DIR]
#   RATES=4,8,12,16,inf DURATION_S=15 WARMUP=32 WORKLOADS=sharegpt,azure_conv BENCH_TIMEOUT=540 ...
#   MODEL=dsv2-lite ... (default llama8b; merge each model into its own results directory)
#   MEM_FRACTION=0.75 ... (every server's --mem-fraction-static; default compare.py's 0.85)
# Needs the workloads made here first (carry .gpu):
#   python -m benchmark.compare prepare --out .gpu/bench --num 400
#   gzip -9 .gpu/bench/*.jsonl   # 6 MB -> 1.8 MB of the 64 MiB a call carries; unpacked here
# The run files land in RESULT_DIR/logs.tgz (compare/); merge them here with
#   python -m benchmark.compare report --workloads .gpu/bench --out-dir benchmark/results/h100 \
#       --merge-from <unpacked logs>/compare
set -u
RESULT_FILES="compare.txt"
source "$(dirname "$0")/gpu_common.sh" "${1:-}"
source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
[ -f .gpu/bench/workloads.json ] || { stamp "no .gpu/bench/workloads.json (run prepare)"; exit 1; }
for gz in .gpu/bench/*.jsonl.gz; do  # carried compressed: bench_serving reads plain JSONL
  [ -f "$gz" ] && [ ! -f "${gz%.gz}" ] && gunzip -k "$gz"
done
# STACK_SAMPLES=1: every semi-PD process samples its main thread (sglang_semipd.stack_sampler);
# every server's HTTP process and the processes it starts too (benchmark/sampled_server.py)
[ -n "${STACK_SAMPLES:-}" ] && export SGLANG_SEMIPD_STACK_SAMPLES="$LOG/samples"
MODEL=${MODEL:-llama8b}  # or dsv2-lite (DeepSeek-V2-Lite shape: MLA + MoE)
python3 scripts/make_test_models.py /tmp/models --only "$MODEL" > /dev/null 2>&1
timeout -s INT -k 30 $(budget ${BENCH_TIMEOUT:-540}) python3 -m benchmark.compare run --workloads .gpu/bench \
    --model-dir "/tmp/models/$MODEL" --load-format dummy ${MEM_FRACTION:+--mem-fraction-static "$MEM_FRACTION"} --systems "${SYSTEMS:?SYSTEMS=...}" \
    --rates "${RATES:-4,8,12,16}" --duration-s "${DURATION_S:-15}" --warmup-requests "${WARMUP:-32}" \
    ${WORKLOADS:+--only-workloads "$WORKLOADS"} --out-dir "$LOG/compare" \
    > "$LOG/compare.txt" 2>&1
stamp "compare rc=$?"
tail -n 30 "$LOG/compare.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader >> "$LOG/timings.txt"
