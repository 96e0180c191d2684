#!/usr/bin/env bash
# gpu_check_all.sh - every gpu-marked test on the GPU host in one call, then optional probes.
#
#   bash scripts/gpu_check_all.sh [RESULT_DIR]        # defaults to $OUT or /tmp/semipd-out
#   PROBES="weight_cache" bash scripts/gpu_check_all.sh
#   TESTS="tests/gpu/test_unified_storage_gpu.py" PROBES="unified_storage" bash scripts/gpu_check_all.sh
# TESTS: pytest targets (default: tests/gpu, every gpu-marked test).
# Probes: weight_cache - stock SGLang serving the tiny model with --weight-cache-mode daemon
#         (SGLang's CUDA-IPC weight sharing) vs off: /generate answers and GPU memory used.
#         unified_storage - benchmark/unified_storage.py on the Llama-3.1-8B-shaped dummy
#         model: semi-PD memory manager + 2 attached workers vs stock SGLang (JSON + PNG).
#         default_model_stock - stock SGLang on the converted default model (after the
#         default-model chat test): a fresh server's first chat answers, for comparison.
# RESULT_DIR gets pytest_gpu.log, timings.txt, probe JSON and logs.tgz (few files: the device
# tool brings back at most 8).
set -u
source "$(dirname "$0")/gpu_common.sh" "${1:-}"

source scripts/gpu_activate.sh .gpu || exit 1
stamp "activated"
timeout -s INT -k 30 $(budget ${TESTS_TIMEOUT:-330}) python3 -m pytest $(each_test_timeout) -m gpu ${TESTS:-tests/gpu} -v -rA -s -p no:cacheprovider > "$LOG/pytest_gpu.log" 2>&1
TEST_RC=$?
stamp "gpu tests rc=$TEST_RC: $(tail -n 1 "$LOG/pytest_gpu.log")"
if [ "${PROBES_NEED_PASS:-0}" = 1 ] && [ "$TEST_RC" != 0 ]; then
  echo "tests failed: probes skipped (PROBES_NEED_PASS=1)"; PROBES=""
fi
grep -E "PASSED|FAILED|ERROR|shared .* MiB" "$LOG/pytest_gpu.log" | head -n 20

if [[ " ${PROBES:-} " == *" weight_cache "* ]]; then
  python3 scripts/make_test_models.py /tmp/models --only tiny-bf16 > /dev/null 2>&1
  timeout 230 python3 - > "$LOG/probe_weight_cache.txt" 2>&1 <<'PY'
import json, subprocess, sys, time
from sglang_semipd.testing.server import ServerProcess, http_json
res = {}
for mode in ("off", "daemon"):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", "/tmp/models/tiny-bf16",
           "--port", "31100", "--attention-backend", "triton", "--sampling-backend", "pytorch",
           "--grammar-backend", "none", "--mem-fraction-static", "0.3",
           "--weight-cache-mode", mode]
    try:
        with ServerProcess(cmd, 31100, f"/tmp/semipd-logs/server_wc_{mode}.log", start_timeout=150) as s:
            out = http_json(s.url + "/generate", {"input_ids": [19556, 905],
                  "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
            smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
            res[mode] = {"startup_s": s.startup_s, "output_ids": out["output_ids"],
                         "per_process_mib": smi.strip().splitlines()}
    except Exception as exc:
        res[mode] = {"error": repr(exc)[:2000]}
    time.sleep(3)
print(json.dumps(res, indent=1))
json.dump(res, open("/tmp/semipd-logs/probe_weight_cache.json", "w"), indent=1)
PY
  stamp "probe weight_cache rc=$?"
  tail -n 40 "$LOG/probe_weight_cache.txt"
fi
if [[ " ${PROBES:-} " == *" unified_storage "* ]]; then
  python3 scripts/make_test_models.py /tmp/models --only llama8b > /dev/null 2>&1
  timeout -s INT -k 30 $(budget ${UNIFIED_TIMEOUT:-420}) python3 -m benchmark.unified_storage \
      --model-dir /tmp/models/llama8b --load-format dummy --log-dir "$LOG/unified" \
      --out "$LOG/unified_storage.json" > "$LOG/unified_storage.txt" 2>&1
  stamp "probe unified_storage rc=$?"
  cp "$LOG/unified_storage.png" "$RES/" 2>/dev/null
  tail -n 30 "$LOG/unified_storage.txt"
fi
if [[ " ${PROBES:-} " == *" default_model_stock "* ]]; then
  # Stock SGLang on the converted default model (the chat test converts it): a fresh
  # server's first answer to each question and the same question again (over the radix
  # cache), to compare with semi-PD's.
  timeout 200 python3 - > "$LOG/probe_default_model_stock.txt" 2>&1 <<'PY'
import json, sys
from sglang_semipd.default_model import default_model_dir
from sglang_semipd.testing.server import ServerProcess, http_json
qs = ["What is the capital of France?", "What is the largest ocean on Earth?"]
cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(default_model_dir()),
       "--port", "31101", "--attention-backend", "triton", "--sampling-backend", "pytorch",
       "--mem-fraction-static", "0.8"]
res = {}
with ServerProcess(cmd, 31101, "/tmp/semipd-logs/server_stock_default.log", start_timeout=150) as s:
    for q in qs:
        for attempt in ("first", "again"):
            body = {"model": "default", "messages": [{"role": "user", "content": q}],
                    "temperature": 0, "max_tokens": 40}
            out = http_json(s.url + "/v1/chat/completions", body)
            res[f"{q} ({attempt})"] = out["choices"][0]["message"]["content"]
print(json.dumps(res, indent=1))
json.dump(res, open("/tmp/semipd-logs/probe_default_model_stock.json", "w"), indent=1)
PY
  stamp "probe default_model_stock rc=$?"
  cat "$LOG/probe_default_model_stock.txt" | tail -n 12
fi
cat "$LOG/timings.txt"
