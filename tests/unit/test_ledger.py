"""Ownership ledger: model-checked transitions, atomic refusals, torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_semipd.memory.ledger import (
    FREE,
    TREE,
    DoubleFreeError,
    DoubleIssueError,
    DuplicateSlotError,
    InvalidSlotError,
    LedgerError,
    NotOwnedError,
    OwnershipLedger,
    SlotPool,
)

CAP = 24
OWNERS = [FREE, TREE, 1, 2, 3]


def _snapshot(ledger: OwnershipLedger) -> tuple:
    return tuple(ledger.owner(s) for s in range(1, ledger.capacity + 1)), \
        {o: ledger.count(o) for o in OWNERS}


def _expected_error(model: dict[int, int], slots: list[int], src: int) -> type | None:
    for s in slots:
        if not 1 <= s <= CAP:
            return InvalidSlotError
        if model[s] != src:
            if src == FREE:
                return DoubleIssueError
            return DoubleFreeError if model[s] == FREE else NotOwnedError
    return DuplicateSlotError if len(set(slots)) != len(slots) else None


ops = st.lists(st.tuples(st.lists(st.integers(-1, CAP + 2), max_size=6),
                         st.sampled_from(OWNERS), st.sampled_from(OWNERS)), max_size=60)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(ops)
def test_ledger_matches_model_and_refusals_are_atomic(steps: list) -> None:
    ledger = OwnershipLedger(CAP)
    model = {s: FREE for s in range(1, CAP + 1)}
    for slots, src, dst in steps:
        if src == dst:
            with pytest.raises(ValueError):
                ledger.move(slots, src, dst)
            continue
        want = _expected_error(model, slots, src)
        before = _snapshot(ledger)
        if want is None:
            assert ledger.move(slots, src, dst) == len(slots)
            model.update((s, dst) for s in slots)
        else:
            with pytest.raises(want) as info:
                ledger.move(slots, src, dst)
            assert isinstance(info.value, LedgerError) and info.value.code
            assert _snapshot(ledger) == before
        for owner in OWNERS:
            assert ledger.count(owner) == sum(1 for o in model.values() if o == owner)
        assert sum(ledger.count(o) for o in OWNERS) == CAP
    assert ledger.verify() == []
    for owner in OWNERS:
        assert list(ledger.slots_of(owner)) == sorted(s for s, o in model.items() if o == owner)


def test_named_transitions_and_errors() -> None:
    ledger = OwnershipLedger(8)
    ledger.issue([1, 2, 3], client=1)
    with pytest.raises(DoubleIssueError):
        ledger.issue([3, 4], client=2)
    assert ledger.owner(4) == FREE  # atomic: 4 was not issued
    ledger.adopt([1], client=1)
    with pytest.raises(NotOwnedError):
        ledger.release([1], owner=1)
    ledger.release([1], owner=TREE)
    with pytest.raises(DoubleFreeError):
        ledger.release([1], owner=TREE)
    with pytest.raises(DuplicateSlotError):
        ledger.release([2, 3, 2], owner=1)
    assert ledger.client_counts() == {1: 2}
    with pytest.raises(InvalidSlotError):
        ledger.owner(0)  # the padding slot belongs to nobody
    with pytest.raises(InvalidSlotError):
        ledger.issue([0], client=1)
    with pytest.raises(ValueError):
        ledger.issue([5], client=0)
    assert ledger.check_owned([2, 3], 1) == [2, 3]
    assert ledger.verify() == []


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3), st.integers(0, 5)), max_size=40))
def test_slot_pool_never_hands_out_a_row_twice(steps: list) -> None:
    pool = SlotPool(10)
    held: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
    for take, client, n in steps:
        if take:
            rows = pool.take(n, client)
            if rows is None:
                assert n > pool.available
                continue
            assert all(r not in h for h in held.values() for r in rows)
            held[client].update(rows)
        else:
            give = sorted(held[client])[:n]
            assert pool.give(give, client) == len(give)
            held[client].difference_update(give)
        other = 1 + client % 3
        if held[other]:
            with pytest.raises(NotOwnedError):
                pool.give([min(held[other])], client)
        assert pool.available + sum(map(len, held.values())) == pool.capacity
        assert pool.verify() == []
    for client in held:
        assert pool.give_all(client) == len(held[client])
    assert pool.available == pool.capacity


def test_ledger_imports_with_torch_blocked() -> None:
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from sglang_semipd.memory import ledger\n"
        "l = ledger.OwnershipLedger(4); l.issue([1, 2], 1); assert l.verify() == []\n"
        "assert 'torch' not in {m for m, v in sys.modules.items() if v is not None}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
