# gpu_common.sh - shared prologue of the gpu_check_*.sh scripts (source it, don't run it).
#   RES: where results go (first argument, else $OUT, else /tmp/semipd-out)
#   LOG: /tmp/semipd-logs, emptied; `stamp MSG` appends a timed line to $LOG/timings.txt
#   On exit, timings.txt, any *.json and *.log named in RESULT_FILES (default pytest_gpu.log)
#   are copied to RES and all of LOG is packed into RES/logs.tgz (the device tool brings back
#   at most 8 files).
RES=${1:-${OUT:-/tmp/semipd-out}}
LOG=/tmp/semipd-logs
rm -rf "$LOG"; mkdir -p "$LOG" "$RES"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG/timings.txt"; }
finish() {
  cp "$LOG/timings.txt" "$RES/" 2>/dev/null
  for f in ${RESULT_FILES:-pytest_gpu.log}; do cp "$LOG/$f" "$RES/" 2>/dev/null; done
  cp "$LOG"/*.json "$RES/" 2>/dev/null
  tar -C "$LOG" -czf "$RES/logs.tgz" .
}
trap finish EXIT
export PYTHONUNBUFFERED=1 SEMIPD_TEST_LOG_DIR=$LOG
