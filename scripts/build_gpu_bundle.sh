#!/usr/bin/env bash
# build_gpu_bundle.sh - builds the offline kit for sglang-semipd's air-gapped
# x86-64 GPU host, whose Python 3.12 already has torch 2.11 / triton / transformers.
#
# Run it from the repository root on any x86-64 Linux machine that reaches PyPI
# (its own Python version does not matter: pip is told which interpreter the
# wheels are for).
#
#   scripts/build_gpu_bundle.sh [OUT_DIR]        # OUT_DIR defaults to ./.gpu
#
# Result (the only files written to OUT_DIR, together < 55 MiB):
#   OUT_DIR/sglang-0.5.17-py312-site.tar.xz     xz-compressed tar of a "site/" dir
#   OUT_DIR/sglang-0.5.17-py312-site.manifest   recipe hash + package list
#   OUT_DIR/sglang_semipd-*.whl                 this project (rebuilt every run)
# On the GPU host:  source scripts/gpu_activate.sh OUT_DIR
#
# "site/" is a plain `pip install --target` tree (no dependencies resolved
# there) holding SGLang 0.5.17 and every package it needs at import/run time
# that the GPU host lacks, at versions resolved for SGLang 0.5.17's release
# date.  The host must already provide (roughly the versions named):
#   torch 2.11.0+cu130, triton 3.6.0, numpy, huggingface-hub 1.x, safetensors,
#   sentencepiece, tiktoken, aiohttp, httpx, anyio, h11, click, uvloop,
#   requests, tqdm, psutil, pyyaml, regex, pillow, pandas, pyarrow, xxhash,
#   fsspec, filelock, jinja2, einops, ninja, numba, nvidia-ml-py,
#   prometheus-client, scipy, cuda-bindings, torchvision, attrs, packaging,
#   pygments, typing-extensions, and nvcc (only for SGLang's JIT kernels).
# transformers and tokenizers are bundled on purpose: SGLang 0.5.17 pins
# transformers==5.12.1 (which wants tokenizers<=0.23.0); the bundle's copies
# shadow the host's through PYTHONPATH.
#
# Trimmed to stay small (see trim_site below):
#   sglang-kernel 0.4.5: drops flash_ops (FlashAttention-3, 1.1 GB), sm100/
#     (Blackwell build), infllm_ops and flashmla_ops; keeps sm90/common_ops
#     (Hopper) and spatial_ops.  So: Hopper (sm_90) GPUs only, and no
#     --attention-backend fa3 / flashmla; use triton (or flashinfer).
#   sglang: drops the optional Rust extensions (embedded Rust server, native
#     gRPC, Rust image preprocessing) and the diffusion runtime
#     (sglang/multimodal_gen); console scripts are dropped (use python3 -m).
#
# Environment knobs:
#   PYVER=3.12          target CPython (3.11 builds a CPU-side test tree; the
#                       kernel package still only runs on the GPU host)
#   KEEP_RUST_EXT=1     keep sglang's Rust extensions (+~23 MB unpacked)
#   CACHE_DIR=...       where downloaded wheels and the staging tree live
#                       (default ~/.cache/sglang-bundle); ~0.45 GB, mostly the
#                       untrimmed sglang-kernel wheel
#   PIP="python3 -m pip"
#
# Idempotent: wheels are downloaded once into CACHE_DIR, and when OUT_DIR
# already holds an archive built from the same recipe nothing is rebuilt
# (FORCE=1 rebuilds anyway).  The archive is reproducible (sorted names,
# fixed owner and mtime).
set -euo pipefail

OUT_DIR=${1:-$PWD/.gpu}
PYVER=${PYVER:-3.12}
KEEP_RUST_EXT=${KEEP_RUST_EXT:-0}
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sglang-bundle}
PIP=${PIP:-python3 -m pip}
FORCE=${FORCE:-0}

