"""Lifecycle of a request across the prefill -> decode handoff (pure logic, no torch)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_semipd import handoff as H
from sglang_semipd.handoff import (Abort, Admit, DecodeAccepted, DecodeFinished, DecodeRejected,
                                   DecodeToken, InvalidTransition, KVReady, Owner,
                                   PrefillChunkDone, PrefillDone, ReqState, ResourcesReleased,
                                   Retract, RetryHandoff)

RID = "r1"


def _of(actions: list[H.Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def _run(lc: H.RequestLifecycle, events: list[H.HandoffEvent]) -> list[H.Action]:
    out: list[H.Action] = []
    for ev in events:
        out.extend(lc.apply(ev))
    return out


def _to_decoding(lc: H.RequestLifecycle, chunks: tuple[int, ...] = (), cached: int = 0,
                 prompt_len: int = 8) -> list[H.Action]:
    evs = [Admit(req_pool_idx=3, cached_len=cached), *(PrefillChunkDone(c) for c in chunks),
           PrefillDone(first_token=42, prompt_len=prompt_len), KVReady(), DecodeAccepted()]
    return _run(lc, evs)


def _assert_balanced(lc: H.RequestLifecycle) -> None:
    assert lc.holder is Owner.NONE and not lc.release_pending
    assert lc.acquired == sum(lc.released.values())
    assert H.lifecycle_problems(lc) == []


# ---- happy paths ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunks,cached", [((), 0), ((3, 3), 0), ((2,), 4)],
                         ids=["plain", "chunked", "radix-hit"])
def test_happy_path(chunks: tuple[int, ...], cached: int) -> None:
    lc = H.RequestLifecycle(RID, {"temperature": 0.0})
    acts = _to_decoding(lc, chunks, cached)
    assert acts[0] == H.EmitFirstToken(RID, 42)
    (send,) = _of(acts, H.SendToDecode)
    rec = send.record
    assert rec == H.HandoffRecord(RID, 3, 8, [42], 42, {"temperature": 0.0}, 8)
    assert H.HandoffRecord.from_wire(rec.to_wire()) == rec
    assert lc.state is ReqState.DECODING and lc.holder is Owner.DECODE
    acts = _run(lc, [DecodeToken(2, (5, 6)), DecodeToken(1)])
    assert acts == [H.EmitTokens(RID, 1, 2), H.EmitTokens(RID, 3, 1)]
    acts = lc.apply(DecodeFinished("length"))
    assert acts == [H.EmitFinish(RID, H.FinishKind.COMPLETED, "length"),
                    H.ReleaseResources(RID, Owner.DECODE, "finish")]
    assert lc.apply(ResourcesReleased(Owner.DECODE)) == []
    assert lc.state is ReqState.FINISHED and lc.tokens_emitted == 4
    assert lc.apply(Abort()) == []  # late abort: no second finish
    _assert_balanced(lc)


def test_retract_then_reprefill_emits_first_token_once() -> None:
    lc = H.RequestLifecycle(RID)
    acts = _to_decoding(lc)
    acts += _run(lc, [DecodeToken(3, (1, 2, 3))])
    acts += lc.apply(Retract())
    assert acts[-1] == H.ReleaseResources(RID, Owner.DECODE, "retract")
    assert lc.state is ReqState.RETRACTED
    with pytest.raises(InvalidTransition, match="RETRACTED"):
        lc.apply(Admit())  # not before the decode side released
    assert lc.apply(ResourcesReleased(Owner.DECODE)) == [H.Requeue(RID)]
    acts += _run(lc, [Admit(req_pool_idx=5, cached_len=6), PrefillChunkDone(2),
                      PrefillDone(first_token=9, prompt_len=8), KVReady()])
    rec = _of(acts, H.SendToDecode)[-1].record
    assert rec.output_ids == [42, 1, 2, 3, 9] and rec.first_token == 9
    assert rec.kv_committed_len == 8 + 4 and rec.req_pool_idx == 5
    acts += _run(lc, [DecodeAccepted(), DecodeToken(1), DecodeFinished()])
    assert len(_of(acts, H.EmitFirstToken)) == 1
    streams = _of(acts, H.EmitTokens)
    assert [(e.start, e.count) for e in streams] == [(1, 3), (4, 1), (5, 1)]
    assert len(_of(acts, H.EmitFinish)) == 1
    lc.apply(ResourcesReleased(Owner.DECODE))
    assert lc.acquired == 2
    _assert_balanced(lc)


def test_decode_rejected_then_retry() -> None:
    lc = H.RequestLifecycle(RID)
    _run(lc, [Admit(), PrefillDone(1, 4), KVReady()])
    assert lc.apply(DecodeRejected()) == [H.DeferHandoff(RID)]
    assert lc.holder is Owner.PREFILL and lc.state is ReqState.HANDING_OFF
    with pytest.raises(InvalidTransition, match="DecodeAccepted"):
        lc.apply(DecodeAccepted())  # no offer outstanding
    (send,) = lc.apply(RetryHandoff())
    assert isinstance(send, H.SendToDecode)
    with pytest.raises(InvalidTransition, match="RetryHandoff"):
        lc.apply(RetryHandoff())
    assert lc.apply(DecodeAccepted()) == [] and lc.holder is Owner.DECODE


# ---- aborts --------------------------------------------------------------------------------
_PREFIX = {
    "QUEUED": [],
    "PREFILLING": [Admit(), PrefillChunkDone(2)],
    "PREFILL_DONE": [Admit(), PrefillDone(7, 4)],
    "HANDING_OFF_rejected": [Admit(), PrefillDone(7, 4), KVReady(), DecodeRejected()],
    "DECODING": [Admit(), PrefillDone(7, 4), KVReady(), DecodeAccepted(), DecodeToken(1)],
    "RETRACTED_pending": [Admit(), PrefillDone(7, 4), KVReady(), DecodeAccepted(), Retract()],
    "RETRACTED_released": [Admit(), PrefillDone(7, 4), KVReady(), DecodeAccepted(), Retract(),
                           ResourcesReleased(Owner.DECODE)],
}
# (releasing owner or None, crossing progress events that must be ignored)
_EXPECT = {
    "QUEUED": (None, []), "PREFILLING": (Owner.PREFILL, [PrefillChunkDone(1), PrefillDone(7, 4)]),
    "PREFILL_DONE": (Owner.PREFILL, [KVReady()]), "HANDING_OFF_rejected": (Owner.PREFILL, []),
    "DECODING": (Owner.DECODE, [DecodeToken(1), Retract(), DecodeFinished()]),
    "RETRACTED_pending": (Owner.DECODE, []), "RETRACTED_released": (None, []),
}


@pytest.mark.parametrize("where", list(_PREFIX))
def test_abort_in_every_state(where: str) -> None:
    lc = H.RequestLifecycle(RID)
    before = _run(lc, _PREFIX[where])
    owner, crossing = _EXPECT[where]
    acts = lc.apply(Abort()) + lc.apply(Abort())
    acts += _run(lc, crossing)
    if owner is not None:
        assert _of(acts, H.EmitFinish) == []
        if where != "RETRACTED_pending":
            assert acts == [H.ReleaseResources(RID, owner, "abort")]
        with pytest.raises(InvalidTransition, match="ResourcesReleased"):
            lc.apply(ResourcesReleased(Owner.DECODE if owner is Owner.PREFILL else Owner.PREFILL))
        acts += lc.apply(ResourcesReleased(owner))
    assert _of(acts, H.EmitFinish) == [H.EmitFinish(RID, H.FinishKind.ABORTED, "abort")]
    assert _of(before + acts, H.Requeue) == ([H.Requeue(RID)] if "released" in where else [])
    assert lc.state is ReqState.ABORTED and lc.apply(Abort()) == []
    with pytest.raises(InvalidTransition, match="ResourcesReleased"):
        lc.apply(ResourcesReleased(Owner.PREFILL))
    _assert_balanced(lc)


@pytest.mark.parametrize("answer", [DecodeAccepted(), DecodeRejected()])
def test_abort_crossing_offer(answer: H.HandoffEvent) -> None:
    lc = H.RequestLifecycle(RID)
    _run(lc, [Admit(), PrefillDone(7, 4), KVReady()])
    assert lc.apply(Abort()) == []  # offer in flight: its answer decides who releases
    acts = lc.apply(answer)
    owner = Owner.DECODE if isinstance(answer, DecodeAccepted) else Owner.PREFILL
    (rel,) = acts
    assert isinstance(rel, H.ReleaseResources) and rel.owner is owner
    if owner is Owner.DECODE:
        assert lc.apply(DecodeToken(1)) == []  # crossing token: not streamed
    (fin,) = lc.apply(ResourcesReleased(owner))
    assert fin.kind is H.FinishKind.ABORTED
    assert lc.released == Counter({owner: 1})
    _assert_balanced(lc)


# ---- illegal transitions -------------------------------------------------------------------
@pytest.mark.parametrize("prefix,event,state", [
    ([Admit(), PrefillDone(1, 4)], DecodeAccepted(), "PREFILL_DONE"),
    ([Admit()], DecodeToken(1), "PREFILLING"),
    ([], KVReady(), "QUEUED"),
    ([Admit()], Admit(), "PREFILLING"),
    ([Admit(), PrefillDone(1, 4), KVReady(), DecodeAccepted(), DecodeFinished()],
     DecodeToken(1), "FINISHED"),
    ([Abort()], Admit(), "ABORTED"),
    ([Admit(), PrefillDone(1, 4)], PrefillDone(1, 4), "PREFILL_DONE"),
    ([Admit()], PrefillDone(1, 0), "PREFILLING"),
    ([Admit(), PrefillChunkDone(5)], PrefillDone(1, 4), "PREFILLING"),
])
def test_illegal_transitions(prefix: list, event: H.HandoffEvent, state: str) -> None:
    lc = H.RequestLifecycle(RID)
    _run(lc, prefix)
    with pytest.raises(InvalidTransition) as exc:
        lc.apply(event)
    assert state in str(exc.value) and type(event).__name__ in str(exc.value)


def test_table_basics() -> None:
    t = H.HandoffTable()
    t.add("a")
    with pytest.raises(ValueError):
        t.add("a")
    t.apply("a", Admit())
    assert t.stats()["PREFILLING"] == 1
    assert t.check_quiescent() and t.reap() == []
    t.apply("a", Abort())
    t.apply("a", ResourcesReleased(Owner.PREFILL))
    assert t.check_quiescent() == [] and t.reap() == ["a"] and "a" not in t
    assert t.apply("a", Abort()) == []
    with pytest.raises(InvalidTransition, match="unknown"):
        t.apply("a", KVReady())
    assert t.reaped == Counter({"ABORTED": 1})


# ---- random interleavings ------------------------------------------------------------------
PROMPT = 6


def _legal(lc: H.RequestLifecycle) -> list[H.HandoffEvent]:
    """Events the outside world may legally produce now (incl. crossing ones, aborts)."""
    evs: list[H.HandoffEvent] = [Abort()]
    s = lc.state
    if lc.release_pending:
        evs.append(ResourcesReleased(lc.holder))
    if lc.abort_requested and lc.holder in (Owner.PREFILL, Owner.DECODE) and s not in H.TERMINAL:
        evs += ([PrefillChunkDone(1), KVReady()] if lc.holder is Owner.PREFILL
                else [DecodeToken(1), DecodeFinished()])
    if s is ReqState.HANDING_OFF and lc.offer_outstanding:
        evs += [DecodeAccepted(), DecodeRejected()]
    if lc.abort_requested or lc.release_pending:
        return evs
    fill = PROMPT + lc.output_len
    if s in (ReqState.QUEUED, ReqState.RETRACTED):
        evs += [Admit(cached_len=0), Admit(cached_len=fill - 1)]
    elif s is ReqState.PREFILLING:
        evs.append(PrefillDone(11, PROMPT))
        if lc.prefilled_len < fill:
            evs.append(PrefillChunkDone(1))
    elif s is ReqState.PREFILL_DONE:
        evs.append(KVReady())
    elif s is ReqState.HANDING_OFF and not lc.offer_outstanding:
        evs.append(RetryHandoff())
    elif s is ReqState.DECODING:
        evs += [DecodeToken(1), DecodeToken(2, (3, 4)), DecodeFinished(), Retract()]
    return evs


class _Driver:
    def __init__(self, n: int) -> None:
        self.table = H.HandoffTable()
        self.rids = [f"r{i}" for i in range(n)]
        self.lcs = {rid: self.table.add(rid) for rid in self.rids}
        self.finishes: Counter = Counter()
        self.firsts: Counter = Counter()
        self.emitted: Counter = Counter()
        self.release_asks: Counter = Counter()
        self.releases: Counter = Counter()
        self.admits: Counter = Counter()

    def step(self, rid: str, ev: H.HandoffEvent) -> None:
        self.admits[rid] += isinstance(ev, Admit)
        self.releases[rid] += isinstance(ev, ResourcesReleased)
        for a in self.table.apply(rid, ev):
            assert a.rid == rid
            if isinstance(a, H.EmitFinish):
                self.finishes[rid] += 1
            elif isinstance(a, H.EmitFirstToken):
                assert self.emitted[rid] == 0
                self.firsts[rid] += 1
                self.emitted[rid] += 1
            elif isinstance(a, H.EmitTokens):
                assert a.start == self.emitted[rid] and a.count > 0  # monotone, no dups
                self.emitted[rid] += a.count
            elif isinstance(a, H.ReleaseResources):
                self.release_asks[rid] += 1

    def drain(self) -> None:
        for _ in range(10):
            for rid, lc in self.lcs.items():
                if lc.release_pending:
                    self.step(rid, ResourcesReleased(lc.holder))
                elif lc.offer_outstanding:
                    self.step(rid, DecodeAccepted())
                elif not lc.terminal:
                    self.step(rid, Abort())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), data=st.data())
def test_random_interleavings(n: int, data: st.DataObject) -> None:
    d = _Driver(n)
    for _ in range(data.draw(st.integers(0, 120), label="steps")):
        rid = data.draw(st.sampled_from(d.rids), label="rid")
        if rid not in d.table:
            d.step(rid, Abort())  # duplicate abort of a reaped request
            continue
        d.step(rid, data.draw(st.sampled_from(_legal(d.lcs[rid])), label="event"))
        if data.draw(st.booleans(), label="reap"):
            d.table.reap()
    d.drain()
    assert d.table.check_quiescent() == []
    for rid, lc in d.lcs.items():
        assert lc.terminal, rid
        assert d.finishes[rid] == 1 and lc.finish_count == 1
        assert d.firsts[rid] <= 1 and d.emitted[rid] == lc.tokens_emitted <= lc.output_len
        assert d.admits[rid] == d.release_asks[rid] == d.releases[rid] == lc.acquired
        assert sum(lc.released.values()) == lc.acquired
        d.step(rid, Abort())
    assert d.finishes == Counter({rid: 1 for rid in d.rids})
    d.table.reap()
    assert len(d.table) == 0 and sum(d.table.reaped.values()) == n


def test_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['sglang'] = None\n"
            "import sglang_semipd.handoff as h; assert h.RequestLifecycle\n"
            "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
