# gpu_common.sh - shared prologue of the gpu_check_*.sh scripts (source it, don't run it).
#   RES: where results go (first argument, else $OUT, else /tmp/semipd-out)
#   LOG: /tmp/semipd-logs, emptied; `stamp MSG` appends a timed line to $LOG/timings.txt
#   On exit, timings.txt, any *.json and *.log named in RESULT_FILES (default pytest_gpu.log)
#   are copied to RES and all of LOG is packed into RES/logs.tgz (the device tool brings back
#   at most 8 files).
#   Servers left by an earlier call on a warm machine (a run cut by its timeout) are killed
#   first and at exit: ServerProcess starts each server in a session of its own, which the
#   device tool does not end, and a leftover would answer another server's health checks.
#   Timeouts send SIGINT first, so pytest and the benchmarks stop their servers themselves.
RES=${1:-${OUT:-/tmp/semipd-out}}
sweep() {  # process titles sglang::*, and python -m sglang[_semipd].launch_server
  pkill -9 -f '^sglang::|^[^ ]*python[^ ]* -m sglang(_semipd)?\.launch_server' 2>/dev/null
  sleep 1
}
sweep
# Triton's JIT cache (the first decode-graph capture on a fresh host spent 77 s compiling):
# unpacked from .gpu/triton-cache.tgz when carried, packed back into RES at exit (if small)
# -- copy it to .gpu/ to carry it next time.
export TRITON_CACHE_DIR=/tmp/semipd-triton-cache
if [ -f .gpu/triton-cache.tgz ] && [ ! -d "$TRITON_CACHE_DIR" ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar -C "$TRITON_CACHE_DIR" -xzf .gpu/triton-cache.tgz
fi
# The default model's GGUF, when its pieces came over earlier calls to this warm host
# (scripts/gpu_default_model_pieces.sh): joined into the cache the launcher reads.
export SGLANG_SEMIPD_CACHE=/tmp/semipd-cache
if [ -d .gpu_part1 ]; then bash scripts/gpu_default_model_pieces.sh join || true; fi
LOG=/tmp/semipd-logs
rm -rf "$LOG"; mkdir -p "$LOG" "$RES"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG/timings.txt"; }
# The device tool stops a call at its limit (600 s at most) without running the exit trap,
# so nothing would come back: each step's timeout is cut to what is left of CALL_LIMIT_S
# (default 590; set it to the call's timeout_s) after its kill grace (30 s) and the exit
# packing (20 s).  Session 6 lost a whole call to a 550 s test step plus its grace.
CALL_LIMIT_S=${CALL_LIMIT_S:-590}
budget() {  # budget SECONDS -> SECONDS, or less (at least 1)
  local left=$(( T0 + CALL_LIMIT_S - $(date +%s) - 50 ))
  [ "$left" -ge 1 ] || left=1
  if [ "$1" -le "$left" ]; then echo "$1"; else
    echo "[$(( $(date +%s) - T0 ))s] step timeout $1 s cut to $left s (CALL_LIMIT_S=$CALL_LIMIT_S)" \
      | tee -a "$LOG/timings.txt" >&2
    echo "$left"
  fi
}
# pytest-timeout (on the GPU host): one hanging test fails after TEST_TIMEOUT_EACH seconds
# (module fixtures -- a server start -- count in their first test) instead of eating the call.
each_test_timeout() {
  python3 -c "import pytest_timeout" 2>/dev/null && \
    echo "--timeout=${TEST_TIMEOUT_EACH:-300} --timeout-method=signal"
}
finish() {
  sweep
  cp "$LOG/timings.txt" "$RES/" 2>/dev/null
  for f in ${RESULT_FILES:-pytest_gpu.log}; do cp "$LOG/$f" "$RES/" 2>/dev/null; done
  cp "$LOG"/*.json "$RES/" 2>/dev/null
  tar -C "$LOG" -czf "$RES/logs.tgz" .
  if [ -d "$TRITON_CACHE_DIR" ] && [ "$(du -sm "$TRITON_CACHE_DIR" | cut -f1)" -lt 60 ]; then
    tar -C "$TRITON_CACHE_DIR" -czf "$RES/triton-cache.tgz" .
    [ "$(du -m "$RES/triton-cache.tgz" | cut -f1)" -lt 16 ] || rm -f "$RES/triton-cache.tgz"
  fi
}
trap finish EXIT
export PYTHONUNBUFFERED=1 SEMIPD_TEST_LOG_DIR=$LOG
