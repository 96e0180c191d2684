"""The decode worker's hand-off bookkeeping (``handoff.DecodeInbox``, pure): adopt, early,
finished and orphaned hand-offs, aborts by rid prefix, and random interleavings of requests,
hand-offs and aborts with the real ``protocol.HandOff`` record."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_semipd import protocol as P
from sglang_semipd.handoff import DecodeInbox


def _h(rid: str, finished: bool = False) -> P.HandOff:
    return P.HandOff(rid=rid, req_pool_idx=1, kv_len=5, first_token=7, finished=finished)


def test_hand_off_after_its_request_is_adopted_once():
    box: DecodeInbox = DecodeInbox()
    box.park("a", "req-a")
    assert not box.has_pending
    box.receive(_h("a"))
    adopt, release = box.take()
    assert [(r, h.rid) for r, h in adopt] == [("req-a", "a")] and release == []
    assert box.take() == ([], [])
    assert box.stats() == {"parked": 0, "early": 0, "dropped": 0, "finished_early": 0,
                           "pending": 0}


def test_hand_off_before_its_request_waits_for_it():
    box: DecodeInbox = DecodeInbox()
    box.receive(_h("a"))
    assert box.take() == ([], []) and set(box.early) == {"a"}
    box.park("a", "req-a")
    adopt, _ = box.take()
    assert [r for r, _ in adopt] == ["req-a"] and box.stats()["early"] == 0


def test_finished_at_prefill_drops_the_parked_copy():
    box: DecodeInbox = DecodeInbox()
    box.park("a", "req-a")
    box.receive(_h("a", finished=True))
    assert box.take() == ([], []) and box.stats()["parked"] == 0
    box.receive(_h("b", finished=True))  # before its request: remembered, not parked later
    assert box.take() == ([], [])
    box.park("b", "req-b")
    assert box.stats()["parked"] == 0 and box.stats()["finished_early"] == 0


def test_aborted_while_parked_is_released_never_adopted():
    box: DecodeInbox = DecodeInbox()
    for rid in ("a", "a-1", "b"):
        box.park(rid, f"req-{rid}")
    assert sorted(box.abort("a")) == ["a", "a-1"]  # SGLang's prefix match (n>1 children)
    box.receive(_h("a"))
    box.receive(_h("a-1", finished=True))  # prefill saw the abort first
    box.receive(_h("b"))
    adopt, release = box.take()
    assert [r for r, _ in adopt] == ["req-b"] and [h.rid for h in release] == ["a"]
    assert box.stats() == {"parked": 0, "early": 0, "dropped": 0, "finished_early": 0,
                           "pending": 0}
    box.park("c", "req-c")
    assert box.abort("", abort_all=True) == ["c"]


EVENTS = st.lists(st.tuples(st.sampled_from(["park", "handoff", "abort"]),
                            st.integers(0, 5), st.booleans()), max_size=60)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.integers(0, 3))
def test_random_interleavings_keep_the_invariants(events, take_every):
    """Each request is parked once and gets one hand-off (possibly finished, possibly before
    it is parked); aborts come at any time. Every hand-off ends adopted, released or ignored
    exactly once; an aborted-while-parked request is never adopted; nothing is left over."""
    box: DecodeInbox = DecodeInbox()
    parked, handed, aborted_parked = set(), {}, set()
    adopted, released = [], []

    def take() -> None:
        a, r = box.take()
        adopted.extend(h.rid for _, h in a)
        released.extend(h.rid for h in r)
        for req, h in a:
            assert req == f"req-{h.rid}"

    for k, (kind, i, flag) in enumerate(events):
        rid = f"r{i}"
        if kind == "park" and rid not in parked:
            parked.add(rid)
            box.park(rid, f"req-{rid}")
        elif kind == "handoff" and rid not in handed:
            handed[rid] = flag
            box.receive(_h(rid, finished=flag))
        elif kind == "abort":
            aborted_parked.update(r for r in box.abort(rid))
        if take_every and k % take_every == 0:
            take()
    for rid in sorted(set(handed) - parked):  # every request reaches decode eventually
        parked.add(rid)
        box.park(rid, f"req-{rid}")
    for rid in sorted(parked - set(handed)):  # and gets its hand-off
        handed[rid] = False
        box.receive(_h(rid))
    take()
    assert len(adopted) == len(set(adopted)) and len(released) == len(set(released))
    assert not set(adopted) & set(released)
    assert not set(adopted) & aborted_parked
    finished = {r for r, f in handed.items() if f}
    assert set(adopted) | set(released) | finished == set(handed)
    assert set(released) == aborted_parked - finished
    assert box.stats() == {"parked": 0, "early": 0, "dropped": 0, "finished_early": 0,
                           "pending": 0}


def test_imports_without_torch():
    code = ("import sys; import sglang_semipd.handoff as h; assert h.DecodeInbox; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
