"""Concrete SM splits from the configured prefill shares (pure arithmetic, no CUDA).

Green contexts take SMs in the driver's granularity (measured on the H100, 132 SMs: asking for
100 gave 104, 66 gave 72, i.e. groups of 8 rounded up). The prefill worker takes the *first*
group of ``cuDevSmResourceSplitByCount`` and the decode worker the *remainder*, so the two
sets are complementary (ARCHITECTURE.md section 3). :func:`plan_splits` turns shares into
such pairs: prefill gets ``ceil(share * total / g) * g`` SMs, decode what is left; shares that
land on the same pair collapse to one. Prefill keeps at least one group, decode at least
:data:`MIN_DECODE_GROUPS`. Prefill's count stays a whole number of groups: when ``total`` is
not one (132 = 16 x 8 + 4), the remainder goes to decode -- a prefill request of 124 is granted
128 and would leave decode 4 SMs.

Why decode keeps three groups: the decode worker captures its CUDA graphs on every planned
split, and on the H100 that capture failed in cuBLAS (``CUBLAS_STATUS_EXECUTION_FAILED`` in
``cublasGemmEx``, Llama-3.1-8B shape) with decode confined to 4 SMs (124/8, the first
``--idle-loan most`` start) and to 12 SMs (120/12, 2026-12-07, at batch 248); 28 SMs (104/28,
three groups and the remainder) has served every benchmark. Two groups (112/20) have not been
tried.

``--burst-unconfined`` adds one split past the planned ones (:func:`with_burst_split`): the
most prefill-heavy split with the prefill worker *unconfined* (an ordinary stream on all SMs,
sharing decode's under MPS as ``--sm-partition none`` does; decode keeps its SMs and graphs of
that split). It has no prefill share of its own: the SLO policy never picks it and
:func:`nearest_split` never returns it; the partition controller moves there while requests
wait too long for their first token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


MIN_DECODE_GROUPS = 3  # the fewest green-context groups a decode worker is left (see above)


class SplitError(ValueError):
    """The requested shares cannot be realised on this GPU."""


@dataclasses.dataclass(frozen=True, order=True)
class SMSplit:
    """One realisable split: ``prefill_sms + decode_sms == total_sms``; ``unconfined``: the
    prefill worker runs on all SMs instead of its ``prefill_sms`` (the burst split)."""

    prefill_sms: int
    decode_sms: int
    share: float  # the configured prefill share it was planned from (first one that maps here)
    unconfined: bool = False

    @property
    def total_sms(self) -> int:
        return self.prefill_sms + self.decode_sms

    @property
    def prefill_fraction(self) -> float:
        """The prefill worker's fraction of the SMs (1.0 on the burst split)."""
        return 1.0 if self.unconfined else self.prefill_sms / self.total_sms

    def describe(self) -> str:
        """``prefill/decode`` SMs, e.g. ``104/28``; the burst split: ``all/28``."""
        return f"{'all' if self.unconfined else self.prefill_sms}/{self.decode_sms}"


def plan_splits(shares: Sequence[float], total_sms: int, granularity: int = 8,
                min_decode_groups: int = MIN_DECODE_GROUPS) -> tuple[SMSplit, ...]:
    """The distinct realisable splits for ``shares``, ordered by prefill SMs. A share that
    would leave decode fewer than ``min_decode_groups`` groups gets the most prefill-heavy
    split that does not (on an H100: 104/28)."""
    if granularity < 1 or min_decode_groups < 1 \
            or total_sms < (1 + min_decode_groups) * granularity:
        raise SplitError(f"{total_sms} SMs cannot hold one prefill group and "
                         f"{min_decode_groups} decode groups of {granularity}")
    most_prefill = (total_sms - min_decode_groups * granularity) // granularity * granularity
    out: dict[int, SMSplit] = {}
    for share in sorted(shares):
        if not 0.0 < share < 1.0:
            raise SplitError(f"prefill share {share} outside (0, 1)")
        prefill = math.ceil(share * total_sms / granularity) * granularity
        prefill = min(max(prefill, granularity), most_prefill)
        out.setdefault(prefill, SMSplit(prefill, total_sms - prefill, share))
    return tuple(sorted(out.values()))


def with_burst_split(splits: Sequence[SMSplit]) -> tuple[SMSplit, ...]:
    """``splits`` (planned, ordered by prefill SMs) plus the burst split after them: the most
    prefill-heavy one with its prefill worker unconfined."""
    if not splits or any(s.unconfined for s in splits):
        raise SplitError("the burst split goes once after the planned splits")
    top = splits[-1]
    return (*splits, dataclasses.replace(top, share=1.0, unconfined=True))


def burst_index(splits: Sequence[SMSplit]) -> int | None:
    """Index of the burst split in ``splits`` (None without one)."""
    return next((i for i, s in enumerate(splits) if s.unconfined), None)


def check_grant(role: str, split: SMSplit, granted: int, granularity: int = 8) -> None:
    """Raise :class:`SplitError` when the driver granted ``role`` fewer SMs for ``split`` than
    :func:`plan_splits` leaves it: one group for prefill, :data:`MIN_DECODE_GROUPS` groups for
    decode (a decode worker confined to fewer failed its decode-graph capture in cuBLAS on the
    H100)."""
    groups = MIN_DECODE_GROUPS if role == "decode" else 1
    if granted < groups * granularity:
        raise SplitError(f"{role} split {split.prefill_sms}/{split.decode_sms}: the driver "
                         f"granted {granted} SMs, fewer than {groups} group(s) of "
                         f"{granularity}; plan_splits should not have planned it")


def nearest_split(splits: Sequence[SMSplit], share: float) -> int:
    """Index of the planned split whose prefill fraction is closest to ``share`` (ties: fewer
    SMs); never the burst split."""
    confined = [i for i, s in enumerate(splits) if not s.unconfined]
    if not confined:
        raise SplitError("no splits planned")
    return min(confined,
               key=lambda i: (abs(splits[i].prefill_fraction - share), splits[i].prefill_sms))


def loan_and_base_fractions(splits: Sequence[SMSplit], base_shares: Sequence[float],
                            lend_most: bool, granularity: int = 8
                            ) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """(loan fractions, base fractions) for the partition controller from the planned
    ``splits`` (prefill fraction ``p / (p + d)`` each).

    Without ``lend_most`` (``--idle-loan splits``): ``((), None)``, the controller's default
    (loans go to the extreme base splits). With it (``--idle-loan most``) the loans go to the
    extreme planned splits and the base splits are those ``base_shares`` (``--sm-splits``)
    plan to; a loan split that is also a base split stays a base split (on an H100 the loan to
    prefill, 104/28, is the top base split, since decode keeps :data:`MIN_DECODE_GROUPS`).
    A burst split is left out of both."""
    splits = [s for s in splits if not s.unconfined]
    if not lend_most or not splits:
        return (), None
    fractions = [s.prefill_sms / s.total_sms for s in splits]
    planned = {s.prefill_sms for s in plan_splits(base_shares, splits[0].total_sms,
                                                  granularity)}
    base = tuple(f for s, f in zip(splits, fractions) if s.prefill_sms in planned)
    if len(base) == len(fractions):
        return (), None
    return (fractions[0], fractions[-1]), base
