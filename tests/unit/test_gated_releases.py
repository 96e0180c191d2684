"""GatedReleases: releases wait for their gate, in order; drain waits for all."""

from __future__ import annotations

from sglang_semipd.memory.gated import GatedReleases
from sglang_semipd.testing.gate import ManualGate as Gate


def test_releases_wait_for_their_gate_and_keep_their_order():
    g1, g2 = Gate(), Gate()
    q: GatedReleases[list[int]] = GatedReleases(weight=len)
    q.add([1, 2], g1)
    q.add([3], None)  # no gate, but behind g1: order is kept
    q.add([4, 5, 6], g2)
    assert q.size == 6 and len(q) == 3
    assert q.ready() == []
    g2.done = True  # a later gate cannot pass an earlier one (they complete in order)
    assert q.ready() == []
    g1.done = True
    assert q.ready() == [[1, 2], [3], [4, 5, 6]]
    assert q.size == 0 and len(q) == 0 and q.ready() == []


def test_ungated_releases_pass_at_once():
    q: GatedReleases[int] = GatedReleases()
    q.add(7, None)
    assert q.ready() == [7] and q.size == 0


def test_drain_waits_for_every_gate():
    gates = [Gate(), Gate()]
    q: GatedReleases[str] = GatedReleases()
    q.add("a", gates[0])
    q.add("b", gates[1])
    assert q.drain() == ["a", "b"]
    assert [g.waits for g in gates] == [1, 1] and q.size == 0
