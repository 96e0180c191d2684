"""SLO-aware SM-partition policy for semi-PD (prefill/decode sharing one GPU).

Each scheduling window the caller hands :meth:`SLOPolicy.observe` a :class:`WindowStats`
and applies the returned :attr:`PartitionDecision.share` (the prefill share; decode gets
``1 - share``).  Decision rule, in order:

1. **Target** - the latency model predicts, for every allowed share, P(TTFT <= target) and
   P(TPOT <= target); the target maximises their product (the predicted fraction meeting both
   SLOs).  If one SLO is hopeless at every split (best predicted attainment below
   ``hopeless_below``) while the other can reach the attainment target, the policy switches to
   *keep* mode: it keeps the feasible SLO at its target and only moves for it (or for a real
   attainment gain of the other), instead of chasing the infeasible one.
2. **Settling** - the base split does not move on no data: not before ``settle_s`` of traffic
   (the first window with an arrival or a TTFT starts the clock; by the end of it the
   server's warm-up requests, slow with kernel compilation, have left the measure window)
   and not while the measure window holds fewer than ``min_samples`` TTFTs. On the H100 a
   fresh server moved from 72/60 to 104/28 SMs in its first second on the model's prior alone
   and one warm-up TTFT of 0.66 s, and stayed there under light load (no later gain passed
   the hysteresis), with decode's TPOT about twice stock SGLang's.
3. **Hysteresis / steps / dwell** - the SLO-chosen *base* split moves only for a predicted
   gain above ``hysteresis`` attainment points (or when the kept SLO is predicted to fail, or
   when a **measured miss** agrees with the target: one SLO's windowed P90 misses its target,
   the target split gives that phase more SMs, and the other SLO is met now and predicted met
   with margin there), by at most ``max_step`` share per decision, and never reverses
   direction within ``min_dwell_s`` of its previous change (so no A->B->A flapping inside the
   dwell time). The measured-miss rule is from the H100 benchmark: on ShareGPT at 8 req/s the
   model predicted 0.92-0.97 attainment at 72/60 SMs and a gain of 0.014-0.017 at 104/28, under
   the 0.02 margin, for five windows in which the measured TTFT P90 was 0.41-0.50 s against a
   0.3 s target and the TPOT P90 9-10 ms against 150 ms; the policy held, and the run missed.
4. **Idle side** - if one side has nothing queued or running at ``idle_windows`` consecutive
   window ends and the other has work, the busy side borrows (most of) the SMs: the extreme
   allowed share, or ``loan_shares`` (lent to decode, lent to prefill) when given (splits kept
   for loans only, e.g. leaving the idle side one 8-SM group), flagged as a *loan* in the
   decision.  The caller must call :meth:`SLOPolicy.reclaim` as soon as the idle side gets
   work, which restores the base split at once.  Loans bypass dwell/steps and do not move the
   base split.  :meth:`SLOPolicy.lend` starts a loan at once, between windows (an *eager*
   loan: the caller saw the side idle now, not for a whole window); window decisions keep it
   until it is reclaimed, while the base split goes on moving under it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from sglang_semipd.slo.model import CandidatePrediction, LatencyModel, quantile

logger = logging.getLogger(__name__)

DEFAULT_SHARES: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_EPS = 1e-9


@dataclass(frozen=True)
class SLOTargets:
    """Latency SLOs (seconds) and the fraction of requests that should meet both."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or not 0.0 < self.attainment <= 1.0:
            raise ValueError(f"invalid SLO targets: {self}")

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        """Whether one request with these latencies meets both SLOs."""
        return ttft_s <= self.ttft_s and tpot_s <= self.tpot_s


