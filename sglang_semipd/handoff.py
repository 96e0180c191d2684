"""Request lifecycle across the prefill -> decode handoff (pure logic, no torch, no SGLang).

The prefill and decode workers share one KV pool, so a handoff moves *ownership* of a
request's KV resources (req row, slots, radix lock), never the KV itself. The scheduler
feeds every fact it learns into a :class:`RequestLifecycle` (via :class:`HandoffTable`)
and carries out the returned actions. Lifecycle (``*`` = Abort allowed everywhere)::

    QUEUED --Admit--> PREFILLING --PrefillChunkDone--> PREFILLING
      ^                   |
      |              PrefillDone (EmitFirstToken once ever; later re-prefills emit the
      |                   |       newly sampled token as EmitTokens)
      |                   v
      |             PREFILL_DONE --KVReady--> HANDING_OFF --DecodeAccepted--> DECODING
      |                                        |    ^                        |  |  |
      |                      DecodeRejected -> |    | RetryHandoff           |  |  DecodeToken
      |                      (DeferHandoff)    +----+                        |  |
    RETRACTED <--ResourcesReleased(DECODE)-- RETRACTED(release pending) <-Retract
    (Requeue; Admit again)                                                    |
                                   FINISHED <--DecodeFinished (EmitFinish, then decode
                                                releases: ResourcesReleased(DECODE))

Abort: QUEUED/RETRACTED(released) -> ABORTED at once. Otherwise the current holder is told
to release (``ReleaseResources``) and ``EmitFinish(ABORTED)`` follows its
``ResourcesReleased``. In HANDING_OFF with an offer in flight the answer decides the
holder: a crossing ``DecodeAccepted`` makes DECODE drop and release, ``DecodeRejected``
makes PREFILL release. Progress events from the holder that cross the abort are ignored.
After FINISHED/ABORTED only Abort (a no-op) and the owed ``ResourcesReleased`` are legal.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


class ReqState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    PREFILL_DONE = "prefill_done"  # first token emitted; KV writes maybe not yet visible
    HANDING_OFF = "handing_off"  # KV visible; offered to decode (or deferred after reject)
    DECODING = "decoding"
    RETRACTED = "retracted"  # decode OOM: back to the prefill queue, resources released
    FINISHED = "finished"
    ABORTED = "aborted"


TERMINAL = frozenset({ReqState.FINISHED, ReqState.ABORTED})


class Owner(enum.Enum):
    """Who holds a request's KV resources. SCHEDULER: parked at the scheduler, no KV held."""

    SCHEDULER = "scheduler"
    PREFILL = "prefill"
    DECODE = "decode"
    NONE = "none"


NOMINAL_OWNER: dict[ReqState, Owner] = {
    ReqState.QUEUED: Owner.SCHEDULER, ReqState.PREFILLING: Owner.PREFILL,
    ReqState.PREFILL_DONE: Owner.PREFILL, ReqState.HANDING_OFF: Owner.PREFILL,
    ReqState.DECODING: Owner.DECODE, ReqState.RETRACTED: Owner.SCHEDULER,
    ReqState.FINISHED: Owner.NONE, ReqState.ABORTED: Owner.NONE,
}
"""Owner in the undisturbed flow; the live holder is :attr:`RequestLifecycle.holder`."""


class FinishKind(enum.Enum):
    COMPLETED = "completed"
    ABORTED = "aborted"


class InvalidTransition(RuntimeError):
    """An event that is illegal in the request's current state."""


# ---- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class HandoffEvent:
    """Base of all events fed into a lifecycle."""


@dataclass(frozen=True)
class Admit(HandoffEvent):
    req_pool_idx: int = -1
    cached_len: int = 0  # radix-cache prefix hit


@dataclass(frozen=True)
class PrefillChunkDone(HandoffEvent):
    n_tokens: int


@dataclass(frozen=True)
class PrefillDone(HandoffEvent):
    first_token: int
    prompt_len: int


@dataclass(frozen=True)
class KVReady(HandoffEvent):
    pass


@dataclass(frozen=True)
class DecodeAccepted(HandoffEvent):
    pass


@dataclass(frozen=True)
class DecodeRejected(HandoffEvent):
    pass


@dataclass(frozen=True)
class RetryHandoff(HandoffEvent):
    """Prefill side re-offers a request that decode rejected earlier."""


