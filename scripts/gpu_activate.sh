# gpu_activate.sh - source this on the GPU host to use the offline kit made by
# scripts/build_gpu_bundle.sh:
#
#   source scripts/gpu_activate.sh [BUNDLE_DIR]      # BUNDLE_DIR defaults to ./.gpu
#
# Besides the SGLang site tree below, it unpacks BUNDLE_DIR/sglang_semipd-*.whl
# (this project) into $SGLANG_SITE_ROOT/project, after the site tree on
# PYTHONPATH; a checkout you run from (python -m from the repo root) still wins.
# Unpacks BUNDLE_DIR/sglang-*-site.tar.xz into $SGLANG_SITE_ROOT (default
# /tmp/sglang-site) the first time (or when the archive changed; otherwise it
# is skipped), then puts $SGLANG_SITE_ROOT/site first on PYTHONPATH so that
# the host's python3 (with its own torch/triton) finds sglang and the bundled
# packages, and turns Hugging Face network look-ups off.
# Works in bash and zsh; needs tar, and xz or else python3's lzma module.

_sgl_dir=${1:-$PWD/.gpu}
_sgl_root=${SGLANG_SITE_ROOT:-/tmp/sglang-site}
_sgl_archive=$(ls -t "$_sgl_dir"/sglang-*-site.tar.xz 2>/dev/null | head -n 1)

if [ -z "$_sgl_archive" ]; then
  echo "gpu_activate.sh: no sglang-*-site.tar.xz in $_sgl_dir" >&2
  unset _sgl_dir _sgl_root _sgl_archive
  return 1 2>/dev/null || exit 1
fi

# Identify the archive by its manifest's checksum line when there is one,
# else by name and size.
_sgl_stamp=$(grep -s '^sha256 ' "${_sgl_archive%.tar.xz}.manifest")
[ -n "$_sgl_stamp" ] || _sgl_stamp="$(basename "$_sgl_archive") $(wc -c < "$_sgl_archive")"

if [ "$(cat "$_sgl_root/.stamp" 2>/dev/null)" != "$_sgl_stamp" ]; then
  echo "gpu_activate.sh: unpacking $_sgl_archive into $_sgl_root" >&2
  rm -rf "$_sgl_root.partial" && mkdir -p "$_sgl_root.partial" &&
  if command -v xz >/dev/null 2>&1; then
    tar -C "$_sgl_root.partial" -xJf "$_sgl_archive"
  else
    python3 - "$_sgl_archive" "$_sgl_root.partial" <<'EOF'
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    if hasattr(tarfile, "data_filter"):
        t.extractall(sys.argv[2], filter="data")
    else:
        t.extractall(sys.argv[2])
EOF
  fi &&
  echo "$_sgl_stamp" > "$_sgl_root.partial/.stamp" &&
  rm -rf "$_sgl_root" && mv "$_sgl_root.partial" "$_sgl_root" || {
    echo "gpu_activate.sh: unpacking failed" >&2
    unset _sgl_dir _sgl_root _sgl_archive _sgl_stamp
    return 1 2>/dev/null || exit 1
  }
fi

case ":${PYTHONPATH:-}:" in
  *":$_sgl_root/site:"*) ;;
  *) export PYTHONPATH="$_sgl_root/site${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
_sgl_wheel=$(ls -t "$_sgl_dir"/sglang_semipd-*.whl 2>/dev/null | head -n 1)
if [ -n "$_sgl_wheel" ]; then
  rm -rf "$_sgl_root/project" && mkdir -p "$_sgl_root/project" &&
  python3 -m zipfile -e "$_sgl_wheel" "$_sgl_root/project" &&
  case ":$PYTHONPATH:" in
    *":$_sgl_root/project:"*) ;;
    *) export PYTHONPATH="$PYTHONPATH:$_sgl_root/project" ;;
  esac
fi
unset _sgl_wheel
# No network on the host: fail fast instead of waiting on hub time-outs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
# SGLang's and FlashInfer's JIT kernels are built with nvcc; help them find it.
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
fi
export SGLANG_SITE_ROOT="$_sgl_root"
unset _sgl_dir _sgl_root _sgl_archive _sgl_stamp
