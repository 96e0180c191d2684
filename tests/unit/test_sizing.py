"""KV pool sizing for two workers sharing one GPU (pure arithmetic)."""

from __future__ import annotations

import pytest

from sglang_semipd.memory.sizing import PoolSizingError, shared_pool_available_bytes

GiB = 2**30


def test_shared_pool_budget_pays_every_worker_headroom_and_context():
    # stock: 60 GiB free after weights, 80 GiB before, f=0.9 -> 60 - 8 = 52 GiB
    two = shared_pool_available_bytes(60 * GiB, 80 * GiB, 0.9, workers=2,
                                      worker_context_bytes=GiB // 2)
    assert two == pytest.approx(60 * GiB - 2 * (8 * GiB + GiB // 2), abs=16)
    one = shared_pool_available_bytes(60 * GiB, 80 * GiB, 0.9, workers=1)
    assert one == pytest.approx(52 * GiB, abs=16)  # one worker, no extra context: SGLang's own
    # the pool plus each worker's headroom and context never exceed what was free
    assert two + 2 * (int(80 * GiB * (1 - 0.9)) + GiB // 2) <= 60 * GiB


@pytest.mark.parametrize("kwargs", [dict(mem_fraction_static=0.0),
                                    dict(mem_fraction_static=1.0),
                                    dict(mem_fraction_static=0.55),  # headroom eats the pool
                                    dict(free_now=0), dict(workers=0),
                                    dict(worker_context_bytes=-1)])
def test_impossible_settings(kwargs):
    args = dict(free_now=60 * GiB, pre_model_load_free=80 * GiB, mem_fraction_static=0.9,
                workers=2, worker_context_bytes=GiB // 2)
    args.update(kwargs)
    with pytest.raises(PoolSizingError):
        shared_pool_available_bytes(**args)


def test_message_says_what_to_change():
    with pytest.raises(PoolSizingError, match="raise --mem-fraction-static above"):
        shared_pool_available_bytes(10 * GiB, 80 * GiB, 0.9, workers=2)
