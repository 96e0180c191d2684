"""``--prefill-chunk-reserve``: the reserve's arithmetic, and SGLang's own ``PrefillAdder``
(with sglang-semipd's two patches applied) admitting waiting prompts next to a long prompt's
chunk on the CPU, with SGLang's ``RadixCache``, ``Req`` and allocators."""

from __future__ import annotations

from array import array

import pytest

from sglang_semipd import chunk_reserve
from sglang_semipd.chunk_reserve import plan_reserve

BUDGET = 256


def test_plan_reserve_takes_the_waiting_prompts_that_fit_up_to_the_cap():
    assert plan_reserve(BUDGET, 1000, [40, 30, 20], 1, 0.5) == (90, [0, 1, 2])
    # 500 does not fit in 128: skipped, and 20 (behind it) overtakes it
    assert plan_reserve(BUDGET, 1000, [40, 30, 500, 20], 1, 0.5) == (90, [0, 1, 3])
    # session 15's burst: long prompts at the head, short ones behind them
    assert plan_reserve(BUDGET, 1000, [900, 700, 40, 800, 30, 100], 1, 0.5) == (70, [2, 4])
    assert plan_reserve(BUDGET, 1000, [200], 1, 0.5) == (0, [])  # nothing fits in 128
    assert plan_reserve(BUDGET, 1000, [40, 30], 16, 0.5) == (80, [0, 1])  # pages: 48 + 32
    assert plan_reserve(BUDGET, 1000, [40, 30], 1, 0.0) == (0, [])  # off: SGLang's order
    assert plan_reserve(BUDGET, 1000, [], 1, 0.5) == (0, [])
    assert plan_reserve(BUDGET, 1000, [0], 1, 0.5) == (1, [0])  # an empty prompt: one slot


def test_plan_reserve_leaves_sglangs_order_when_everything_fits_anyway():
    assert plan_reserve(BUDGET, 100, [40, 30], 1, 0.5) == (0, [])  # 170 <= 256: all served
    assert plan_reserve(BUDGET, 200, [40, 30], 1, 0.5) == (70, [0, 1])  # 270 > 256
    assert plan_reserve(BUDGET, 0, [40], 1, 0.5) == (0, [])
    # the chunk ends this round, but a long prompt queued first would take the rest of the
    # budget as the next chunked request: the short one still moves ahead of it
    assert plan_reserve(BUDGET, 100, [900, 40], 1, 0.5) == (40, [1])


def test_overtaking_order_keeps_both_parts_in_queue_order():
    assert chunk_reserve.overtaking_order(6, [2, 4]) == [2, 4, 0, 1, 3, 5]
    assert chunk_reserve.overtaking_order(3, [0, 1, 2]) == [0, 1, 2]
    assert chunk_reserve.overtaking_order(2, []) == [0, 1]


@pytest.mark.parametrize("fraction,page", [(-0.1, 1), (0.95, 1), (0.5, 0)])
def test_plan_reserve_refuses_bad_arguments(fraction, page):
    with pytest.raises(ValueError):
        plan_reserve(BUDGET, 1000, [10], page, fraction)


def test_holding_is_scoped_and_the_chunk_keeps_a_page():
    assert chunk_reserve.current() == 0
    with chunk_reserve.holding(70):
        assert chunk_reserve.current() == 70
        assert chunk_reserve.chunk_budget(256, 1) == 70
        assert chunk_reserve.chunk_budget(50, 16) == 34  # 16 tokens stay with the chunk
        assert chunk_reserve.chunk_budget(10, 16) == 0
        with chunk_reserve.holding(0):
            assert chunk_reserve.current() == 0
        assert chunk_reserve.current() == 70
    assert chunk_reserve.current() == 0
    with pytest.raises(ValueError):
        with chunk_reserve.holding(-1):
            pass
    with pytest.raises(RuntimeError):
        with chunk_reserve.holding(5):
            raise RuntimeError("the reserve ends with the call")
    assert chunk_reserve.current() == 0