SGLANG_VERSION=0.5.17
PYTAG=py${PYVER/./}
NAME=sglang-${SGLANG_VERSION}-${PYTAG}-site
ARCHIVE=$OUT_DIR/$NAME.tar.xz
MANIFEST=$OUT_DIR/$NAME.manifest

# --- what goes in ----------------------------------------------------------
# Pinned closure of SGLang's import/run-time needs for serving, minus what the
# GPU host already has.  Resolved against PyPI as of SGLang 0.5.17's release
# (Aug 2026) with the host's torch/numpy/huggingface-hub versions as
# constraints.  Exact pins keep the bundle reproducible.
PACKAGES=(
  sglang==0.5.17
  sglang-kernel==0.4.5          # trimmed below
  transformers==5.12.1          # SGLang's pin (host has a newer one)
  tokenizers==0.22.2            # transformers 5.12.1 wants <=0.23.0
  # HTTP server / API layer
  fastapi==0.141.1
  starlette==1.6.0
  uvicorn==0.52.3
  python-multipart==0.0.32
  pydantic==2.13.4
  pydantic-core==2.46.4
  annotated-types==0.8.0
  typing-inspection==0.4.4
  orjson==3.12.0
  pybase64==1.5.0
  msgspec==0.21.1
  pyzmq==27.1.0
  setproctitle==1.3.7
  # OpenAI-compatible endpoints, tool-call and reasoning parsers
  openai==2.6.1
  distro==1.9.0
  jiter==0.16.0
  sniffio==1.3.1
  partial-json-parser==0.2.1.1.post7
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.6.3
  # grammar / JIT-kernel runtime (imported unconditionally)
  xgrammar==0.2.1
  apache-tvm-ffi==0.1.11
  # FlashInfer: on CUDA, sglang's fp8 utilities import it at start-up whatever
  # the backends.  Pure Python + CUDA/CUTLASS sources that it JIT-compiles with
  # nvcc on first use of a kernel.  Its other requirements (nvidia-cutlass-dsl,
  # cuda-tile, nccl4py, nvidia-cudnn-frontend) are only for kernels that the
  # triton/pytorch backends never call, and are left out.
  flashinfer-python==0.6.15.post1
  # quantization + model-format modules imported at start-up
  compressed-tensors==0.18.0
  loguru==0.7.3
  gguf==0.19.0
  # audio endpoints (imported by the HTTP server module)
  soundfile==0.13.1
  cffi==2.1.1
  pycparser==3.0
  # benchmark client (sglang.bench_serving imports datasets)
  datasets==5.0.1
  dill==0.4.1
  multiprocess==0.70.19
  # sglang.utils imports IPython.display (jedi/parso, IPython's lazily
  # imported completion engine, are left out: 33 MB)
  ipython==9.16.1
  ipython-pygments-lexers==1.1.1
  traitlets==5.16.1
  prompt-toolkit==3.0.53
  wcwidth==0.8.2
  pexpect==4.9.0
  ptyprocess==0.7.0
  stack-data==0.6.3
  asttokens==3.0.2
  executing==2.2.1
  pure-eval==0.2.3
  matplotlib-inline==0.2.2
)

# Platform tags pip may pick for the target (glibc >= 2.34 is needed by the
# sglang wheel itself; pip matches each manylinux_2_N tag exactly).
PLATFORMS=(manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64
           manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64
           manylinux1_x86_64)
TARGET_OPTS=(--only-binary=:all: --python-version "$PYVER" --implementation cp)
for p in "${PLATFORMS[@]}"; do TARGET_OPTS+=(--platform "$p"); done

