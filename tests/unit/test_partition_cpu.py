"""SM split planning and the resize protocol (pure logic)."""

from __future__ import annotations

import random

import pytest

from sglang_semipd.config import DEFAULT_SPLITS
from sglang_semipd.partition.resize import (Resize, ResizeAck, ResizeTracker,
                                            WorkerResizeState)
from sglang_semipd.partition.splits import (SMSplit, SplitError, check_grant,
                                            loan_and_base_fractions, nearest_split,
                                            plan_splits)


def test_default_shares_on_an_h100_give_complementary_groups_of_8():
    splits = plan_splits(DEFAULT_SPLITS, total_sms=132, granularity=8)
    assert [(s.prefill_sms, s.decode_sms) for s in splits] == \
        [(40, 92), (56, 76), (72, 60), (88, 44), (104, 28)]
    assert all(s.prefill_sms % 8 == 0 and s.total_sms == 132 for s in splits)
    assert splits[nearest_split(splits, 0.5)].prefill_sms == 72  # 66 asked -> 72 (measured)


def test_extreme_and_colliding_shares():
    splits = plan_splits([0.01, 0.02, 0.99], total_sms=132, granularity=8)
    # decode keeps 3 groups (+ the 4 SMs beyond 16 groups): on the H100 its graph capture
    # failed in cuBLAS on 4 SMs (124/8) and on 12 (120/12)
    assert [(s.prefill_sms, s.decode_sms) for s in splits] == [(8, 124), (104, 28)]
    assert splits[0].share == 0.01  # the first share mapping there names it
    assert [(s.prefill_sms, s.decode_sms) for s in plan_splits([0.999], 128)] == [(104, 24)]
    with pytest.raises(SplitError, match="3 decode groups"):
        plan_splits([0.5], total_sms=24, granularity=8)
    assert [(s.prefill_sms, s.decode_sms) for s in plan_splits([0.5], 32)] == [(8, 24)]
    with pytest.raises(SplitError):
        plan_splits([1.0], total_sms=132)


def test_a_share_past_the_decode_minimum_collapses_onto_the_top_split():
    """``--sm-splits ...,0.875`` asked for 120/12 on the H100 (its decode-graph capture
    failed in cuBLAS, 2026-12-07): it now maps to 104/28, the default's top split."""
    wide = plan_splits([*DEFAULT_SPLITS, 0.875], total_sms=132)
    assert [(s.prefill_sms, s.decode_sms) for s in wide] == \
        [(40, 92), (56, 76), (72, 60), (88, 44), (104, 28)]
    assert wide[-1].share == 0.75
    one_group = plan_splits([0.875], total_sms=132, min_decode_groups=1)
    assert [(s.prefill_sms, s.decode_sms) for s in one_group] == [(120, 12)]


def test_a_grant_below_the_planned_minimum_is_refused_with_the_split_named():
    check_grant("decode", SMSplit(104, 28, 0.75), 28)
    check_grant("decode", SMSplit(104, 28, 0.75), 24)
    check_grant("prefill", SMSplit(8, 124, 0.01), 8)
    with pytest.raises(SplitError, match="decode split 120/12: the driver granted 12 SMs"):
        check_grant("decode", SMSplit(120, 12, 0.9), 12)
    with pytest.raises(SplitError, match="prefill split 4/128: the driver granted 4 SMs"):
        check_grant("prefill", SMSplit(4, 128, 0.01), 4)


def test_loan_and_base_fractions_under_each_idle_loan_mode():
    """``--idle-loan splits``: the controller's defaults. ``most``: the loans go to the
    extreme planned splits; the base splits are ``--sm-splits``' own, the top one included
    although it is also the loan to prefill (decode keeps 28 SMs either way)."""
    shares = sorted({*DEFAULT_SPLITS, 1e-3, 1 - 1e-3})
    splits = plan_splits(shares, total_sms=132)
    assert [s.prefill_sms for s in splits] == [8, 40, 56, 72, 88, 104]
    assert loan_and_base_fractions(splits, DEFAULT_SPLITS, lend_most=False) == ((), None)
    loans, base = loan_and_base_fractions(splits, DEFAULT_SPLITS, lend_most=True)
    assert loans == (8 / 132, 104 / 132)
    assert base == tuple(p / 132 for p in (40, 56, 72, 88, 104))
    # nothing loan-only (the loan shares collapsed onto base splits): the defaults
    same = plan_splits(DEFAULT_SPLITS, total_sms=132)
    assert loan_and_base_fractions(same, DEFAULT_SPLITS, lend_most=True) == ((), None)


def test_resize_waits_for_the_iteration_boundary_and_acks_its_iteration():
    w = WorkerResizeState("decode", split=2)
    assert w.receive(Resize(1, 3)) == ResizeAck("decode", 1, 3, 0)  # idle: at once
    assert w.begin_iteration() == 0
    assert w.receive(Resize(2, 1)) is None  # mid-iteration: waits
    assert w.split == 3
    ack = w.end_iteration()
    assert ack == ResizeAck("decode", 2, 1, 1) and w.split == 1
    assert w.receive(Resize(2, 4)) is None and w.receive(Resize(1, 0)) is None  # stale
    assert w.split == 1


def test_a_later_command_supersedes_an_unapplied_one():
    w = WorkerResizeState("prefill", split=0)
    w.begin_iteration()
    w.receive(Resize(1, 3))
    w.receive(Resize(2, 4))
    assert w.end_iteration() == ResizeAck("prefill", 2, 4, 1)
    w.begin_iteration()
    assert w.end_iteration() is None  # nothing left to apply


def test_tracker_completes_only_when_both_workers_switched():
    t = ResizeTracker(split=2)
    cmd = t.start(4)
    assert cmd == Resize(1, 4) and t.start(1) is None  # one in flight at a time
    assert not t.on_ack(ResizeAck("prefill", 1, 4, 7))
    assert t.on_ack(ResizeAck("decode", 1, 4, 9)) and t.split == 4
    assert t.took_effect_at() == {"prefill": 7, "decode": 9}
    assert t.start(4) is None  # already there
    with pytest.raises(ValueError):
        t.on_ack(ResizeAck("decode", 5, 1, 0))


def test_random_interleavings_end_with_both_workers_on_the_last_split():
    rng = random.Random(3)
    for _ in range(200):
        t = ResizeTracker(split=0)
        workers = {r: WorkerResizeState(r, 0) for r in ResizeTracker.ROLES}
        inbox = {r: [] for r in workers}
        last = 0
        for _ in range(rng.randrange(1, 30)):
            action = rng.random()
            if action < 0.3:
                cmd = t.start(rng.randrange(5), force=rng.random() < 0.5)
                if cmd:
                    last = cmd.split
                    for r in workers:
                        inbox[r].append(cmd)
            else:
                r = rng.choice(list(workers))
                w = workers[r]
                if inbox[r] and rng.random() < 0.5:
                    ack = w.receive(inbox[r].pop(0))
                elif w.in_iteration:
                    ack = w.end_iteration()
                else:
                    w.begin_iteration()
                    ack = None
                if ack:
                    t.on_ack(ack)
        for r, w in workers.items():  # drain: finish iterations, deliver everything
            if w.in_iteration:
                ack = w.end_iteration()
                if ack:
                    t.on_ack(ack)
            for cmd in inbox[r]:
                ack = w.receive(cmd)
                if ack:
                    t.on_ack(ack)
        assert t.in_flight is None
        assert {w.split for w in workers.values()} == {t.split} == {last}
