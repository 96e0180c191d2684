#!/usr/bin/env python3
"""How much a device call would carry: the working tree that travels (tracked files that exist,
untracked files git does not ignore) plus the ignored paths named for ``carry``, against the
device tool's 64 MiB limit.

    python scripts/travel_size.py .gpu            # total, biggest pieces, exit 1 if over
    python scripts/travel_size.py .gpu --top 15

Run it before a device call that carries ``.gpu``: the tracked tree grows with every results
directory, and a call over the limit is refused without running.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

LIMIT_BYTES = 64 * 1024 * 1024


def _git_files(repo: Path, *args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args],
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def _size(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(_size(Path(root) / f) for root, _, files in os.walk(path) for f in files)


def travel_sizes(repo: Path, carry: list[str]) -> dict[str, int]:
    """Bytes per top-level piece that would travel: each first path component of the tree
    (``tree:<name>``) and each carried path (``carry:<path>``)."""
    sizes: dict[str, int] = {}
    files = _git_files(repo) + _git_files(repo, "--others", "--exclude-standard")
    for rel in dict.fromkeys(files):
        key = "tree:" + rel.split("/", 1)[0]
        sizes[key] = sizes.get(key, 0) + _size(repo / rel)
    for rel in carry:
        sizes["carry:" + rel.rstrip("/")] = _size(repo / rel)
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("carry", nargs="*", help="ignored paths the call would carry (e.g. .gpu)")
    ap.add_argument("--repo", type=Path, default=Path.cwd())
    ap.add_argument("--top", type=int, default=8, help="biggest pieces to list")
    a = ap.parse_args(argv)
    sizes = travel_sizes(a.repo, a.carry)
    total = sum(sizes.values())
    for key, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{n / 2**20:8.2f} MiB  {key}")
    verdict = "fits" if total <= LIMIT_BYTES else "OVER the limit: carry less"
    print(f"{total / 2**20:8.2f} MiB  in all (limit {LIMIT_BYTES / 2**20:.0f} MiB): {verdict}")
    return 0 if total <= LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