@dataclass(frozen=True)
class DecodeToken(HandoffEvent):
    n: int = 1
    token_ids: tuple[int, ...] = ()  # optional; when given, len == n


@dataclass(frozen=True)
class DecodeFinished(HandoffEvent):
    reason: str = "stop"


@dataclass(frozen=True)
class Retract(HandoffEvent):
    pass


@dataclass(frozen=True)
class Abort(HandoffEvent):
    pass


@dataclass(frozen=True)
class ResourcesReleased(HandoffEvent):
    by: Owner


# ---- wire record and actions --------------------------------------------------------------
@dataclass(frozen=True)
class HandoffRecord:
    """Metadata crossing prefill -> decode. ``first_token`` is the token sampled by the
    latest prefill (decode starts from it); ``kv_committed_len`` tokens have KV."""

    rid: str
    req_pool_idx: int
    prompt_len: int
    output_ids: list[int]
    first_token: int
    sampling_params: dict[str, Any]
    kv_committed_len: int

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> HandoffRecord:
        return cls(**d)


@dataclass(frozen=True)
class Action:
    rid: str


@dataclass(frozen=True)
class EmitFirstToken(Action):
    token: int


@dataclass(frozen=True)
class EmitTokens(Action):
    start: int  # index into output_ids of the first token streamed by this action
    count: int


@dataclass(frozen=True)
class SendToDecode(Action):
    record: HandoffRecord


@dataclass(frozen=True)
class DeferHandoff(Action):
    """Decode was full: the prefill side keeps the request and retries later."""


@dataclass(frozen=True)
class ReleaseResources(Action):
    owner: Owner
    reason: str


@dataclass(frozen=True)
class Requeue(Action):
    pass


@dataclass(frozen=True)
class EmitFinish(Action):
    kind: FinishKind
    reason: str


_PROGRESS: dict[Owner, tuple[type, ...]] = {
    Owner.PREFILL: (PrefillChunkDone, PrefillDone, KVReady),
    Owner.DECODE: (DecodeToken, DecodeFinished, Retract),
}


