"""Event-driven CPU simulator of a semi-PD GPU (prefill + decode workers) for policy tests.

* Prefill: one FCFS server; a request of ``p`` prompt tokens needs
  ``(p * prefill_s_per_token + prefill_overhead_s) * noise`` seconds of *full-GPU* work and
  runs at speed ``x`` (its share), i.e. takes ``work / x``.  A split change re-times the
  request in service.
* Decode: continuous batching; each step lasts
  ``((decode_a_s + decode_per_req_s * batch) / y + decode_b_s) * noise`` (times
  ``1 + interference`` while a prefill runs) and gives every running request one token.  A
  request joins at the next step after its prefill (which produced its first token) and leaves
  after ``output_tokens - 1`` steps.
* ``noise`` is a mean-1 log-normal factor with log-sd ``SimConfig.noise``, drawn per request
  (prefill) and per step (decode).
* Every ``window_s`` the policy gets a :class:`WindowStats` and its decision is applied.  When
  a decision lends an idle side's SMs (``decision.loan``), the simulator calls
  ``policy.reclaim(t)`` the moment that side gets work (an arrival, resp. a finished prefill).
  With ``SimConfig.eager_loan`` (``--eager-loan``) it also calls ``policy.lend("prefill", t)``
  the moment a prefill finishes with nothing queued while requests decode.

Defaults are an 8B model on one H100: 0.1 ms of full-GPU prefill per prompt token, decode
steps of ~20-40 ms at a half share.  Per request: TTFT = first token - arrival, TPOT = (last
token - first token) / (out - 1) (0 for single-token outputs).  The run continues after the
last arrival until everything has finished (or ``drain_s`` has passed; unfinished requests
count as missing their SLOs).
"""

from __future__ import annotations

import csv
import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sglang_semipd.slo.policy import PartitionDecision, PartitionPolicy, SLOTargets, WindowStats

logger = logging.getLogger(__name__)

_INF = math.inf


