#!/usr/bin/env bash
# gpu_default_model_pieces.sh - carry the default model's GGUF (SmolLM2-135M-Instruct Q4_1,
# 94 MiB) to the offline GPU host, which takes at most 64 MiB per device call (the kit in
# .gpu/ alone is ~44 MB of that). The GGUF travels in pieces over consecutive calls to one
# warm machine: piece k lies in the git-ignored folder .gpu_part<k>/, named in the carry of
# exactly one call (an ignored folder that a later call does not carry stays on the warm host).
#
#   here: bash scripts/gpu_default_model_pieces.sh split 22 60   # MB of pieces 1..n-1; the
#         # last piece takes the rest -> .gpu_part1/ .gpu_part2/ .gpu_part3/
#         # (SRC=FILE splits FILE instead of the default model's GGUF)
#   host: bash scripts/gpu_default_model_pieces.sh join          # (gpu_common.sh does this)
#         # -> $SGLANG_SEMIPD_CACHE/gguf/<GGUF>, once every piece is there; the server checks
#         # the file's sha256 before it converts it (sglang_semipd.default_model.find_gguf)
set -euo pipefail
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    shift
    src=${SRC:-$(python3 -c "from sglang_semipd.default_model import find_gguf; print(find_gguf())")}
    rm -rf .gpu_part*/
    total=$(stat -c %s "$src"); offset=0; k=0
    for mb in "$@" rest; do
      k=$((k + 1)); mkdir -p ".gpu_part$k"
      if [ "$mb" = rest ]; then count=$((total - offset)); else count=$((mb * 1000000)); fi
      dd if="$src" of=".gpu_part$k/$NAME.part$k" bs=1M iflag=skip_bytes,count_bytes \
         skip="$offset" count="$count" status=none
      offset=$((offset + count))
    done
    echo "$k" > .gpu_part1/pieces
    ls -l .gpu_part*/ ;;
  join)
    dest="${SGLANG_SEMIPD_CACHE:?set SGLANG_SEMIPD_CACHE}/gguf/$NAME"
    [ -f "$dest" ] && { echo "already joined: $dest"; exit 0; }
    n=$(cat .gpu_part1/pieces 2>/dev/null) || { echo "no .gpu_part1/pieces"; exit 1; }
    for k in $(seq 1 "$n"); do
      [ -f ".gpu_part$k/$NAME.part$k" ] || { echo "piece $k of $n not on this host yet"; exit 1; }
    done
    mkdir -p "$(dirname "$dest")"
    for k in $(seq 1 "$n"); do cat ".gpu_part$k/$NAME.part$k"; done > "$dest.tmp"
    mv "$dest.tmp" "$dest"; echo "joined $n pieces: $dest ($(stat -c %s "$dest") bytes)" ;;
  *) echo "usage: $0 split MB... | join" >&2; exit 2 ;;
esac