# ---- one request --------------------------------------------------------------------------
@dataclass
class RequestLifecycle:
    """State machine of one request; :meth:`apply` returns the actions to carry out."""

    rid: str
    sampling_params: dict[str, Any] = field(default_factory=dict)
    state: ReqState = ReqState.QUEUED
    holder: Owner = Owner.NONE
    release_pending: bool = False
    offer_outstanding: bool = False
    abort_requested: bool = False
    req_pool_idx: int = -1
    prompt_len: int = 0
    prefilled_len: int = 0
    output_len: int = 0
    output_ids: list[int] = field(default_factory=list)
    tokens_emitted: int = 0
    first_token_emitted: bool = False
    finish: EmitFinish | None = None
    finish_count: int = 0
    acquired: int = 0
    released: Counter = field(default_factory=Counter)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def apply(self, event: HandoffEvent) -> list[Action]:
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a handoff event: {event!r}")
        if self.abort_requested and isinstance(event, _PROGRESS.get(self.holder, ())):
            logger.debug("rid=%s: ignoring %r crossing abort", self.rid, event)
            return []
        actions = handler(self, event)
        logger.debug("rid=%s: %r -> %s %r", self.rid, event, self.state.name, actions)
        return actions

    # -- helpers --
    def _illegal(self, event: HandoffEvent, why: str = "") -> InvalidTransition:
        extra = f" ({why})" if why else ""
        return InvalidTransition(
            f"rid={self.rid}: event {type(event).__name__} illegal in state "
            f"{self.state.name}{extra}")

    def _require(self, event: HandoffEvent, *states: ReqState) -> None:
        if self.state not in states:
            raise self._illegal(event)

    def _finish(self, kind: FinishKind, reason: str) -> EmitFinish:
        assert self.finish is None, f"rid={self.rid}: second finish"
        self.finish = EmitFinish(self.rid, kind, reason)
        self.finish_count += 1
        self.state = ReqState.FINISHED if kind is FinishKind.COMPLETED else ReqState.ABORTED
        return self.finish

    def _release(self, reason: str) -> ReleaseResources:
        self.release_pending = True
        return ReleaseResources(self.rid, self.holder, reason)

    def _emit_new(self) -> list[Action]:
        new = self.output_len - self.tokens_emitted
        if new <= 0:
            return []
        if not self.first_token_emitted:
            self.first_token_emitted = True
            action: Action = EmitFirstToken(self.rid, self.output_ids[0])
            new = 1
        else:
            action = EmitTokens(self.rid, self.tokens_emitted, new)
        self.tokens_emitted += new
        return [action]

    def record(self) -> HandoffRecord:
        return HandoffRecord(
            rid=self.rid, req_pool_idx=self.req_pool_idx, prompt_len=self.prompt_len,
            output_ids=list(self.output_ids), first_token=self.output_ids[-1],
            sampling_params=dict(self.sampling_params), kv_committed_len=self.prefilled_len)

    # -- handlers --
    def _on_admit(self, ev: Admit) -> list[Action]:
        self._require(ev, ReqState.QUEUED, ReqState.RETRACTED)
        if self.holder is not Owner.NONE or self.release_pending or self.abort_requested:
            raise self._illegal(ev, "resources not yet released")
        fill = (self.prompt_len or 1) + self.output_len
        if ev.cached_len < 0 or (self.prompt_len and ev.cached_len >= fill):
            raise self._illegal(ev, f"bad cached_len={ev.cached_len}")
        self.state, self.holder = ReqState.PREFILLING, Owner.PREFILL
        self.acquired += 1
        self.req_pool_idx, self.prefilled_len = ev.req_pool_idx, ev.cached_len
        return []

    def _on_chunk(self, ev: PrefillChunkDone) -> list[Action]:
        self._require(ev, ReqState.PREFILLING)
        if ev.n_tokens <= 0:
            raise self._illegal(ev, f"n_tokens={ev.n_tokens}")
        self.prefilled_len += ev.n_tokens
        return []

    def _on_prefill_done(self, ev: PrefillDone) -> list[Action]:
        self._require(ev, ReqState.PREFILLING)
        if ev.prompt_len <= 0 or (self.prompt_len and ev.prompt_len != self.prompt_len):
            raise self._illegal(ev, f"prompt_len={ev.prompt_len}, known {self.prompt_len}")
        fill = ev.prompt_len + self.output_len
        if self.prefilled_len > fill:
            raise self._illegal(ev, f"prefilled {self.prefilled_len} > {fill} tokens")
        self.prompt_len, self.prefilled_len = ev.prompt_len, fill
        self.output_ids.append(ev.first_token)
        self.output_len += 1
        self.state = ReqState.PREFILL_DONE
        return self._emit_new()

    def _on_kv_ready(self, ev: KVReady) -> list[Action]:
        self._require(ev, ReqState.PREFILL_DONE)
        self.state, self.offer_outstanding = ReqState.HANDING_OFF, True
        return [SendToDecode(self.rid, self.record())]

    def _on_retry(self, ev: RetryHandoff) -> list[Action]:
        self._require(ev, ReqState.HANDING_OFF)
        if self.offer_outstanding or self.abort_requested:
            raise self._illegal(ev, "offer outstanding or aborted")
        self.offer_outstanding = True
        return [SendToDecode(self.rid, self.record())]

    def _on_answer(self, ev: HandoffEvent) -> list[Action]:
        self._require(ev, ReqState.HANDING_OFF)
        if not self.offer_outstanding:
            raise self._illegal(ev, "no offer outstanding")
        self.offer_outstanding = False
        if isinstance(ev, DecodeAccepted):
            self.state, self.holder = ReqState.DECODING, Owner.DECODE
            return [self._release("abort crossed handoff: drop")] if self.abort_requested else []
        if self.abort_requested:
            return [self._release("abort")]
        return [DeferHandoff(self.rid)]

    def _on_token(self, ev: DecodeToken) -> list[Action]:
        self._require(ev, ReqState.DECODING)
        if ev.n <= 0 or (ev.token_ids and len(ev.token_ids) != ev.n):
            raise self._illegal(ev, f"n={ev.n}, {len(ev.token_ids)} ids")
        self.output_len += ev.n
        self.output_ids.extend(ev.token_ids)
        self.prefilled_len += ev.n  # KV of the previously sampled tokens is now written
        return self._emit_new()

    def _on_finished(self, ev: DecodeFinished) -> list[Action]:
        self._require(ev, ReqState.DECODING)
        fin = self._finish(FinishKind.COMPLETED, ev.reason)
        return [fin, self._release("finish")]

    def _on_retract(self, ev: Retract) -> list[Action]:
        self._require(ev, ReqState.DECODING)
        self.state = ReqState.RETRACTED
        return [self._release("retract")]

    def _on_abort(self, ev: Abort) -> list[Action]:
        if self.terminal or self.abort_requested:
            return []
        self.abort_requested = True
        if self.holder is Owner.NONE:
            return [self._finish(FinishKind.ABORTED, "abort")]
        if self.release_pending or self.offer_outstanding:
            return []  # finish follows the pending release / the offer's answer
        return [self._release("abort")]

    def _on_released(self, ev: ResourcesReleased) -> list[Action]:
        if not self.release_pending or ev.by is not self.holder:
            raise self._illegal(ev, f"by={ev.by.name}, holder={self.holder.name}, "
                                    f"release_pending={self.release_pending}")
        self.released[ev.by] += 1
        self.holder, self.release_pending = Owner.NONE, False
        if self.state is ReqState.FINISHED:
            return []
        if self.abort_requested:
            return [self._finish(FinishKind.ABORTED, "abort")]
        return [Requeue(self.rid)]  # RETRACTED