trim_site() {  # $1 = site dir
  local s=$1
  # sglang-kernel: keep sm90/common_ops (Hopper) + spatial_ops.  flash_ops and
  # infllm_ops are loaded lazily; flashmla_ops failures are caught on import.
  rm -rf "$s"/sgl_kernel/flash_ops*.so "$s"/sgl_kernel/sm100 \
         "$s"/sgl_kernel/infllm_ops*.so "$s"/sgl_kernel/flashmla_ops*.so
  # Diffusion runtime, only reached through `sglang serve/generate` with a
  # diffusion model.
  rm -rf "$s"/sglang/multimodal_gen
  if [[ $KEEP_RUST_EXT != 1 ]]; then
    # Opt-in Rust paths: SGLANG_RUST_SERVER=1, --grpc-port / --grpc-mode,
    # SGLANG_INKLING_RS_MM_PREPROCESS=1.
    rm -f "$s"/sglang/srt/server/_core*.so "$s"/sglang/srt/grpc/_core*.so \
          "$s"/sglang/srt/multimodal/_core*.so
  fi
  # Static libraries are only for linking C++ programs against a package
  # (xgrammar ships a 62 MB libxgrammar.a); nothing loads them at run time.
  find "$s" -name '*.a' -type f -delete
  # Console scripts carry this machine's interpreter path; use python3 -m.
  rm -rf "$s"/bin
  find "$s" -name __pycache__ -type d -prune -exec rm -rf {} +
  # Drop debug symbols from native extensions (no-op where already stripped).
  if command -v strip >/dev/null; then
    find "$s" -name '*.so*' -type f -exec strip --strip-debug {} + 2>/dev/null || true
  fi
}

# --- idempotence -------------------------------------------------------------
recipe_hash=$( { printf '%s\n' "${PACKAGES[@]}" "${PLATFORMS[@]}" "$PYVER" \
                   "$KEEP_RUST_EXT"; declare -f trim_site; } | sha256sum | cut -c1-16)
build_project_wheel() {  # this project, pure Python: a wheel beside the archive
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  rm -f "$OUT_DIR"/sglang_semipd-*.whl
  $PIP wheel -q --no-deps -w "$OUT_DIR" "$repo"
  rm -rf "$repo/build" "$repo"/*.egg-info
  echo "project wheel: $(ls "$OUT_DIR"/sglang_semipd-*.whl)"
}

if [[ $FORCE != 1 && -s $ARCHIVE && -f $MANIFEST ]] &&
   grep -qx "recipe $recipe_hash" "$MANIFEST"; then
  echo "up to date: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
  build_project_wheel
  exit 0
fi

build_site() {
  mkdir -p "$OUT_DIR" "$CACHE_DIR/wheels"
  STAGE=$CACHE_DIR/stage-$PYTAG
  echo ">> downloading wheels into $CACHE_DIR/wheels"
  # One call per package: pip skips files it already has, and one name at a time
  # keeps version conflicts between pins from being "resolved" silently.
  for spec in "${PACKAGES[@]}"; do
    $PIP download -q --no-deps "${TARGET_OPTS[@]}" -d "$CACHE_DIR/wheels" "$spec"
  done

  echo ">> installing into $STAGE/site"
  rm -rf "$STAGE"
  mkdir -p "$STAGE"
  $PIP install -q --no-deps --no-compile --no-index --find-links "$CACHE_DIR/wheels" \
    "${TARGET_OPTS[@]}" --target "$STAGE/site" "${PACKAGES[@]}"
  trim_site "$STAGE/site"

  echo ">> packing $ARCHIVE"
  tmp=$ARCHIVE.tmp.$$
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
      -C "$STAGE" -cf - site | xz -T0 -9e > "$tmp"
  mv "$tmp" "$ARCHIVE"
  {
    echo "recipe $recipe_hash"
    echo "python $PYVER"
    echo "sha256 $(sha256sum "$ARCHIVE" | cut -d' ' -f1)"
    echo "unpacked_bytes $(du -sb "$STAGE/site" | cut -f1)"
    printf 'package %s\n' "${PACKAGES[@]}"
  } > "$MANIFEST"
  echo "done: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1); unpacked $(du -sh "$STAGE/site" | cut -f1))"
}

build_site
build_project_wheel
