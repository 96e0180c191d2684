#!/usr/bin/env python3
"""Make the offline test models (see sglang_semipd.testing.model_maker).

  python scripts/make_test_models.py OUT_DIR                # tiny-f32, tiny-bf16, llama8b, dsv2-lite, tiny-mla
  python scripts/make_test_models.py OUT_DIR --only tiny-f32 --sharegpt
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_semipd.testing.model_maker import make_model, write_sharegpt  # noqa: E402

TARGETS = {  # name -> (preset, dtype)
    "tiny-f32": ("tiny", "float32"),
    "tiny-bf16": ("tiny", "bfloat16"),
    "llama8b": ("llama3.1-8b", "bfloat16"),
    "dsv2-lite": ("deepseek-v2-lite", "bfloat16"),
    "tiny-mla": ("tiny-deepseek-v2", "bfloat16"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sharegpt", action="store_true",
                    help="also write OUT/sharegpt_synth.json (1000 synthetic conversations)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in a.only:
        t = time.time()
        preset, dtype = TARGETS[name]
        path = make_model(a.out / name, preset, dtype, a.seed)
        print(f"{path}  ({preset}, {dtype}, {time.time() - t:.1f}s)")
    if a.sharegpt:
        print(write_sharegpt(a.out / "sharegpt_synth.json", seed=a.seed))


if __name__ == "__main__":
    main()