_HANDLERS: dict[type, Callable[[RequestLifecycle, Any], list[Action]]] = {
    Admit: RequestLifecycle._on_admit, PrefillChunkDone: RequestLifecycle._on_chunk,
    PrefillDone: RequestLifecycle._on_prefill_done, KVReady: RequestLifecycle._on_kv_ready,
    RetryHandoff: RequestLifecycle._on_retry, DecodeAccepted: RequestLifecycle._on_answer,
    DecodeRejected: RequestLifecycle._on_answer, DecodeToken: RequestLifecycle._on_token,
    DecodeFinished: RequestLifecycle._on_finished, Retract: RequestLifecycle._on_retract,
    Abort: RequestLifecycle._on_abort, ResourcesReleased: RequestLifecycle._on_released,
}


def lifecycle_problems(lc: RequestLifecycle) -> list[str]:
    """Invariant violations of one request at a quiescent point (empty when fine)."""
    p: list[str] = []
    busy = lc.holder is not Owner.NONE or lc.release_pending or lc.offer_outstanding
    if busy:
        p.append(f"rid={lc.rid}: {lc.state.name} still holds resources ({lc.holder.name})")
    if lc.terminal and lc.finish_count != 1:
        p.append(f"rid={lc.rid}: finished {lc.finish_count} times")
    if not busy and lc.acquired != sum(lc.released.values()):
        p.append(f"rid={lc.rid}: acquired {lc.acquired}, released {dict(lc.released)}")
    return p


# ---- the scheduler's table ----------------------------------------------------------------
class HandoffTable:
    """rid -> lifecycle. Aborts of unknown (e.g. already reaped) rids are no-ops."""

    def __init__(self) -> None:
        self._live: dict[str, RequestLifecycle] = {}
        self.reaped: Counter = Counter()  # terminal state name -> count removed

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, rid: object) -> bool:
        return rid in self._live

    def add(self, rid: str, sampling_params: dict[str, Any] | None = None) -> RequestLifecycle:
        if rid in self._live:
            raise ValueError(f"duplicate rid {rid!r}")
        lc = RequestLifecycle(rid, dict(sampling_params or {}))
        self._live[rid] = lc
        return lc

    def get(self, rid: str) -> RequestLifecycle:
        return self._live[rid]

    def apply(self, rid: str, event: HandoffEvent) -> list[Action]:
        lc = self._live.get(rid)
        if lc is None:
            if isinstance(event, Abort):
                return []
            raise InvalidTransition(f"rid={rid}: event {type(event).__name__} for unknown rid")
        return lc.apply(event)

    def stats(self) -> dict[str, int]:
        counts = Counter(lc.state.name for lc in self._live.values())
        return {s.name: counts.get(s.name, 0) for s in ReqState}

    def reap(self) -> list[str]:
        """Drop terminal entries whose finish was emitted and whose resources are back."""
        done = [rid for rid, lc in self._live.items()
                if lc.terminal and lc.finish is not None and not lifecycle_problems(lc)]
        for rid in done:
            self.reaped[self._live.pop(rid).state.name] += 1
        return done

    def check_quiescent(self) -> list[str]:
        problems: list[str] = []
        for lc in self._live.values():
            problems.extend(lifecycle_problems(lc))
        return problems
