"""Where a semi-PD run spent its GPU time: per phase (the prefill and the decode worker), the
iteration count and times, and how the busy time divides among the SM splits, from the
scheduler's trace (``SGLANG_SEMIPD_TRACE``: one record per worker iteration and resize).

``benchmark.compare`` traces every semi-PD server it starts, notes each run's time window
and writes ``profile_<server>.json`` ({run file stem: profile}); ``benchmark.details`` puts
each profile next to its run's latencies. Times in the trace and the windows are
``time.monotonic()`` of one host.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

ROLES = ("prefill", "decode")
# Per-split speeds compare like with like: prefill iterations of at least this many new tokens
# (smaller ones are launch-bound), per 1,024 tokens; decode steps of at least this batch.
PREFILL_MIN_TOKENS = 1024
DECODE_MIN_BATCH = 32


def _split_name(split: int, splits: Optional[Sequence[Sequence[int]]]) -> str:
    if splits is not None and 0 <= split < len(splits):
        prefill, decode = splits[split]
        return f"{prefill}/{decode}"
    return f"split {split}"


def profile_window(rows: Sequence[Mapping[str, Any]], t0: float, t1: float,
                   splits: Optional[Sequence[Sequence[int]]] = None) -> dict[str, Any]:
    """Profile of the trace ``rows`` whose iterations started in ``[t0, t1)``.

    Per role: ``iterations``, ``busy_s`` (sum of iteration times), ``busy_share`` (of the
    window), ``iteration_ms`` (mean/p50/p99), ``tokens``, ``busy_share_by_split`` (split
    "prefill/decode SMs" -> share of the role's busy time) and ``queued_gap_ms`` (n/p50/p90
    of the idle time from an iteration's end to the role's next start, over the iterations
    that left requests waiting in the worker: time the worker spent outside the GPU while it
    had work) and ``speed_by_split`` (split -> n/p50 of the prefill worker's ms per 1,024
    tokens over its extend iterations of at least ``PREFILL_MIN_TOKENS`` new tokens, resp.
    of the decode worker's step time in ms at a batch of at least ``DECODE_MIN_BATCH``);
    ``resizes``: commands sent in the window."""
    span = max(t1 - t0, 1e-9)
    its = [r for r in rows if r.get("kind") == "iteration" and t0 <= r["start"] < t1]
    out: dict[str, Any] = {"window_s": t1 - t0, "window": [t0, t1]}  # to re-profile a trace
    for role in ROLES:
        mine = [r for r in its if r["role"] == role]
        times = np.asarray([r["end"] - r["start"] for r in mine], dtype=float)
        busy = float(times.sum())
        by_split: dict[str, float] = {}
        for r in mine:
            name = _split_name(r["split"], splits)
            by_split[name] = by_split.get(name, 0.0) + (r["end"] - r["start"])
        out[role] = {
            "iterations": len(mine), "busy_s": busy, "busy_share": busy / span,
            "iteration_ms": ({"mean": float(times.mean() * 1e3),
                              "p50": float(np.percentile(times, 50) * 1e3),
                              "p99": float(np.percentile(times, 99) * 1e3)} if len(mine) else None),
            "tokens": int(sum(r.get("tokens", 0) for r in mine)),
            "busy_share_by_split": {k: v / busy for k, v in sorted(by_split.items())} if busy else {},
            "queued_gap_ms": _queued_gaps(mine),
            "speed_by_split": _speed_by_split(role, mine, splits),
        }
    out["resizes"] = sum(1 for r in rows if r.get("kind") == "resize"
                         and t0 <= r.get("sent_at", -1.0) < t1)
    return out


def _speed_by_split(role: str, its: Sequence[Mapping[str, Any]],
                    splits: Optional[Sequence[Sequence[int]]]) -> dict[str, dict[str, float]]:
    """See :func:`profile_window` (``speed_by_split``); splits without such iterations are
    left out."""
    samples: dict[str, list[float]] = {}
    for r in its:
        if role == "prefill" and r.get("mode") == "extend" \
                and r.get("tokens", 0) >= PREFILL_MIN_TOKENS:
            value = (r["end"] - r["start"]) * 1e3 * 1024 / r["tokens"]
        elif role == "decode" and r.get("mode") == "decode" \
                and r.get("batch_size", 0) >= DECODE_MIN_BATCH:
            value = (r["end"] - r["start"]) * 1e3
        else:
            continue
        samples.setdefault(_split_name(r["split"], splits), []).append(value)
    return {name: {"n": len(v), "p50": float(np.percentile(v, 50))}
            for name, v in sorted(samples.items())}


def _queued_gaps(its: Sequence[Mapping[str, Any]]) -> Optional[dict[str, float]]:
    """n/p50/p90 (ms) of ``next.start - end`` after each iteration with ``queued`` > 0
    (None without one)."""
    its = sorted(its, key=lambda r: r["start"])
    gaps = np.asarray([max(b["start"] - a["end"], 0.0) for a, b in zip(its, its[1:])
                       if a.get("queued", 0) > 0], dtype=float)
    if not len(gaps):
        return None
    return {"n": int(len(gaps)), "p50": float(np.percentile(gaps, 50) * 1e3),
            "p90": float(np.percentile(gaps, 90) * 1e3)}


def main_split(profile: Mapping[str, Any]) -> Optional[str]:
    """The split the decode worker spent most of its busy time on (None without any)."""
    shares = profile.get("decode", {}).get("busy_share_by_split") or {}
    return max(shares, key=shares.get) if shares else None