@dataclass(frozen=True)
class WindowStats:
    """What the scheduler measured over one window ending at ``t``.

    ``share`` is the prefill share that was in force; ``ttfts``/``tpots`` are per-request
    values of requests whose first token / last token came in the window.  Iteration times are
    means over the ``*_iters`` iterations that ran entirely at ``share`` (None when there were
    none); ``prefill_iter_requests`` is the mean number of requests per prefill iteration and
    ``decode_iter_batch`` the mean running batch of the timed decode iterations (defaults to
    ``decode_batch_size``, the batch at ``t``).  A side is ``idle`` when it has nothing queued
    or running at ``t``.
    """

    t: float
    window_s: float
    share: float
    ttfts: tuple[float, ...] = ()
    tpots: tuple[float, ...] = ()
    arrivals: int = 0
    arrival_rate: float | None = None
    prefill_queue_len: int = 0
    prefill_tokens_waiting: int = 0
    decode_batch_size: int = 0
    prefill_iter_time_s: float | None = None
    prefill_iter_requests: float = 1.0
    prefill_iters: int = 0
    decode_iter_time_s: float | None = None
    decode_iters: int = 0
    decode_iter_batch: float | None = None
    prefill_idle: bool = False
    decode_idle: bool = False

    @property
    def rate(self) -> float:
        """Arrival rate over the window (req/s)."""
        if self.arrival_rate is not None:
            return self.arrival_rate
        return self.arrivals / self.window_s if self.window_s > 0 else 0.0

    @property
    def decode_batch_mean(self) -> float:
        """Mean batch of the timed decode iterations (falls back to the batch at ``t``)."""
        return float(self.decode_batch_size if self.decode_iter_batch is None
                     else self.decode_iter_batch)


@dataclass(frozen=True)
class PartitionDecision:
    """One policy decision.  ``share`` is the prefill share to apply next.

    ``target_share`` is the unconstrained best split, ``mode`` one of ``joint``,
    ``keep-ttft``, ``keep-tpot``, ``idle-prefill``/``idle-decode`` (loans), ``reclaim``,
    ``eager-loan``/``eager-reclaim`` (:meth:`SLOPolicy.lend` and its end), ``hold``,
    ``static``; ``predictions`` covers every allowed share; ``inputs`` summarises
    the measurements and fitted parameters behind the decision.  While ``loan`` names a side,
    the caller must call ``reclaim()`` as soon as that side has work again.
    """

    t: float
    share: float
    previous_share: float
    target_share: float
    mode: str
    reason: str
    predictions: tuple[CandidatePrediction, ...] = ()
    inputs: Mapping[str, float] = field(default_factory=dict)
    loan: str | None = None  # "prefill"/"decode": that idle side's SMs are lent out
    base_share: float | None = None  # SLO-chosen split (differs from share only on loan)
    split: int | None = None  # a planned split by index, overriding ``share`` (burst moves)

    @property
    def base(self) -> float:
        """The SLO-chosen split (``share`` unless a loan is in force)."""
        return self.share if self.base_share is None else self.base_share

    @property
    def changed(self) -> bool:
        """Whether this decision moves the split."""
        return abs(self.share - self.previous_share) > _EPS

    def prediction(self, share: float) -> CandidatePrediction | None:
        """The prediction for ``share`` (None if not evaluated)."""
        for p in self.predictions:
            if abs(p.share - share) < _EPS:
                return p
        return None


class PartitionPolicy(Protocol):
    """Interface shared by :class:`SLOPolicy` and :class:`StaticPolicy`."""

    @property
    def share(self) -> float: ...

    def observe(self, stats: WindowStats) -> PartitionDecision: ...

    def reclaim(self, t: float) -> PartitionDecision: ...


class StaticPolicy:
    """A fixed split (baseline): always returns ``share``."""

    def __init__(self, share: float) -> None:
        if not 0.0 < share < 1.0:
            raise ValueError("share must be in (0, 1)")
        self._share = share

    @property
    def share(self) -> float:
        """The (fixed) prefill share."""
        return self._share

    def observe(self, stats: WindowStats) -> PartitionDecision:
        """Never moves."""
        logger.debug("static split %.2f at t=%.2f", self._share, stats.t)
        return self.reclaim(stats.t)

    def reclaim(self, t: float) -> PartitionDecision:
        """The fixed split (nothing is ever lent)."""
        return PartitionDecision(t, self._share, self._share, self._share, "static", "static")


class _Record(NamedTuple):
    """One window's inputs kept for the windowed estimates (``tag``: prefill share or nan)."""

    t: float
    span: float
    tag: float
    ttfts: tuple[float, ...]
    tpots: tuple[float, ...]
    arrivals: float
    l_sum: float
    n_pf: int
    tokens: float


