"""Latency model for the SLO-aware SM partitioner (semi-PD, arXiv 2504.19867, Alg. 1).

Shares are fractions of the GPU's SMs in ``(0, 1)``; ``x`` is the prefill share and
``y = 1 - x`` the decode share (the paper writes them in percent; the forms are the same).

* TTFT (P90) at prefill share ``x`` follows an M/M/1-style queue::

      TTFT_x = a1 * l / (x - lam) + b1,      lam = r * l

  with ``r`` the arrival rate (req/s) and ``l`` the measured prefill time of one request at
  full share (s).  The paper's ``a1 / (x - lam) + b1`` is this model with ``l`` folded into
  ``a1``; keeping ``l`` explicit makes ``a1`` dimensionless (~ln 10 for an M/M/1 P90), so the
  fit survives prompt-length drift.  A standing backlog adds a drain-time floor.
* Decode step time at decode share ``y`` is the paper's ``a2 / y + b2`` plus a batch term,
  ``(a2 + c2 * batch) / y + b2``; TPOT P90 is that times a tail ratio calibrated online at the
  operating point (a request's TPOT is its mean step time).

For fixed ``lam`` (resp. batch) both are linear in the coefficients, with regressors
``(l / (x - lam), 1)`` and ``(1 / y, batch / y, 1)``; :class:`OnlineLinearFit` solves a
weighted, prior-regularised least-squares problem in closed form over a bounded window.  With
no data it returns the priors; with a single distinct share it matches the data's level and
keeps the priors' proportions (the split between terms is not identifiable from one share).
Attainment at a share is ``P(latency <= target)`` under a log-normal with the predicted P90
and an online-estimated spread.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Z90 = 1.2815515655446004
"""Standard-normal 0.9 quantile."""


@dataclass(frozen=True)
class LinearFit:
    """Result of fitting ``y = sum_j coef[j] * phi[j]`` (for TTFT ``phi = (u, 1)``).

    ``identified`` is False when the first regressor (the share-dependent one) took fewer than
    ``min_distinct`` distinct values, i.e. how the level splits between the coefficients comes
    from the priors, not from the data.
    """

    coef: tuple[float, ...]
    n: int
    distinct: int
    identified: bool

    @property
    def a(self) -> float:
        """Slope (first coefficient)."""
        return self.coef[0]

    @property
    def b(self) -> float:
        """Intercept (last coefficient)."""
        return self.coef[-1]

    def predict(self, phi: Sequence[float]) -> float:
        """Model value at regressors ``phi``."""
        return sum(c * x for c, x in zip(self.coef, phi))


def _solve_linear(m: list[list[float]], r: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a small dense system."""
    k = len(r)
    a = [row[:] + [r[i]] for i, row in enumerate(m)]
    for col in range(k):
        piv = max(range(col, k), key=lambda i: abs(a[i][col]))
        a[col], a[piv] = a[piv], a[col]
        for i in range(col + 1, k):
            f = a[i][col] / a[col][col]
            for j in range(col, k + 1):
                a[i][j] -= f * a[col][j]
    x = [0.0] * k
    for i in range(k - 1, -1, -1):
        x[i] = (a[i][k] - sum(a[i][j] * x[j] for j in range(i + 1, k))) / a[i][i]
    return x