@dataclass(frozen=True)
class Request:
    """One request: arrival time (s), prompt and output lengths (tokens)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def _lognormal_int(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    mu = math.log(mean) - 0.5 * sigma * sigma
    return min(max(int(round(rng.lognormvariate(mu, sigma))), lo), hi)


def poisson_requests(
    rate: float | Sequence[tuple[float, float]],
    duration_s: float,
    *,
    seed: int = 0,
    prompt_mean: float = 1000.0,
    prompt_sigma: float = 0.5,
    output_mean: float = 200.0,
    output_sigma: float = 1.0,
    max_prompt: int = 8192,
    max_output: int = 2048,
) -> list[Request]:
    """Poisson arrivals with log-normal lengths (defaults ~ the Azure conversation trace).

    ``rate`` is a constant (req/s) or a schedule ``[(start_s, rate), ...]`` of piecewise-constant
    rates (first start should be 0).  Deterministic for a given ``seed``.
    """
    sched = [(0.0, float(rate))] if isinstance(rate, (int, float)) else sorted(rate)
    rng = random.Random(seed)
    out: list[Request] = []
    for k, (start, r) in enumerate(sched):
        end = sched[k + 1][0] if k + 1 < len(sched) else duration_s
        t = start
        while r > 0:
            t += rng.expovariate(r)
            if t >= min(end, duration_s):
                break
            p = _lognormal_int(rng, prompt_mean, prompt_sigma, 1, max_prompt)
            o = _lognormal_int(rng, output_mean, output_sigma, 1, max_output)
            out.append(Request(t, p, o))
    return out


def _parse_ts(text: str) -> float:
    main, _, frac = text.strip().partition(".")
    base = datetime.strptime(main, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_trace_csv(
    path: str | Path, *, rate_scale: float = 1.0, max_requests: int | None = None
) -> list[Request]:
    """Load a ``TIMESTAMP,ContextTokens,GeneratedTokens`` trace (e.g. Azure LLM 2023).

    Arrivals are made relative to the first request and divided by ``rate_scale`` (2.0 replays
    the trace at twice its rate); only the first ``max_requests`` rows are kept if given.
    """
    if rate_scale <= 0:
        raise ValueError("rate_scale must be positive")
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if max_requests is not None and len(rows) >= max_requests:
                break
            rows.append((_parse_ts(row["TIMESTAMP"]), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [Request((t - t0) / rate_scale, max(p, 1), max(o, 1)) for t, p, o in rows]


@dataclass(frozen=True)
class SimConfig:
    """Simulated GPU (defaults: an 8B model on one H100, shares as fractions)."""

    prefill_s_per_token: float = 1.0e-4
    prefill_overhead_s: float = 0.005
    decode_a_s: float = 0.006
    decode_per_req_s: float = 1.5e-4
    decode_b_s: float = 0.008
    interference: float = 0.0
    noise: float = 0.05
    window_s: float = 1.0
    seed: int = 0
    drain_s: float = 600.0
    keep_decisions: bool = False
    eager_loan: bool = False


@dataclass(frozen=True)
class TimelinePoint:
    """One window: end time, prefill share in force, fraction of the requests completed in
    the window that met both SLOs (None if none completed), completions."""

    t: float
    share: float
    attainment: float | None
    completed: int


@dataclass(frozen=True)
class SimResult:
    """Outcome of :func:`simulate`; per-request lists are in request order (nan: unfinished)."""

    timeline: tuple[TimelinePoint, ...]
    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    n_requests: int
    n_completed: int
    n_changes: int
    decisions: tuple[PartitionDecision, ...]

    @property
    def shares(self) -> list[float]:
        """Prefill share in force in each window."""
        return [p.share for p in self.timeline]


class _Sim:
    """Mutable simulator state; see the module docstring."""

    def __init__(self, reqs: Sequence[Request], policy: PartitionPolicy, targets: SLOTargets,
                 cfg: SimConfig) -> None:
        self.reqs = sorted(reqs, key=lambda r: r.arrival_s)
        self.policy, self.targets, self.cfg = policy, targets, cfg
        self.rng = random.Random(cfg.seed)
        self.x = policy.share
        n = len(self.reqs)
        self.first_tok = [_INF] * n
        self.ttft = [math.nan] * n
        self.tpot = [math.nan] * n
        self.pf_queue: deque[int] = deque()
        self.pf_waiting_tokens = 0
        self.pf_cur, self.pf_finish, self.pf_start, self.pf_clean = -1, _INF, 0.0, True
        self.active: list[tuple[int, int]] = []
        self.pending: list[int] = []
        self.steps, self.dec_end, self.dec_start, self.dec_y, self.dec_batch = 0, _INF, 0.0, 0.0, 0
        self.timeline: list[TimelinePoint] = []
        self.decisions: list[PartitionDecision] = []
        self.n_changes = 0
        self.loan: str | None = None
        self._reset_window()

    def _noise(self) -> float:
        s = self.cfg.noise
        return self.rng.lognormvariate(-0.5 * s * s, s) if s > 0 else 1.0

    def _reset_window(self) -> None:
        self.w_arrivals = 0
        self.w_ttfts: list[float] = []
        self.w_tpots: list[float] = []
        self.w_met = 0
        self.w_pf = [0.0, 0]
        self.w_dec = [0.0, 0, 0]

    # ---------------------------------------------------------------- prefill
    def _pf_start_next(self, now: float) -> None:
        if not self.pf_queue:
            self.pf_cur, self.pf_finish = -1, _INF
            return
        rid = self.pf_queue.popleft()
        self.pf_waiting_tokens -= self.reqs[rid].prompt_tokens
        c = self.cfg
        work = (self.reqs[rid].prompt_tokens * c.prefill_s_per_token + c.prefill_overhead_s)
        self.pf_cur, self.pf_start, self.pf_clean = rid, now, True
        self.pf_finish = now + work * self._noise() / self.x

    def _take(self, decision: PartitionDecision, now: float) -> None:
        """Apply a policy decision: its loan and its share (kept when asked)."""
        if self.cfg.keep_decisions:
            self.decisions.append(decision)
        self.loan = decision.loan
        if abs(decision.share - self.x) > 1e-12:
            self._set_share(decision.share, now)

    def _reclaim_if(self, side: str, now: float) -> None:
        if self.loan == side:
            self._take(self.policy.reclaim(now), now)

    def _arrive(self, rid: int, now: float) -> None:
        self._reclaim_if("prefill", now)
        self.w_arrivals += 1
        self.pf_queue.append(rid)
        self.pf_waiting_tokens += self.reqs[rid].prompt_tokens
        if self.pf_cur < 0:
            self._pf_start_next(now)

    def _pf_done(self, now: float) -> None:
        rid = self.pf_cur
        self.first_tok[rid] = now
        ttft = now - self.reqs[rid].arrival_s
        self.ttft[rid] = ttft
        self.w_ttfts.append(ttft)
        if self.pf_clean:
            self.w_pf[0] += now - self.pf_start
            self.w_pf[1] += 1
        if self.reqs[rid].output_tokens > 1:
            self._reclaim_if("decode", now)
            self.pending.append(rid)
            if self.dec_end == _INF:
                self._dec_start_step(now)
        else:
            self._complete(rid, 0.0)
        self._pf_start_next(now)
        if self.cfg.eager_loan and self.pf_cur < 0 and self.loan is None and (
                self.active or self.pending):
            self._take(self.policy.lend("prefill", now), now)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- decode
    def _dec_start_step(self, now: float) -> None:
        for rid in self.pending:
            heapq.heappush(self.active, (self.steps + self.reqs[rid].output_tokens - 1, rid))
        self.pending.clear()
        c, y = self.cfg, 1.0 - self.x
        dur = ((c.decode_a_s + c.decode_per_req_s * len(self.active)) / y + c.decode_b_s)
        if self.pf_cur >= 0:
            dur *= 1.0 + c.interference
        self.dec_start, self.dec_y, self.dec_batch = now, y, len(self.active)
        self.dec_end = now + dur * self._noise()

    def _dec_end_step(self, now: float) -> None:
        self.steps += 1
        if abs(self.dec_y - (1.0 - self.x)) < 1e-12:
            self.w_dec[0] += now - self.dec_start
            self.w_dec[1] += 1
            self.w_dec[2] += self.dec_batch
        active = self.active
        while active and active[0][0] <= self.steps:
            _, rid = heapq.heappop(active)
            self._complete(rid, (now - self.first_tok[rid]) / (self.reqs[rid].output_tokens - 1))
        if active or self.pending:
            self._dec_start_step(now)
        else:
            self.dec_end = _INF

    def _complete(self, rid: int, tpot: float) -> None:
        self.tpot[rid] = tpot
        self.w_tpots.append(tpot)
        if self.targets.met(self.ttft[rid], tpot):
            self.w_met += 1

    # ---------------------------------------------------------------- control
    def _window(self, now: float) -> None:
        c = self.cfg
        stats = WindowStats(
            t=now, window_s=c.window_s, share=self.x, ttfts=tuple(self.w_ttfts),
            tpots=tuple(self.w_tpots), arrivals=self.w_arrivals,
            prefill_queue_len=len(self.pf_queue) + (self.pf_cur >= 0),
            prefill_tokens_waiting=self.pf_waiting_tokens,
            decode_batch_size=len(self.active) + len(self.pending),
            prefill_iter_time_s=self.w_pf[0] / self.w_pf[1] if self.w_pf[1] else None,
            prefill_iters=self.w_pf[1],
            decode_iter_time_s=self.w_dec[0] / self.w_dec[1] if self.w_dec[1] else None,
            decode_iters=self.w_dec[1],
            decode_iter_batch=self.w_dec[2] / self.w_dec[1] if self.w_dec[1] else None,
            prefill_idle=self.pf_cur < 0 and not self.pf_queue,
            decode_idle=self.dec_end == _INF and not self.pending,
        )
        done = len(self.w_tpots)
        self.timeline.append(TimelinePoint(now, self.x, self.w_met / done if done else None, done))
        self._take(self.policy.observe(stats), now)
        self._reset_window()

    def _set_share(self, share: float, now: float) -> None:
        if not 0.0 < share < 1.0:
            raise ValueError(f"policy returned invalid share {share}")
        if self.pf_cur >= 0:
            self.pf_finish = now + (self.pf_finish - now) * self.x / share
            self.pf_clean = False
        self.x = share
        self.n_changes += 1

    def run(self) -> None:
        reqs, n = self.reqs, len(self.reqs)
        i, t_win = 0, self.cfg.window_s
        limit = (reqs[-1].arrival_s if reqs else 0.0) + self.cfg.drain_s
        n_done = 0
        while True:
            t_arr = reqs[i].arrival_s if i < n else _INF
            t_ev = min(t_arr, self.pf_finish, self.dec_end)
            if t_win <= t_ev:
                self._window(t_win)
                n_done += self.timeline[-1].completed
                if (i >= n and n_done >= n) or t_win >= limit:
                    return
                t_win += self.cfg.window_s
            elif t_arr == t_ev:
                self._arrive(i, t_arr)
                i += 1
            elif self.pf_finish == t_ev:
                self._pf_done(t_ev)
            else:
                self._dec_end_step(t_ev)


def simulate(
    requests: Sequence[Request],
    policy: PartitionPolicy,
    targets: SLOTargets,
    config: SimConfig | None = None,
) -> SimResult:
    """Run ``requests`` through the simulated GPU under ``policy``; see the module docstring."""
    sim = _Sim(requests, policy, targets, config or SimConfig())
    sim.run()
    n = len(sim.reqs)
    ok_t = sum(1 for v in sim.ttft if v <= targets.ttft_s)
    ok_d = sum(1 for v in sim.tpot if v <= targets.tpot_s)
    ok = sum(1 for a, b in zip(sim.ttft, sim.tpot) if targets.met(a, b))
    done = sum(1 for v in sim.tpot if not math.isnan(v))
    den = max(n, 1)
    res = SimResult(tuple(sim.timeline), tuple(sim.ttft), tuple(sim.tpot), ok / den, ok_t / den,
                    ok_d / den, n, done, sim.n_changes, tuple(sim.decisions))
    logger.info("simulated %d requests (%d completed): attainment %.3f (ttft %.3f, tpot %.3f), "
                "%d split changes", n, done, res.attainment, res.ttft_attainment,
                res.tpot_attainment, res.n_changes)
    return res
