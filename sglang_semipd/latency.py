"""Per-request TTFT and TPOT as the semi-PD scheduler process sees them (pure logic, no torch).

The scheduler process forwards every request to the workers and every output batch to the
DetokenizerManager, so it can time both ends without asking anyone: a request's *arrival* is
when it was forwarded, its *first token* the first output batch that carries it (always the
prefill worker's), its *finish* the batch that finishes it. TTFT = first token - arrival;
TPOT = (finish - first token) / (tokens - 1) for requests with more than one token.
:meth:`LatencyTracker.window` hands what completed since the last call to the SLO policy as a
:class:`~sglang_semipd.slo.policy.WindowStats`. Clocks are the caller's (monotonic seconds).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from sglang_semipd.slo.policy import WindowStats


@dataclasses.dataclass
class _Live:
    arrival: float
    first: Optional[float] = None
    tokens: int = 0
    prompt: int = 0  # prompt tokens, counted in ``tokens_waiting`` until the first token


class LatencyTracker:
    """See the module docstring. Not thread-safe (one loop owns it)."""

    def __init__(self, start: float) -> None:
        self._live: dict[str, _Live] = {}
        self._waiting: dict[str, float] = {}  # rid -> arrival, no first token yet (in order)
        self.tokens_waiting = 0  # prompt tokens of the requests in ``_waiting``
        self._ttfts: list[float] = []
        self._tpots: list[float] = []
        self._arrivals = 0
        self._window_start = start
        self.finished = 0
        self.completed: list[tuple[float, float]] = []  # (ttft, tpot) finished this window

    def on_request(self, rid: str, t: float, prompt_tokens: int = 0) -> None:
        """A request forwarded at ``t``; ``prompt_tokens`` (its input ids, cached prefix
        included) count in :attr:`tokens_waiting` until its first token."""
        if rid not in self._live:
            self._live[rid] = _Live(arrival=t, prompt=max(0, int(prompt_tokens)))
            self._waiting[rid] = t
            self.tokens_waiting += self._live[rid].prompt
            self._arrivals += 1

    def _stop_waiting(self, rid: str, live: _Live) -> None:
        if self._waiting.pop(rid, None) is not None:
            self.tokens_waiting -= live.prompt

    def on_first_token(self, rid: str, t: float) -> None:
        """``rid``'s first token exists at ``t`` (its prefill handed it to decode). Needed for
        requests that do not stream: SGLang sends them no output batch before they finish, so
        without this they would count as waiting for a first token all their life."""
        live = self._live.get(rid)
        if live is not None:
            self._first(rid, live, t)

    def _first(self, rid: str, live: _Live, t: float) -> None:
        if live.first is None:
            live.first = t
            self._stop_waiting(rid, live)
            self._ttfts.append(t - live.arrival)

    def on_outputs(self, rids: Iterable[str], completion_tokens: Iterable[int],
                   finished: Iterable[bool], t: float) -> None:
        """One output batch: per request its cumulative completion tokens and whether it
        finished with this batch."""
        for rid, tokens, done in zip(rids, completion_tokens, finished):
            live = self._live.get(rid)
            if live is None:
                continue  # e.g. a health check sent before we saw it, or already aborted
            if tokens > 0:
                self._first(rid, live, t)
            live.tokens = max(live.tokens, int(tokens))
            if done:
                del self._live[rid]
                self._stop_waiting(rid, live)
                self.finished += 1
                if live.first is not None and live.tokens > 1:
                    self._tpots.append((t - live.first) / (live.tokens - 1))
                if live.first is not None:
                    self.completed.append((live.first - live.arrival, self._tpots[-1]
                                           if live.tokens > 1 else 0.0))

    def on_abort(self, rid: str) -> None:
        live = self._live.pop(rid, None)
        if live is not None:
            self._stop_waiting(rid, live)

    def oldest_wait(self, t: float) -> float:
        """How long the longest-waiting request without a first token has waited at ``t``
        (0 when none waits). O(1): requests are kept in arrival order."""
        for arrival in self._waiting.values():
            return max(0.0, t - arrival)
        return 0.0

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def waiting_first_token(self) -> int:
        return len(self._waiting)

    @property
    def decoding(self) -> int:
        """Requests past their first token and not finished (every waiting one is live)."""
        return len(self._live) - len(self._waiting)

    def window(self, t: float, share: float) -> WindowStats:
        """What completed since the last window (then forgotten)."""
        span = max(t - self._window_start, 1e-9)
        decoding = self.decoding
        stats = WindowStats(t=t, window_s=span, share=share, ttfts=tuple(self._ttfts),
                            tpots=tuple(self._tpots), arrivals=self._arrivals,
                            arrival_rate=self._arrivals / span,
                            prefill_queue_len=self.waiting_first_token,
                            decode_batch_size=decoding,
                            prefill_idle=self.waiting_first_token == 0,
                            decode_idle=decoding == 0)
        self._ttfts, self._tpots, self._arrivals = [], [], 0
        self.completed = []
        self._window_start = t
        return stats