class OnlineLinearFit:
    """Weighted, prior-regularised least squares for ``y = sum_j c_j phi_j`` with all
    ``c_j >= 0`` (closed form; ``phi`` has 2-4 entries, the last usually the constant 1).

    Minimises ``sum_i w_i d^age_i (y_i - c . phi_i)^2 + sum_j P_j (c_j - p_j)^2`` over the
    last ``max_obs`` observations (``d`` = ``decay``, ``age`` = number of later observations).
    ``P_j = prior_weight * T0 * mean(phi_j) / p_j`` with ``T0 = p . mean(phi)``: the prior
    weighs like ``prior_weight`` observations at the data's mean regressors, and a level shift
    forced by data at a single point is shared out in proportion to the prior's terms (so with
    one distinct share the fit keeps the prior's proportions and matches the data's level).
    """

    def __init__(
        self,
        prior: Sequence[float],
        *,
        prior_weight: float = 0.1,
        max_obs: int = 64,
        decay: float = 0.97,
        min_distinct: int = 2,
        distinct_rel_tol: float = 0.02,
    ) -> None:
        if len(prior) < 1 or any(p <= 0 for p in prior):
            raise ValueError("priors must be positive")
        if not 0.0 < decay <= 1.0 or max_obs < 1 or prior_weight <= 0:
            raise ValueError("bad fit parameters")
        self.prior = tuple(float(p) for p in prior)
        self.prior_weight = prior_weight
        self.decay = decay
        self.min_distinct = min_distinct
        self.distinct_rel_tol = distinct_rel_tol
        self._obs: deque[tuple[tuple[float, ...], float, float]] = deque(maxlen=max_obs)
        self._cache: LinearFit | None = None

    def __len__(self) -> int:
        return len(self._obs)

    def add(self, phi: Sequence[float], y: float, weight: float = 1.0) -> None:
        """Add one observation; non-finite, negative or zero-weight input is ignored."""
        vals = tuple(float(v) for v in phi)
        ok = len(vals) == len(self.prior) and all(math.isfinite(v) and v >= 0 for v in vals)
        if not (ok and math.isfinite(y) and weight > 0):
            logger.debug("ignoring observation phi=%r y=%r w=%r", phi, y, weight)
            return
        self._obs.append((vals, float(y), float(weight)))
        self._cache = None

    def clear(self) -> None:
        """Forget all observations."""
        self._obs.clear()
        self._cache = None

    def distinct(self) -> int:
        """Distinct values of the first regressor (relative tolerance ``distinct_rel_tol``)."""
        count, last = 0, -math.inf
        for u in sorted(phi[0] for phi, _, _ in self._obs):
            if u - last > self.distinct_rel_tol * max(abs(u), 1e-12):
                count, last = count + 1, u
        return count

    def fit(self) -> LinearFit:
        """Closed-form fit (cached until the next :meth:`add`)."""
        if self._cache is None:
            self._cache = self._solve()
        return self._cache

    def _moments(self) -> tuple[list[list[float]], list[float], list[float], float]:
        k = len(self.prior)
        xx = [[0.0] * k for _ in range(k)]
        xy, sx = [0.0] * k, [0.0] * k
        s_w, w_age = 0.0, 1.0
        for phi, y, w in reversed(self._obs):
            ww = w * w_age
            s_w += ww
            for i in range(k):
                sx[i] += ww * phi[i]
                xy[i] += ww * phi[i] * y
                for j in range(i, k):
                    xx[i][j] += ww * phi[i] * phi[j]
            w_age *= self.decay
        for i in range(k):
            for j in range(i):
                xx[i][j] = xx[j][i]
        return xx, xy, sx, s_w

    def _solve(self) -> LinearFit:
        n = len(self._obs)
        if n == 0:
            return LinearFit(self.prior, 0, 0, False)
        xx, xy, sx, s_w = self._moments()
        mean = [v / s_w if v > 0 else 1.0 for v in sx]
        t0 = sum(p * m for p, m in zip(self.prior, mean))
        pen = [self.prior_weight * t0 * m / p for p, m in zip(self.prior, mean)]
        free = list(range(len(self.prior)))
        coef = [0.0] * len(self.prior)
        while free:
            m = [[xx[i][j] + (pen[i] if i == j else 0.0) for j in free] for i in free]
            r = [xy[i] + pen[i] * self.prior[i] - sum(xx[i][j] * coef[j] for j in range(len(coef))
                                                     if j not in free) for i in free]
            sol = _solve_linear(m, r)
            if min(sol) >= 0.0:
                for i, v in zip(free, sol):
                    coef[i] = v
                break
            free.pop(min(range(len(sol)), key=lambda i: sol[i]))
        distinct = self.distinct()
        return LinearFit(tuple(coef), n, distinct, distinct >= self.min_distinct)