# ------------------------------------------------------------- SGLang's PrefillAdder
@pytest.fixture(scope="module")
def sglang_context(tmp_path_factory):
    """SGLang's published runtime context, as a prefill worker process has it (the adder
    reads it)."""
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    from sglang_semipd.testing.model_maker import make_model
    from sglang_semipd.workers import role_server_args

    model = make_model(tmp_path_factory.mktemp("m") / "tiny", "tiny", "bfloat16", seed=0)
    sa = ServerArgs(model_path=str(model), device="cpu", attention_backend="triton",
                    sampling_backend="pytorch", grammar_backend="none")
    publish(role_server_args("prefill", sa), role="scheduler")
    from sglang.srt.managers.schedule_policy import PrefillAdder

    from sglang_semipd import patches

    saved = {name: PrefillAdder.__dict__[name] for name in ("add_chunked_req", "add_one_req")}
    for patch in patches.WORKER_PATCHES:  # only the adder's two; restored afterwards
        if patch.qualname.startswith("PrefillAdder."):
            patch.apply()
    yield
    for name, original in saved.items():
        setattr(PrefillAdder, name, original)
    reset_context()


def _adder_setup():
    import torch
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache

    pool = ReqToTokenPool(16, 2048, device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(8192, torch.bfloat16, "cpu", None, False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=pool,
                                      token_to_kv_pool_allocator=alloc, page_size=1))
    return tree, alloc


def _req(rid: str, n: int, base: int):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=16)
    params.normalize(None)
    return Req(rid, "", array("q", range(base, base + n)), params)


def _round(tree, alloc, chunked, waiting, reserve: int):
    """One admission round the way ``Scheduler._get_new_batch_prefill_raw`` runs it: the
    chunked request first, then the waiting queue until a request is not CONTINUE."""
    from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

    adder = PrefillAdder(1, tree, alloc, None, 0.5, 16384, BUDGET)
    with chunk_reserve.holding(reserve):
        chunked.init_next_round_input()
        still = adder.add_chunked_req(chunked)
        results = []
        for req in waiting:
            req.init_next_round_input(tree)
            res = adder.add_one_req(req, has_chunked_req=still is not None,
                                    truncation_align_size=None)
            results.append(res)
            if res != AddReqResult.CONTINUE:
                break
    return adder, still, results


def _chunked_req(tree, n: int = 1000):
    req = _req("long", n, 10_000)
    req.init_next_round_input(tree)
    return req


@pytest.mark.parametrize("reserve", [0, 70])
def test_sglangs_adder_serves_waiting_prompts_with_the_chunk_only_under_a_reserve(sglang_context, reserve):
    from sglang.srt.managers.schedule_policy import AddReqResult

    tree, alloc = _adder_setup()
    long = _chunked_req(tree)
    waiting = [_req("a", 40, 100), _req("b", 30, 200), _req("c", 500, 300)]
    adder, still, results = _round(tree, alloc, long, waiting, reserve)
    assert still is long and adder.new_chunked_req is None
    if reserve == 0:  # SGLang's order: the chunk takes the whole budget, nobody joins
        assert long.extend_range.length == BUDGET
        assert [r.rid for r in adder.can_run_list] == ["long"]
        assert results == [AddReqResult.OTHER]
    else:
        assert long.extend_range.length == BUDGET - reserve
        assert [r.rid for r in adder.can_run_list] == ["long", "a", "b"]
        # "b" takes the last of the budget: SGLang's budget state then ends the round
        assert results == [AddReqResult.CONTINUE, AddReqResult.OTHER]
        assert [r.extend_range.length for r in adder.can_run_list[1:]] == [40, 30]


