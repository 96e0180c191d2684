"""Concrete SM splits from the configured prefill shares (pure arithmetic, no CUDA).

Green contexts take SMs in the driver's granularity (measured on the H100, 132 SMs: asking for
100 gave 104, 66 gave 72, i.e. groups of 8 rounded up). The prefill worker takes the *first*
group of ``cuDevSmResourceSplitByCount`` and the decode worker the *remainder*, so the two
sets are complementary (ARCHITECTURE.md section 3). :func:`plan_splits` turns shares into
such pairs: prefill gets ``ceil(share * total / g) * g`` SMs, decode what is left; shares that
land on the same pair collapse to one, and every side keeps at least one group. Prefill's
count stays a whole number of groups: when ``total`` is not one (132 = 16 x 8 + 4), the
remainder goes to decode -- a prefill request of 124 is granted 128 and would leave decode 4
SMs (on the H100 cuBLAS then failed in decode-graph capture).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


class SplitError(ValueError):
    """The requested shares cannot be realised on this GPU."""


@dataclasses.dataclass(frozen=True, order=True)
class SMSplit:
    """One realisable split: ``prefill_sms + decode_sms == total_sms``."""

    prefill_sms: int
    decode_sms: int
    share: float  # the configured prefill share it was planned from (first one that maps here)

    @property
    def total_sms(self) -> int:
        return self.prefill_sms + self.decode_sms

    @property
    def prefill_fraction(self) -> float:
        return self.prefill_sms / self.total_sms


def plan_splits(shares: Sequence[float], total_sms: int, granularity: int = 8
                ) -> tuple[SMSplit, ...]:
    """The distinct realisable splits for ``shares``, ordered by prefill SMs."""
    if total_sms < 2 * granularity or granularity < 1:
        raise SplitError(f"{total_sms} SMs cannot hold two groups of {granularity}")
    most_prefill = (total_sms - granularity) // granularity * granularity
    out: dict[int, SMSplit] = {}
    for share in sorted(shares):
        if not 0.0 < share < 1.0:
            raise SplitError(f"prefill share {share} outside (0, 1)")
        prefill = math.ceil(share * total_sms / granularity) * granularity
        prefill = min(max(prefill, granularity), most_prefill)
        out.setdefault(prefill, SMSplit(prefill, total_sms - prefill, share))
    return tuple(sorted(out.values()))


def check_grant(role: str, split: SMSplit, granted: int, granularity: int = 8) -> None:
    """Raise :class:`SplitError` when the driver granted ``role`` less than one group for
    ``split`` (a worker confined to fewer SMs than that failed its decode-graph capture in
    cuBLAS on the H100; :func:`plan_splits` does not plan such a split)."""
    if granted < granularity:
        raise SplitError(f"{role} split {split.prefill_sms}/{split.decode_sms}: the driver "
                         f"granted {granted} SMs, less than one group of {granularity}; "
                         "plan_splits should not have planned it")


def nearest_split(splits: Sequence[SMSplit], share: float) -> int:
    """Index of the split whose prefill fraction is closest to ``share`` (ties: fewer SMs)."""
    if not splits:
        raise SplitError("no splits planned")
    return min(range(len(splits)),
               key=lambda i: (abs(splits[i].prefill_fraction - share), splits[i].prefill_sms))
