"""KV pool sizing for two workers sharing one GPU (pure arithmetic)."""

from __future__ import annotations

import pytest

from sglang_semipd.memory.sizing import (PoolSizingError, kv_pool_budget, mha_bytes_per_token,
                                         mla_bytes_per_token)

GiB = 2**30
H100 = 80 * GiB
LLAMA8B_WEIGHTS = 15 * GiB  # 8.03B bf16 parameters (SGLang's log: "mem usage=15.02 GB")


def test_bytes_per_token():
    # Llama-3.1-8B: 32 layers, 8 KV heads x 128, bf16 -> 128 KiB per token
    assert mha_bytes_per_token(32, 8, 128, 2) == 131072
    # DeepSeek-V2-Lite: 27 layers, 512 + 64 latent, bf16
    assert mla_bytes_per_token(27, 512, 64, 2) == 27 * 576 * 2


def test_one_worker_is_stock_sglangs_budget():
    b = kv_pool_budget(H100, 0.8, LLAMA8B_WEIGHTS, mha_bytes_per_token(32, 8, 128, 2),
                       workers=1)
    assert b.kv_bytes == int(0.8 * H100) - LLAMA8B_WEIGHTS
    assert b.static_fraction_for_manager == pytest.approx(0.8, abs=1e-9)


def test_two_workers_pay_one_more_headroom():
    one = kv_pool_budget(H100, 0.8, LLAMA8B_WEIGHTS, 131072, workers=1)
    two = kv_pool_budget(H100, 0.8, LLAMA8B_WEIGHTS, 131072, workers=2,
                         manager_overhead_bytes=GiB // 2)
    assert one.kv_bytes - two.kv_bytes == two.per_worker_headroom + GiB // 2
    assert two.per_worker_headroom == H100 - int(0.8 * H100)
    # weights + pool + 2 headrooms + manager never exceed the card
    used = two.weights + two.kv_bytes + 2 * two.per_worker_headroom + two.manager_overhead
    assert used <= H100
    assert two.tokens == two.kv_bytes // 131072 > 200_000


@pytest.mark.parametrize("kwargs", [dict(mem_fraction_static=0.0),
                                    dict(mem_fraction_static=1.0),
                                    dict(mem_fraction_static=0.55),  # headroom eats the pool
                                    dict(bytes_per_token=0), dict(workers=0)])
def test_impossible_settings(kwargs):
    args = dict(total_bytes=H100, mem_fraction_static=0.8, weights_bytes=LLAMA8B_WEIGHTS,
                bytes_per_token=131072, workers=2)
    args.update(kwargs)
    with pytest.raises(PoolSizingError):
        kv_pool_budget(**args)


def test_message_says_what_to_change():
    with pytest.raises(PoolSizingError, match="raise --mem-fraction-static"):
        kv_pool_budget(H100, 0.5, LLAMA8B_WEIGHTS, 131072)


def test_shared_pool_budget_pays_every_worker_headroom_and_context():
    from sglang_semipd.memory.sizing import shared_pool_available_bytes

    gib = 2**30
    # stock: 60 GiB free after weights, 80 GiB before, f=0.9 -> 60 - 8 = 52 GiB
    two = shared_pool_available_bytes(60 * gib, 80 * gib, 0.9, workers=2,
                                      worker_context_bytes=gib // 2)
    assert two == pytest.approx(60 * gib - 2 * (8 * gib + gib // 2), abs=16)
    one = shared_pool_available_bytes(60 * gib, 80 * gib, 0.9, workers=1)
    assert one == pytest.approx(52 * gib, abs=16)  # one worker, no extra context: SGLang's own formula
    with pytest.raises(PoolSizingError, match="raise --mem-fraction-static above"):
        shared_pool_available_bytes(10 * gib, 80 * gib, 0.9, workers=2)
    with pytest.raises(PoolSizingError):
        shared_pool_available_bytes(10 * gib, 80 * gib, 1.0)