class SLOPolicy:
    """SLO-aware split chooser; see the module docstring for the rule.

    ``measure_window_s`` is the span of per-request samples behind the windowed P90s,
    ``min_dwell_s`` the minimum time between a change and a change in the opposite direction,
    ``hysteresis`` the required
    predicted gain in attainment points, ``max_step`` the largest move per decision.  An SLO
    whose best predicted attainment over all splits is below ``hopeless_below`` counts as
    infeasible (keep mode); ``idle_windows`` consecutive idle window ends trigger a loan.
    ``settle_s`` (default ``measure_window_s``) and ``min_samples`` gate every base move
    (module docstring, step 2); 0 for both turns the gate off. ``loan_shares``: the shares
    of a loan to decode and of a loan to prefill (default: the extreme allowed shares); they
    are never a base split.
    """

    def __init__(
        self,
        targets: SLOTargets,
        allowed_shares: Sequence[float] = DEFAULT_SHARES,
        *,
        initial_share: float | None = None,
        model: LatencyModel | None = None,
        measure_window_s: float = 10.0,
        min_dwell_s: float = 5.0,
        hysteresis: float = 0.02,
        max_step: float = 0.1,
        idle_windows: int = 1,
        use_idle: bool = True,
        min_samples: int = 3,
        hopeless_below: float = 0.5,
        settle_s: float | None = None,
        loan_shares: tuple[float, float] | None = None,
    ) -> None:
        self.targets = targets
        self.shares = tuple(sorted(set(float(x) for x in allowed_shares)))
        if not self.shares or self.shares[0] <= 0.0 or self.shares[-1] >= 1.0:
            raise ValueError("allowed shares must be a non-empty list inside (0, 1)")
        lo, hi = (self.shares[0], self.shares[-1]) if loan_shares is None else loan_shares
        if not 0.0 < lo <= self.shares[0] or not self.shares[-1] <= hi < 1.0:
            raise ValueError(f"loan shares {loan_shares} must lie in (0, 1), outside the "
                             f"allowed shares {self.shares}")
        self.loan_shares = (float(lo), float(hi))
        self.model = model or LatencyModel()
        self.measure_window_s = measure_window_s
        self.min_dwell_s = min_dwell_s
        self.hysteresis = hysteresis
        self.max_step = max(max_step, _EPS)
        self.idle_windows = max(1, idle_windows)
        self.use_idle = use_idle
        self.min_samples = min_samples
        self.hopeless_below = hopeless_below
        self.settle_s = measure_window_s if settle_s is None else settle_s
        self._traffic_since: float | None = None  # t of the first window with traffic
        self._base = self._snap(0.5 if initial_share is None else initial_share)
        self._share = self._base
        self._last_change_t = -math.inf
        self._last_dir = 0
        self._idle_streak = {"prefill": 0, "decode": 0}
        self._loan: str | None = None
        self._eager = False  # the loan in force was started by lend(), not by a window
        self._recent: deque[_Record] = deque()
        self._prefill_share = self._base
        self._prefill_changed_t = -math.inf

    @property
    def share(self) -> float:
        """The prefill share currently in force (after idle overrides)."""
        return self._share

    @property
    def loan(self) -> str | None:
        """The idle side whose SMs are lent out now (None: no loan)."""
        return self._loan

    @property
    def base_share(self) -> float:
        """The SLO-chosen split (what applies when neither side is idle)."""
        return self._base

    def _snap(self, share: float) -> float:
        return min(self.shares, key=lambda s: (abs(s - share), s))

    # ------------------------------------------------------------------ ingest
    def _record(self, st: WindowStats) -> None:
        """Keep this window's samples; drop windows older than ``measure_window_s``."""
        clean = self._prefill_changed_t <= st.t - st.window_s + _EPS
        has_pf = bool(st.prefill_iter_time_s) and st.prefill_iter_requests > 0
        n_pf = (st.prefill_iters or 1) if has_pf else 0
        l_sum = n_pf * (st.prefill_iter_time_s or 0.0) * st.share / st.prefill_iter_requests
        demand = st.decode_batch_mean / st.decode_iter_time_s if st.decode_iter_time_s else 0.0
        self._recent.append(_Record(
            st.t, st.window_s, self._prefill_share if clean else math.nan, st.ttfts, st.tpots,
            st.rate * st.window_s, l_sum if has_pf else 0.0, n_pf, demand * st.window_s))
        while self._recent[0].t <= st.t - self.measure_window_s:
            self._recent.popleft()

    def _ingest(self, st: WindowStats) -> dict[str, float]:
        """Update measurements and the model; returns the inputs summary for the decision."""
        m, rec = self.model, self._recent
        self._record(st)
        if self._traffic_since is None and (st.ttfts or st.rate > 0):
            self._traffic_since = st.t
        span = sum(r.span for r in rec)
        if span > 0:  # windowed rate, prefill time at full share and decode token demand
            m.observe_rate(sum(r.arrivals for r in rec) / span, smooth=False)
            m.observe_decode_demand(sum(r.tokens for r in rec) / span, smooth=False)
        n_pf = sum(r.n_pf for r in rec)
        if n_pf:
            m.observe_prefill_time(sum(r.l_sum for r in rec) / n_pf, smooth=False)
        same = [v for r in rec if abs(r.tag - self._prefill_share) < _EPS for v in r.ttfts]
        tpots = [v for r in rec for v in r.tpots]
        ttft_p90 = quantile(same, 0.9)
        if rec[-1].tag == self._prefill_share and st.ttfts and len(same) >= self.min_samples:
            m.observe_ttft(self._prefill_share, ttft_p90, weight=min(1.0, len(same) / 10.0))
        m.observe_ttft_spread(same)
        if st.decode_iter_time_s:
            m.observe_decode_step(1.0 - st.share, st.decode_iter_time_s, st.decode_batch_mean)
        if st.tpots and st.t - self._last_change_t >= self.min_dwell_s:
            m.observe_tpot(1.0 - self._base, tpots)
        ft, fd = m.ttft_fit.fit(), m.tpot_fit.fit()
        return {
            "rate": m.rate or 0.0, "lam": m.lam, "l_full_s": m.l_full_s,
            "decode_demand": m.decode_demand, "ttft_p90_meas": ttft_p90,
            "ttft_samples": float(len(same)),
            "tpot_p90_meas": quantile(tpots, 0.9), "tpot_samples": float(len(tpots)),
            "queue_len": float(st.prefill_queue_len),
            "tokens_waiting": float(st.prefill_tokens_waiting),
            "decode_batch": float(st.decode_batch_size), "ttft_a": ft.a, "ttft_b": ft.b,
            "tpot_a": fd.a, "tpot_c": fd.coef[1], "tpot_b": fd.b,
        }

    # ------------------------------------------------------------------ decide
    def predict(self, queue_len: int = 0) -> tuple[CandidatePrediction, ...]:
        """Current model predictions for every allowed share."""
        tg = self.targets
        return tuple(self.model.predict(s, tg.ttft_s, tg.tpot_s, queue_len) for s in self.shares)

    def _select(self, preds: tuple[CandidatePrediction, ...]) -> tuple[str, CandidatePrediction]:
        """Mode and unconstrained target (see module docstring, step 2)."""
        a, hopeless = self.targets.attainment, self.hopeless_below
        best_t = max(p.p_ttft for p in preds)
        best_d = max(p.p_tpot for p in preds)
        if best_d < hopeless and best_t >= a:
            ok = [p for p in preds if p.p_ttft >= a]
            return "keep-ttft", max(ok, key=lambda p: (round(p.p_tpot, 3), -p.share))
        if best_t < hopeless and best_d >= a:
            ok = [p for p in preds if p.p_tpot >= a]
            return "keep-tpot", max(ok, key=lambda p: (round(p.p_ttft, 3), p.share))
        return "joint", max(preds, key=lambda p: (
            p.attainment + 1e-3 * (p.p_ttft + p.p_tpot), -abs(p.share - self._base)))

    def _worth_moving(
        self, mode: str, cur: CandidatePrediction, tgt: CandidatePrediction
    ) -> tuple[bool, str]:
        """Hysteresis: is the predicted improvement of ``tgt`` over ``cur`` worth a move?"""
        a, h = self.targets.attainment, self.hysteresis
        if mode == "joint":
            gain = tgt.attainment - cur.attainment
            return gain > h, f"predicted attainment {cur.attainment:.3f} -> {tgt.attainment:.3f}"
        keep_ttft = mode == "keep-ttft"
        kept_cur, kept_tgt = (cur.p_ttft, tgt.p_ttft) if keep_ttft else (cur.p_tpot, tgt.p_tpot)
        if kept_cur < a:
            return True, f"{mode}: kept SLO at risk ({kept_cur:.3f} < {a:.2f})"
        if kept_tgt < a + h:
            return False, f"{mode}: target too close to the kept SLO's limit"
        p_cur, p_tgt = (cur.p_tpot, tgt.p_tpot) if keep_ttft else (cur.p_ttft, tgt.p_ttft)
        return p_tgt - p_cur > h, f"{mode}: other SLO's attainment {p_cur:.3f} -> {p_tgt:.3f}"

    def _measured_miss(self, mode: str, meas: Mapping[str, float], tgt: CandidatePrediction
                       ) -> str | None:
        """Why the base split should move towards ``tgt`` although the predicted gain is
        under the hysteresis (step 3): one SLO's measured windowed P90 misses its target,
        ``tgt`` gives that phase more SMs, and the other SLO is met now and predicted met,
        with margin, at ``tgt``. In a keep mode only the kept SLO's miss counts (the other
        is hopeless: chasing it flapped the split in the simulator). None when no such miss."""
        tg, safe = self.targets, self.targets.attainment + self.hysteresis
        need = max(1, self.min_samples)

        def miss(key: str, limit: float) -> bool:
            value = meas.get(f"{key}_p90_meas", math.nan)
            return meas.get(f"{key}_samples", 0.0) >= need and not math.isnan(value) \
                and value > limit

        ttft_miss, tpot_miss = miss("ttft", tg.ttft_s), miss("tpot", tg.tpot_s)
        if mode != "keep-tpot" and tgt.share > self._base and ttft_miss and not tpot_miss \
                and tgt.p_tpot >= safe:
            return (f"measured TTFT P90 {meas['ttft_p90_meas']:.3f}s > {tg.ttft_s:g}s, "
                    f"TPOT predicted met at {tgt.share:.2f}")
        if mode != "keep-ttft" and tgt.share < self._base and tpot_miss and not ttft_miss \
                and tgt.p_ttft >= safe:
            return (f"measured TPOT P90 {meas['tpot_p90_meas']:.4f}s > {tg.tpot_s:g}s, "
                    f"TTFT predicted met at {tgt.share:.2f}")
        return None

    def _step_towards(self, target: float, now: float) -> tuple[float, str]:
        cur = self._base
        direction = 1 if target > cur else -1
        since = now - self._last_change_t
        if direction == -self._last_dir and since < self.min_dwell_s - _EPS:
            return cur, f"hold: reversal within dwell ({since:.1f}s < {self.min_dwell_s:.1f}s)"
        reach = [s for s in self.shares if 0 < (s - cur) * direction <= self.max_step + _EPS
                 and (target - s) * direction >= -_EPS]
        if not reach:  # grid coarser than max_step: one grid step
            i = min(max(self.shares.index(cur) + direction, 0), len(self.shares) - 1)
            reach = [self.shares[i]]
        return max(reach, key=lambda s: abs(s - cur)), "move"

    def _idle_override(self, st: WindowStats) -> tuple[str, float] | None:
        self._idle_streak["prefill"] = self._idle_streak["prefill"] + 1 if st.prefill_idle else 0
        self._idle_streak["decode"] = self._idle_streak["decode"] + 1 if st.decode_idle else 0
        if not self.use_idle:
            return None
        p_idle = self._idle_streak["prefill"] >= self.idle_windows
        d_idle = self._idle_streak["decode"] >= self.idle_windows
        if p_idle and not st.decode_idle:
            return "idle-prefill", self._loan_share("prefill")
        if d_idle and not st.prefill_idle:
            return "idle-decode", self._loan_share("decode")
        return None

    def _loan_share(self, side: str) -> float:
        """The split while ``side``'s SMs are lent out (prefill lends: decode's extreme)."""
        return self.loan_shares[0] if side == "prefill" else self.loan_shares[1]

    def observe(self, stats: WindowStats) -> PartitionDecision:
        """Ingest one window's measurements and decide the next split."""
        inputs = self._ingest(stats)
        preds = self.predict(stats.prefill_queue_len)
        prev = self._share
        mode, target, share, reason = self._decide_base(preds, stats.t, inputs)
        idle = self._idle_override(stats)
        loan = None
        if idle is not None:
            mode, share = idle
            loan = mode.removeprefix("idle-")
            reason = f"{mode}: idle side's SMs lent to the busy side (base {self._base:.2f})"
        elif self._eager and self._loan is not None:  # kept until the caller reclaims it
            share, loan = self._share, self._loan
            reason = f"eager loan of the {loan} side kept (base {self._base:.2f}); {reason}"
        self._eager = self._eager and loan is not None and idle is None
        self._apply(share, loan, stats.t)
        decision = PartitionDecision(
            stats.t, share, prev, target, mode, reason, preds, inputs, loan, self._base)
        self._log(decision)
        return decision

    def reclaim(self, t: float) -> PartitionDecision:
        """End an idle loan now (the lent side got work): back to the SLO-chosen split."""
        prev = self._share
        if self._loan is None:
            return PartitionDecision(
                t, prev, prev, self._base, "hold", "nothing lent", base_share=self._base)
        side, eager = self._loan, self._eager
        self._idle_streak[side] = 0
        self._eager = False
        self._apply(self._base, None, t)
        decision = PartitionDecision(
            t, self._base, prev, self._base, "eager-reclaim" if eager else "reclaim",
            f"{side} side has work: loan ended", base_share=self._base)
        self._log(decision, quiet=eager)
        return decision

    def lend(self, side: str, t: float) -> PartitionDecision:
        """Lend the idle ``side``'s SMs to the other one now (an eager loan, module docstring
        step 4); the caller reclaims it as for any loan. No-op (``hold``) while a loan is in
        force."""
        if side not in ("prefill", "decode"):
            raise ValueError(f"no side {side!r}")
        prev = self._share
        if self._loan is not None:
            return PartitionDecision(t, prev, prev, self._base, "hold",
                                     f"the {self._loan} side is lent already",
                                     loan=self._loan, base_share=self._base)
        share = self._loan_share(side)
        self._eager = True
        self._apply(share, side, t)
        decision = PartitionDecision(
            t, share, prev, self._base, "eager-loan",
            f"the {side} side is idle: its SMs lent now (base {self._base:.2f})",
            loan=side, base_share=self._base)
        self._log(decision, quiet=True)
        return decision

    def _apply(self, share: float, loan: str | None, t: float) -> None:
        """Record the applied split and the share that prefill work actually runs at.

        While prefill's SMs are lent out it has no work (it is reclaimed before any runs), so
        prefill keeps experiencing the base share; TTFT samples are only trusted once that has
        been stable for a whole window.
        """
        self._share, self._loan = share, loan
        prefill_share = self._base if loan == "prefill" else share
        if abs(prefill_share - self._prefill_share) > _EPS:
            self._prefill_share, self._prefill_changed_t = prefill_share, t

    def _decide_base(
        self, preds: tuple[CandidatePrediction, ...], now: float, meas: Mapping[str, float]
    ) -> tuple[str, float, float, str]:
        by_share = {p.share: p for p in preds}
        mode, tgt = self._select(preds)
        cur = by_share[self._base]
        if abs(tgt.share - self._base) < _EPS:
            return mode, tgt.share, self._base, f"{mode}: at target"
        settling = self._settling(now)
        if settling:
            return mode, tgt.share, self._base, f"hold ({settling})"
        worth, why = self._worth_moving(mode, cur, tgt)
        if not worth:
            miss = self._measured_miss(mode, meas, tgt)
            if miss is None:
                return mode, tgt.share, self._base, f"hold ({why}, margin {self.hysteresis})"
            why = miss
        nxt, how = self._step_towards(tgt.share, now)
        if abs(nxt - self._base) < _EPS:
            return mode, tgt.share, self._base, f"{how} ({why})"
        self._last_dir = 1 if nxt > self._base else -1
        self._last_change_t = now
        self._base = nxt
        return mode, tgt.share, nxt, f"move towards {tgt.share:.2f} ({why})"

    def _settling(self, now: float) -> str | None:
        """Why the base split may not move yet (None: it may); see step 2."""
        if self._traffic_since is None:
            return "settling: no traffic yet" if self.settle_s > 0 or self.min_samples > 0 \
                else None
        if now - self._traffic_since < self.settle_s - _EPS:
            return f"settling: {now - self._traffic_since:.1f}s of traffic < {self.settle_s:g}s"
        in_window = sum(len(r.ttfts) for r in self._recent)
        if in_window < self.min_samples:
            return f"settling: {in_window} TTFTs in the window < {self.min_samples}"
        return None

    def _log(self, d: PartitionDecision, quiet: bool = False) -> None:
        """INFO for a decision that moves the split, DEBUG otherwise and for ``quiet`` ones
        (eager loans come and go with every request)."""
        level = logging.INFO if d.changed and not quiet else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        cur, new = d.prediction(d.previous_share), d.prediction(d.share)
        fmt = lambda p: "n/a" if p is None else (  # noqa: E731
            f"ttft_p90={p.ttft_p90_s:.3f}s tpot_p90={p.tpot_p90_s:.4f}s att={p.attainment:.3f}")
        inp = " ".join(f"{k}={v:.4g}" for k, v in d.inputs.items())
        logger.log(level, "split %.2f -> %.2f [%s] %s | current: %s | chosen: %s | %s",
                   d.previous_share, d.share, d.mode, d.reason, fmt(cur), fmt(new), inp)