def test_no_second_chunked_request_in_the_leftover_budget(sglang_context):
    """Under a reserve larger than what the waiting prompts take, the leftover budget must
    not start a second chunked request (SGLang's scheduler asserts there is one)."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    tree, alloc = _adder_setup()
    long = _chunked_req(tree)
    waiting = [_req("a", 40, 100), _req("big", 500, 300)]
    adder, still, results = _round(tree, alloc, long, waiting, 100)  # 60 left after "a"
    assert still is long and adder.new_chunked_req is None
    assert [r.rid for r in adder.can_run_list] == ["long", "a"]
    assert results == [AddReqResult.CONTINUE, AddReqResult.OTHER]
    # the same round without the patch's guard would have cut "big" into a second chunk:
    # SGLang's own add_one_req with the same leftover budget does exactly that
    from sglang.srt.managers.schedule_policy import PrefillAdder

    adder2 = PrefillAdder(1, tree, alloc, None, 0.5, 16384, 60)
    big = _req("big2", 500, 5000)
    big.init_next_round_input(tree)
    adder2.add_one_req(big, has_chunked_req=True, truncation_align_size=None)
    assert adder2.new_chunked_req is big and big.extend_range.length == 60


def test_a_finishing_chunk_leaves_sglangs_behaviour_alone(sglang_context):
    """When the chunked prompt's last piece fits beside the reserve, nothing is refused:
    a long waiting prompt may start the next chunked request as in SGLang."""
    tree, alloc = _adder_setup()
    long = _chunked_req(tree, 100)
    waiting = [_req("a", 40, 100), _req("big", 500, 300)]
    adder, still, _ = _round(tree, alloc, long, waiting, 70)
    assert still is None  # finished in this chunk
    assert [r.rid for r in adder.can_run_list] == ["long", "a", "big"]
    assert adder.new_chunked_req is waiting[1]


def test_prefill_worker_plans_the_reserve_from_its_queue(sglang_context):
    from types import SimpleNamespace

    from sglang_semipd.workers import make_prefill_scheduler_cls

    tree, _ = _adder_setup()
    worker = object.__new__(make_prefill_scheduler_cls())
    worker.chunked_req, worker.chunked_prefill_size, worker.page_size = \
        _chunked_req(tree), BUDGET, 1
    worker.semipd_chunk_reserve = 0.5

    def queue():
        return [_req("long1", 900, 100), _req("a", 40, 2000), _req("long2", 800, 3000),
                _req("b", 30, 4000)]

    worker.waiting_queue = queue()
    same_list = worker.waiting_queue
    assert worker._chunk_reserve_now() == 70
    assert [r.rid for r in worker.waiting_queue] == ["a", "b", "long1", "long2"]
    assert worker.waiting_queue is same_list  # SGLang's list, reordered in place
    for change in (dict(semipd_chunk_reserve=0.0), dict(chunked_req=None),
                   dict(waiting_queue=[]), dict(chunked_prefill_size=-1)):
        other = object.__new__(type(worker))
        other.__dict__.update(worker.__dict__, waiting_queue=queue())
        other.__dict__.update(change)
        before = [r.rid for r in other.waiting_queue]
        assert other._chunk_reserve_now() == 0, change
        assert [r.rid for r in other.waiting_queue] == before  # untouched
    seen = []
    base = type(worker).__mro__[1]  # the mixin's / SGLang's get_new_batch_prefill

    def record(self, running_batch):
        seen.append((chunk_reserve.current(), [r.rid for r in self.waiting_queue]))
        return SimpleNamespace(batch="plan")

    import unittest.mock

    worker.waiting_queue = queue()
    with unittest.mock.patch.object(base, "get_new_batch_prefill", record, create=True):
        assert worker.get_new_batch_prefill(None).batch == "plan"
    assert seen == [(70, ["a", "b", "long1", "long2"])] and chunk_reserve.current() == 0


def test_a_round_with_overtaking_prompts_on_sglangs_adder(sglang_context):
    """The worker's reorder and reserve, then SGLang's admission round: the short prompts
    queued behind long ones join the chunk; the long ones wait, none is cut into a chunk."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    from sglang_semipd.workers import make_prefill_scheduler_cls

    tree, alloc = _adder_setup()
    worker = object.__new__(make_prefill_scheduler_cls())
    long = _chunked_req(tree)
    worker.chunked_req, worker.chunked_prefill_size, worker.page_size = long, BUDGET, 1
    worker.semipd_chunk_reserve = 0.5
    worker.waiting_queue = [_req("long1", 900, 100), _req("a", 40, 2000),
                            _req("long2", 800, 3000), _req("b", 30, 4000)]
    reserve = worker._chunk_reserve_now()
    adder, still, results = _round(tree, alloc, long, worker.waiting_queue, reserve)
    assert still is long and adder.new_chunked_req is None
    assert [r.rid for r in adder.can_run_list] == ["long", "a", "b"]
    assert long.extend_range.length == BUDGET - 70
    assert results[-1] == AddReqResult.OTHER
