"""The scheduler's partition controller: feeds the SLO policy and says when to resize (pure).

The semi-PD scheduler process calls, from its one loop:

* :meth:`PartitionController.on_request` / :meth:`on_abort` for every generation request and
  abort it forwards, :meth:`on_output` for every output batch it forwards to the detokenizer
  (rids, cumulative completion tokens, finished flags) -- per-request TTFT and TPOT come from
  :class:`~sglang_semipd.latency.LatencyTracker`;
* :meth:`on_iteration` for every worker :class:`~sglang_semipd.protocol.IterationStat`;
* :meth:`tick` on every loop pass: once per ``window_s`` it builds a
  :class:`~sglang_semipd.slo.policy.WindowStats` (latencies, queue, arrival rate and the mean
  iteration times at the split in force) and returns the policy's decision.

It also ends an idle loan (``policy.reclaim``) the moment the lent side gets work: a new
request for a lent prefill side; for a lent decode side a hand-off on its way to it
(:meth:`on_handoff`, so that its first step runs on the base split), or else a decode
iteration. ``loan_fractions`` are the two planned splits that loans move to (default: the
extremes of the base splits). ``base_fractions`` are the splits the SLO policy may choose as
its base (default: every planned split but the loan fractions and the burst split); a loan
fraction may be one of them (``--idle-loan most`` when the decode side's extreme is the top
base split). With ``--partition-policy static`` it only measures (the static policy never
moves).

With ``burst_split`` (``--burst-unconfined``) :meth:`tick` also watches, on every loop pass,
the *expected wait* for a first token: how long the oldest request without one has waited, plus
the time the prefill worker needs for every prompt still waiting (their prompt tokens times its
measured seconds per token on the split in question: the mean over its recent extend iterations
of at least ``PREDICT_MIN_TOKENS`` tokens there; unknown until it has run such iterations, and
then the wait alone counts). From ``burst_after_s`` (default half the TTFT target) it moves to
the burst split (the prefill worker unconfined, see :mod:`sglang_semipd.partition.splits`) and
back to the SLO policy's split once the expected wait *on that split* is below
``burst_after_s / 2``, or after ``burst_max_s`` (then not again for as long). So a burst of
long prompts unconfines prefill as it arrives, not once its first prompt has waited half the
target (on the H100, 8B shape, prefill took 37-43 ms per 1,024 tokens on 104 SMs: a queue of
about 4,000 tokens there is 0.15 s). Prompt tokens include cached prefixes, so a queue of
prompts that hit the radix cache is overestimated. Windows that end during a burst are
measured but not judged by the SLO policy, no burst starts during an idle loan, and none under
the static policy. Burst decisions name the split by index (``PartitionDecision.split``).

With ``eager_loan`` (``--eager-loan``) :meth:`tick` lends the prefill side's SMs to decode
(``SLOPolicy.lend``: the policy's loan split) as soon as no request has waited for its first
token for ``eager_after_s`` while requests decode, instead of only after a whole idle window;
the next request takes them back (:meth:`on_request`, as for any loan). Under steady load the
prefill worker is busy a fraction of the time (the H100 benchmark: 14-22% on ShareGPT at
8-32 req/s) while the SLO policy's base split left decode 28 of 132 SMs, and a window with
no idle moment never lends.
No torch, no sockets: the caller applies decisions (``Coordinator.resize_to_share``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Optional, Sequence

from sglang_semipd.latency import LatencyTracker
from sglang_semipd.slo.policy import (PartitionDecision, SLOPolicy, SLOTargets, StaticPolicy,
                                      WindowStats)

logger = logging.getLogger(__name__)

EAGER_AFTER_S = 0.005  # how long the prefill side must have been idle for an eager loan
# An extend iteration of at least this many new tokens times the prefill worker's speed on its
# split (smaller ones are launch-bound: on the H100 one of 36-47 tokens took 17-24 ms).
PREDICT_MIN_TOKENS = 512
SPEED_SMOOTHING = 0.3  # weight of the newest iteration in the seconds-per-token average


class PartitionController:
    """See the module docstring. ``fractions[i]`` is split ``i``'s prefill fraction."""

    def __init__(self, fractions: Sequence[float], start: int, policy: str = "slo",
                 ttft_s: float = 1.0, tpot_s: float = 0.1, attainment: float = 0.9,
                 window_s: float = 1.0, now: float = 0.0, warmup_iters: int = 3,
                 loan_fractions: Sequence[float] = (),
                 base_fractions: Optional[Sequence[float]] = None,
                 burst_split: Optional[int] = None, burst_after_s: Optional[float] = None,
                 burst_max_s: float = 2.0, eager_loan: bool = False,
                 eager_after_s: float = EAGER_AFTER_S, **policy_kwargs: Any) -> None:
        if not fractions or not 0 <= start < len(fractions):
            raise ValueError("need the planned splits and a start split among them")
        self.fractions = tuple(fractions)
        self.loan_fractions = tuple(sorted(loan_fractions))
        if self.loan_fractions and (len(self.loan_fractions) != 2 or not set(
                self.loan_fractions) <= set(self.fractions)):
            raise ValueError(f"loan fractions {loan_fractions}: two of the planned splits")
        bad_burst = ValueError(f"burst split {burst_split}: a planned split that is no base "
                               "split and not the start")
        if burst_split is not None and not 0 <= burst_split < len(self.fractions):
            raise bad_burst
        burst = () if burst_split is None else (self.fractions[burst_split],)
        self.base_fractions = tuple(sorted(
            [f for f in self.fractions if f not in self.loan_fractions and f not in burst]
            if base_fractions is None else base_fractions))
        if not self.base_fractions or not set(self.base_fractions) <= set(self.fractions):
            raise ValueError(f"base fractions {base_fractions}: some of the planned splits")
        if burst and (burst[0] in self.base_fractions or burst_split == start):
            raise bad_burst
        self.burst_split = burst_split
        self.burst_after_s = 0.5 * ttft_s if burst_after_s is None else burst_after_s
        self.burst_max_s = burst_max_s
        if self.burst_after_s <= 0 or burst_max_s <= 0:
            raise ValueError("burst_after_s and burst_max_s must be positive")
        self._burst_from: Optional[int] = None  # the split a burst left (None: no burst)
        self._burst_since = 0.0
        self._burst_calm_until = -math.inf  # no burst before (after one cut at burst_max_s)
        self.bursts = 0
        self.eager_loan = eager_loan
        self.eager_after_s = eager_after_s
        self._prefill_idle_since: Optional[float] = None  # no request waiting since then
        self.eager_loans = 0
        self.prefill_s_per_token: dict[int, float] = {}  # split -> measured prefill speed
        self.split = start
        self.ttft_s, self.tpot_s = ttft_s, tpot_s
        self._targets = SLOTargets(ttft_s, tpot_s, attainment)
        self._policy_kwargs = policy_kwargs
        self.set_policy(policy, start)
        self.attainment: Optional[float] = None  # of the requests finished in the last window
        self.window_s = window_s
        self.latency = LatencyTracker(now)
        self._last_tick = now
        self._iters: list[Any] = []
        self._seen: dict[tuple[str, int], int] = {}
        self._ran: set[str] = set()  # roles that ran an iteration in this window
        self.warmup_iters = warmup_iters
        self.decisions = 0

    def set_policy(self, policy: str, split: Optional[int] = None) -> None:
        """Switch to ``policy`` (``slo`` | ``static``) starting from ``split`` (default: the
        split in force): ``static`` pins that split, ``slo`` starts a fresh SLO policy there
        (its latency model is re-fitted from new windows)."""
        split = self.split if split is None else split
        if not 0 <= split < len(self.fractions):
            raise ValueError(f"no planned split {split}")
        if policy == "slo":
            self.policy: Any = SLOPolicy(
                self._targets, self.base_fractions, initial_share=self.fractions[split],
                loan_shares=self.loan_fractions or None, **self._policy_kwargs)
        elif policy == "static":
            self.policy = StaticPolicy(self.fractions[split])
        else:
            raise ValueError(f"unknown partition policy {policy!r}")
        self.kind = policy
        self._burst_from = None  # a burst in force ends: the caller resizes to ``split``

    # ---------------------------------------------------------------- events
    def on_request(self, rid: str, t: float,
                   prompt_tokens: int = 0) -> Optional[PartitionDecision]:
        self.latency.on_request(rid, t, prompt_tokens)
        return self._reclaim_if_lent("prefill", t)

    def on_handoff(self, t: float, rid: Optional[str] = None) -> Optional[PartitionDecision]:
        """A request (``rid``) is on its way to the decode worker: its first token exists, and
        a decode loan ends now."""
        if rid is not None:
            self.latency.on_first_token(rid, t)
        return self._reclaim_if_lent("decode", t)

    def on_abort(self, rid: str) -> None:
        self.latency.on_abort(rid)

    def on_output(self, rids: Iterable[str], completion_tokens: Iterable[int],
                  finished: Iterable[bool], t: float) -> None:
        self.latency.on_outputs(rids, completion_tokens, finished, t)

    def on_iteration(self, stat: Any) -> Optional[PartitionDecision]:
        """Time an iteration; the first ``warmup_iters`` of each role on each split are not
        timed (they pay for lazy kernel compilation and loading: on the H100 the first
        prefill took 1.08 s against 0.03 s later, and moved the split on its own)."""
        key = (stat.role, stat.split)
        self._ran.add(stat.role)
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] > self.warmup_iters:
            self._iters.append(stat)
            if stat.role == "prefill" and stat.mode == "extend" \
                    and stat.tokens >= PREDICT_MIN_TOKENS and stat.end > stat.start:
                per_token = (stat.end - stat.start) / stat.tokens
                old = self.prefill_s_per_token.get(stat.split)
                self.prefill_s_per_token[stat.split] = per_token if old is None else \
                    old + SPEED_SMOOTHING * (per_token - old)
        if stat.role == "decode":
            return self._reclaim_if_lent("decode", stat.end)
        return None

    def on_resized(self, split: int) -> None:
        """Both workers acknowledged ``split`` (iterations before it are not timed for it)."""
        self.split = split

    # ---------------------------------------------------------------- windows
    def tick(self, t: float) -> Optional[PartitionDecision]:
        """A burst move or an eager loan (any pass), else the policy's decision once per
        ``window_s`` (None in between, and for windows that end during a burst)."""
        burst = self._burst_step(t)
        if burst is not None:
            return burst
        eager = self._eager_step(t)
        if eager is not None:
            return eager
        if t - self._last_tick < self.window_s:
            return None
        self._last_tick = t
        stats = self.window(t)
        if self._burst_from is not None:
            return None
        self.decisions += 1
        return self.policy.observe(stats)

    @property
    def in_burst(self) -> bool:
        return self._burst_from is not None

    def expected_wait(self, t: float, split: int) -> tuple[float, float]:
        """(the oldest wait for a first token, the time to prefill every prompt waiting on
        ``split`` at its measured speed; 0 while unmeasured)."""
        wait = self.latency.oldest_wait(t)
        per_token = self.prefill_s_per_token.get(split)
        queue = self.latency.tokens_waiting * per_token if per_token else 0.0
        return wait, queue

    @property
    def eager_armed(self) -> bool:
        """An eager loan may start within ``eager_after_s`` (``--eager-loan``, the SLO policy,
        no loan or burst in force, requests decoding and none waiting for a first token): the
        caller should tick by then even if no message arrives."""
        return (self.eager_loan and self.kind == "slo" and not self.in_burst
                and self.policy.loan is None and self.latency.decoding > 0
                and not self.latency.waiting_first_token)

    def _eager_step(self, t: float) -> Optional[PartitionDecision]:
        if not self.eager_loan or self.kind != "slo" or self.in_burst:
            return None
        if self.latency.waiting_first_token or not self.latency.decoding:
            self._prefill_idle_since = None
            return None
        if self._prefill_idle_since is None:
            self._prefill_idle_since = t
        if self.policy.loan is not None or t - self._prefill_idle_since < self.eager_after_s:
            return None
        self.eager_loans += 1
        return self.policy.lend("prefill", t)

    def _burst_step(self, t: float) -> Optional[PartitionDecision]:
        if self.burst_split is None or self.kind != "slo":
            return None
        if self._burst_from is None:
            if t < self._burst_calm_until or getattr(self.policy, "loan", None) is not None:
                return None
            wait, queue = self.expected_wait(t, self.split)
            if wait + queue < self.burst_after_s:
                return None
            base = self.policy.share
            self._burst_from = min(
                (i for i in range(len(self.fractions)) if i != self.burst_split),
                key=lambda i: abs(self.fractions[i] - base))
            self._burst_since = t
            self.bursts += 1
            ahead = (f" + {queue:.3f}s to prefill the {self.latency.tokens_waiting} prompt "
                     "tokens waiting") if queue else ""
            return PartitionDecision(
                t, 1.0, self.fractions[self.split], 1.0, "burst",
                f"a request has waited {wait:.3f}s for its first token{ahead} (from "
                f"{self.burst_after_s:.3f}s): prefill unconfined", split=self.burst_split)
        ran = t - self._burst_since
        wait, queue = self.expected_wait(t, self._burst_from)
        if wait + queue >= self.burst_after_s / 2 and ran < self.burst_max_s:
            return None
        back, self._burst_from = self._burst_from, None
        if ran >= self.burst_max_s:
            self._burst_calm_until = t + self.burst_max_s
            why = f"cut after {ran:.2f}s (none for the next {self.burst_max_s:.1f}s)"
        else:
            ahead = f" (+ {queue:.3f}s of prompts waiting there)" if queue else ""
            why = (f"the oldest wait for a first token is down to {wait:.3f}s{ahead} after "
                   f"{ran:.2f}s")
        return PartitionDecision(t, self.fractions[back], 1.0, self.fractions[back],
                                 "burst-end", why, split=back)

    def window(self, t: float) -> WindowStats:
        """Latencies since the last window plus the iteration times at the split in force.

        A side counts as idle only if it was idle for the *whole* window: prefill with nothing
        waiting, no arrival and no prefill iteration in it; decode with nothing decoding and no
        decode iteration in it (a Poisson gap at a window's end is not idleness: lending on it
        would resize twice a second under steady load)."""
        done = self.latency.completed
        if done:
            self.attainment = sum(1 for a, b in done if a <= self.ttft_s and b <= self.tpot_s) \
                / len(done)
        stats = self.latency.window(t, self.fractions[self.split])
        ran, self._ran = self._ran, set()
        here = [s for s in self._iters if s.split == self.split]
        self._iters = []
        pre = [s for s in here if s.role == "prefill" and s.mode == "extend"]
        dec = [s for s in here if s.role == "decode" and s.mode == "decode"]
        mean = (lambda xs: sum(xs) / len(xs) if xs else None)  # noqa: E731
        return dataclasses.replace(
            stats,
            prefill_iter_time_s=mean([s.end - s.start for s in pre]),
            prefill_iter_requests=mean([s.batch_size for s in pre]) or 1.0,
            prefill_iters=len(pre),
            decode_iter_time_s=mean([s.end - s.start for s in dec]),
            decode_iters=len(dec),
            decode_iter_batch=mean([s.batch_size for s in dec]),
            prefill_tokens_waiting=0,
            prefill_idle=stats.prefill_idle and stats.arrivals == 0 and "prefill" not in ran,
            decode_idle=stats.decode_idle and "decode" not in ran)

    def _reclaim_if_lent(self, side: str, t: float) -> Optional[PartitionDecision]:
        if getattr(self.policy, "loan", None) != side:  # the static policy never lends
            return None
        return self.policy.reclaim(t)