def lognormal_cdf(x: float, p90: float, sigma: float) -> float:
    """``P(X <= x)`` for a log-normal ``X`` with 0.9-quantile ``p90`` and log-sd ``sigma``."""
    if not math.isfinite(p90):
        return 0.0
    if x <= 0.0 or p90 <= 0.0:
        return 1.0 if p90 <= 0.0 and x >= 0.0 else 0.0
    z = (math.log(x) - math.log(p90)) / max(sigma, 1e-6) + Z90
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def quantile(values: list[float] | tuple[float, ...], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (``nan`` when empty)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def log_spread(values: list[float] | tuple[float, ...]) -> float | None:
    """Log-normal sigma implied by the sample's P90/P50 ratio (None if too few/invalid)."""
    if len(values) < 5:
        return None
    p50, p90 = quantile(values, 0.5), quantile(values, 0.9)
    if p50 <= 0.0 or p90 <= 0.0:
        return None
    return max(math.log(p90 / p50) / Z90, 0.0)


@dataclass(frozen=True)
class CandidatePrediction:
    """Model prediction at one prefill share: P90s (s) and P(latency <= target)."""

    share: float
    ttft_p90_s: float
    tpot_p90_s: float
    p_ttft: float
    p_tpot: float

    @property
    def attainment(self) -> float:
        """Predicted fraction of requests meeting both SLOs (independence assumed)."""
        return self.p_ttft * self.p_tpot


@dataclass(frozen=True)
class ModelPriors:
    """Prior parameters (used until, and blended with, the online fits).

    TTFT P90 = ``ttft_a * l / (x - lam) + ttft_b`` (``ttft_a`` dimensionless, ~ln 10 for an
    M/M/1 P90).  Mean decode step = ``(tpot_a + tpot_c * batch) / y + tpot_b`` (s).  Sigmas are
    log-normal spreads of per-request TTFT/TPOT; ``tpot_tail_ratio`` is TPOT P90 / mean step.
    """

    ttft_a: float = 2.3
    ttft_b: float = 0.02
    tpot_a: float = 0.006
    tpot_c: float = 1.0e-4
    tpot_b: float = 0.008
    l_full_s: float = 0.1
    ttft_sigma: float = 0.6
    tpot_sigma: float = 0.1
    tpot_tail_ratio: float = 1.1
    prior_weight: float = 0.1


class LatencyModel:
    """Online TTFT/TPOT model: smoothed load state plus the two prior-regularised fits.

    Feed it with :meth:`observe_rate`, :meth:`observe_prefill_time`,
    :meth:`observe_decode_demand`, :meth:`observe_ttft`, :meth:`observe_decode_step`,
    :meth:`observe_ttft_spread`, :meth:`observe_tpot`; query with :meth:`predict_ttft_p90`,
    :meth:`predict_tpot_p90` and :meth:`predict` (both SLOs at one share).

    The decode batch at another split follows Little's law: ``batch = D * step`` with ``D`` the
    decode token demand (tokens/s), so ``step(y) = (a/y + b) / (1 - c * D / y)``, unbounded when
    the decode side cannot keep up.
    """

    def __init__(
        self,
        priors: ModelPriors | None = None,
        *,
        max_obs: int = 64,
        decay: float = 0.97,
        ewma_alpha: float = 0.3,
        min_gap: float = 0.02,
    ) -> None:
        self.priors = p = priors or ModelPriors()
        self.ttft_fit = OnlineLinearFit(
            (p.ttft_a, p.ttft_b), prior_weight=p.prior_weight, max_obs=max_obs, decay=decay)
        self.tpot_fit = OnlineLinearFit((p.tpot_a, p.tpot_c, p.tpot_b),
                                        prior_weight=p.prior_weight, max_obs=max_obs, decay=decay)
        self.ewma_alpha = ewma_alpha
        self.min_gap = min_gap
        self.rate: float | None = None
        self.l_full_s: float = p.l_full_s
        self.decode_demand: float = 0.0
        self.ttft_sigma: float = p.ttft_sigma
        self.tpot_sigma: float = p.tpot_sigma
        self.tpot_tail_ratio: float = p.tpot_tail_ratio
        self._have_l = False

    def _smooth(self, old: float | None, new: float, smooth: bool) -> float:
        return new if old is None or not smooth else old + self.ewma_alpha * (new - old)

    @property
    def lam(self) -> float:
        """Prefill load ``r * l``: the share needed just to keep up (0 before any rate)."""
        return (self.rate or 0.0) * self.l_full_s

    def observe_rate(self, rate: float, smooth: bool = True) -> None:
        """Measured arrival rate (req/s); EWMA-smoothed unless ``smooth`` is False."""
        if rate >= 0.0 and math.isfinite(rate):
            self.rate = self._smooth(self.rate, rate, smooth)

    def observe_prefill_time(self, l_full_s: float, smooth: bool = True) -> None:
        """Per-request prefill time normalised to full share (``time * share``)."""
        if l_full_s > 0.0 and math.isfinite(l_full_s):
            self.l_full_s = self._smooth(self.l_full_s if self._have_l else None, l_full_s, smooth)
            self._have_l = True

    def observe_decode_demand(self, tokens_per_s: float, smooth: bool = True) -> None:
        """Decode token throughput demanded (running batch / step time), tokens/s."""
        if tokens_per_s >= 0.0 and math.isfinite(tokens_per_s):
            self.decode_demand = self._smooth(self.decode_demand, tokens_per_s, smooth)

    def ttft_regressor(self, share: float) -> float:
        """``l / (x - lam)``, or ``inf`` when the prefill side is (near) overloaded."""
        gap = share - self.lam
        return self.l_full_s / gap if gap >= self.min_gap else math.inf

    def observe_ttft(self, share: float, ttft_p90_s: float, weight: float = 1.0) -> None:
        """TTFT P90 measured at prefill share ``share`` (skipped when overloaded)."""
        u = self.ttft_regressor(share)
        if math.isfinite(u):
            self.ttft_fit.add((u, 1.0), ttft_p90_s, weight)

    def observe_decode_step(
        self, decode_share: float, step_s: float, batch: float, weight: float = 1.0
    ) -> None:
        """Mean decode step time measured at ``decode_share`` with ``batch`` running requests."""
        if decode_share > 0.0:
            self.tpot_fit.add((1.0 / decode_share, batch / decode_share, 1.0), step_s, weight)

    def observe_ttft_spread(self, ttfts: Sequence[float]) -> None:
        """Update the TTFT log-normal spread from recent samples at one share."""
        s_t = log_spread(list(ttfts))
        if s_t is not None:
            self.ttft_sigma = min(max(self._smooth(self.ttft_sigma, s_t, True), 0.05), 2.0)

    def observe_tpot(self, decode_share: float, tpots: Sequence[float]) -> None:
        """Calibrate TPOT spread and P90 / predicted-step ratio at the operating point."""
        vals = list(tpots)
        s_d = log_spread(vals)
        if s_d is not None:
            self.tpot_sigma = min(max(self._smooth(self.tpot_sigma, s_d, True), 0.02), 1.0)
        step = self.predict_step_s(decode_share)
        if len(vals) >= 3 and 0.0 < step < math.inf:
            ratio = min(max(quantile(vals, 0.9) / step, 0.5), 3.0)
            self.tpot_tail_ratio = self._smooth(self.tpot_tail_ratio, ratio, True)

    def predict_ttft_p90(self, share: float, queue_len: int = 0) -> float:
        """Predicted TTFT P90 (s) at prefill share ``share``; ``inf`` if it cannot keep up.

        Besides the steady-state queue, a standing backlog of ``queue_len`` requests must be
        drained first: the prediction is the larger of the two.
        """
        u = self.ttft_regressor(share)
        if not math.isfinite(u) or share <= 0.0:
            return math.inf
        fit = self.ttft_fit.fit()
        backlog = (queue_len + 1) * self.l_full_s / share + fit.b
        return max(fit.predict((u, 1.0)), backlog)

    def predict_step_s(self, decode_share: float) -> float:
        """Predicted mean decode step (s) at ``decode_share`` under the current demand."""
        if decode_share <= 0.0:
            return math.inf
        a, c, b = self.tpot_fit.fit().coef
        denom = 1.0 - c * self.decode_demand / decode_share
        if denom <= 0.05:
            return math.inf
        return (a / decode_share + b) / denom

    def predict_tpot_p90(self, decode_share: float) -> float:
        """Predicted TPOT P90 (s) at decode share ``decode_share``."""
        return self.predict_step_s(decode_share) * self.tpot_tail_ratio

    def predict(
        self, share: float, ttft_target_s: float, tpot_target_s: float, queue_len: int = 0
    ) -> CandidatePrediction:
        """P90s and attainment probabilities of both SLOs at prefill share ``share``."""
        q_t = self.predict_ttft_p90(share, queue_len)
        q_d = self.predict_tpot_p90(1.0 - share)
        p_t = lognormal_cdf(ttft_target_s, q_t, self.ttft_sigma)
        p_d = lognormal_cdf(tpot_target_s, q_d, self.tpot_sigma)
        return CandidatePrediction(share, q_t, q_d, p_t, p_d)
