"""On the GPU: the memory manager owns one copy of the weights and the KV pool; two attached
SGLang workers run real forward passes of the tiny model through them.

Worker A computes a reference (prompt P+Q from scratch), then prefills P and inserts it into
the shared radix tree. Worker B matches P in the tree, reads A's K/V for it and computes only
Q: its logits must equal the reference (and differ from Q computed without P), so B really
read what A wrote. Weights: both workers' parameters are CUDA-IPC views (no local bytes), the
manager holds the only copy. At the end the manager's invariant holds with nothing in use.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest


pytestmark = pytest.mark.gpu

P_LEN, Q_LEN, DECODE = 48, 12, 4


def server_args(model: str, **overrides):
    from sglang.srt.server_args import ServerArgs

    kw = dict(model_path=model, attention_backend="triton", sampling_backend="pytorch",
              grammar_backend="none", mem_fraction_static=0.8, max_total_tokens=65536,
              cuda_graph_max_bs_decode=8,
              disable_prefill_cuda_graph=True, log_level="info")
    kw.update(overrides)
    return ServerArgs(**kw)


@pytest.fixture(scope="module")
def stack(tiny_bf16, tmp_path_factory: pytest.TempPathFactory):
    from sglang_semipd.testing.unified import UnifiedStack

    model = tiny_bf16
    run_dir = str(tmp_path_factory.mktemp("run"))
    workers = {"prefill": {"role": "prefill"}, "decode": {"role": "decode", "cuda_graphs": True}}
    with UnifiedStack(server_args(str(model)), run_dir, workers) as s:
        yield s
    assert s.exit_codes == {"prefill": 0, "decode": 0, "manager": 0}, s.exit_codes
    assert not os.path.exists(s.weight_socket)


def test_weights_are_one_copy(stack):
    weights = stack.manager["weights_bytes"]
    assert weights > 50e6  # tiny model: ~58M parameters in bf16
    for name, rep in stack.reports.items():
        print(f"{name}: local weight bytes {rep['local_weight_bytes']}, mapped "
              f"{rep['foreign_weight_bytes']} of the manager's {weights}")
        assert rep["local_weight_bytes"] < 0.01 * weights, (name, rep)
        assert rep["foreign_weight_bytes"] >= 0.99 * weights, (name, rep)
        assert rep["opened_pool_bytes"] >= stack.manager["kv_pool_bytes"]
        assert rep["max_total_num_tokens"] == stack.manager["max_total_num_tokens"]
        assert rep["attach_allocated_bytes"] < 0.05 * stack.manager["kv_pool_bytes"] + (64 << 20)


def test_prefix_written_by_one_worker_is_read_by_the_other(stack):
    rng = random.Random(1)
    p = [rng.randrange(100, 49000) for _ in range(P_LEN)]
    q = [rng.randrange(100, 49000) for _ in range(Q_LEN)]
    ref = stack.call("prefill", "run", p + q, False, DECODE)
    assert ref["prefix_len"] == 0
    wrote = stack.call("prefill", "run", p, True, 0)
    seen_a = stack.call("prefill", "read_k", wrote["slots"])
    seen_b = stack.call("decode", "read_k", wrote["slots"])
    assert seen_a == seen_b and seen_a["k_abs"] > 0

    got = stack.call("decode", "run", p + q, True, DECODE)
    assert got["prefix_len"] == P_LEN
    assert got["slots"][:P_LEN] == wrote["slots"]
    control = stack.call("decode", "run", q, False, 0)

    diff = float(np.abs(got["logits"] - ref["logits"]).max())
    control_diff = float(np.abs(control["logits"] - ref["logits"]).max())
    print(f"max |logit diff| shared-prefix vs reference {diff:.4g}; without the prefix "
          f"{control_diff:.4g}; tokens {got['tokens']} vs {ref['tokens']}")
    assert diff < 0.1 * control_diff
    assert int(np.argmax(got["logits"])) == int(np.argmax(ref["logits"]))
    assert got["tokens"][0] == ref["tokens"][0]


def test_invariant_holds_and_nothing_is_held(stack):
    report = stack.call("decode", "stats")["report"]
    assert report.ok, report.errors
    assert report.lock_refs == 0
    assert report.free + report.evictable + report.in_use == report.capacity
    assert report.req_rows_free == report.req_rows_capacity
