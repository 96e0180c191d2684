"""Pool hooks on the CPU: the patch dispatch, and a worker attaching through SGLang's pool
construction to a live memory-manager process (real ZeroMQ, shared-memory tensors)."""

from __future__ import annotations

import multiprocessing as mp
from array import array

import pytest

from sglang_semipd import patches
from sglang_semipd.memory.client import KVStateClient
from sglang_semipd.memory.pool_hooks import activate, active_hooks
from sglang_semipd.memory.rpc import KVStateServerConfig, run_kv_state_server
from sglang_semipd.testing.pools import CPU_POOL_TOKENS, CPU_REQ_ROWS
from sglang_semipd.testing.procs import wait_for_kv_server


def test_pool_patches_name_real_sglang_methods_with_the_expected_parameters():
    import importlib
    import inspect

    expected = {"_profile_available_bytes": ["self", "pre_model_load_memory"],
                "_resolve_memory_pool_config": ["self", "pre_model_load_memory"],
                "_init_pools": ["self", "sizes", "req_to_token_pool",
                                "token_to_kv_pool_allocator"]}
    for role in ("memory_manager", "worker"):
        names = {p.qualname.rpartition(".")[2] for p in patches.PATCHES[role]}
        assert names >= set(expected)
    for p in patches.POOL_PATCHES:
        owner = importlib.import_module(p.module)
        for part in p.qualname.split("."):
            owner = getattr(owner, part)
        original = inspect.unwrap(owner)
        if getattr(owner, "__semipd_patched__", False):
            continue  # applied earlier in this process: the signature check ran then
        assert list(inspect.signature(original).parameters) == \
            expected[p.qualname.rpartition(".")[2]]


def test_manager_rope_patch_names_the_function_model_runner_calls():
    import inspect

    from sglang.srt.model_executor import model_runner
    from sglang.srt.utils.common import reserve_rope_cache_for_long_sequences as stock

    (patch,) = patches.MANAGER_PATCHES
    assert patch.module == model_runner.__name__
    current = getattr(model_runner, patch.qualname)
    assert current is stock or getattr(current, "__semipd_patched__", False)
    assert list(inspect.signature(stock).parameters)[:3] == ["model", "server_args",
                                                             "model_config"]


def test_delegating_patch_calls_hooks_only_while_active():
    class Configurator:
        def _init_pools(self, *, sizes):
            return ("stock", sizes)

    replacement = patches._delegate_to_pool_hooks("init_pools")(Configurator._init_pools)

    class Hooks:
        def init_pools(self, original, kvc, **kw):
            return ("hooked", original(kvc, **kw))

    kvc = Configurator()
    assert replacement(kvc, sizes=3) == ("stock", 3)
    with activate(Hooks()) as h:
        assert active_hooks() is h
        assert replacement(kvc, sizes=3) == ("hooked", ("stock", 3))
    assert active_hooks() is None
    assert replacement(kvc, sizes=4) == ("stock", 4)


class _Sizes:
    max_running_requests = CPU_REQ_ROWS


def _fake_init_pools(kvc, *, sizes, req_to_token_pool, token_to_kv_pool_allocator):
    """Stands in for SGLang's _init_pools on the CPU: the same constructors in the same order."""
    from sglang.srt.mem_cache.kv_cache_configurator import _InitializedPools

    from sglang_semipd.testing.pools import build_cpu_pools_with_allocator

    req, kv, alloc = build_cpu_pools_with_allocator()
    return _InitializedPools(req_to_token_pool=req, token_to_kv_pool=kv,
                             token_to_kv_pool_allocator=alloc)


class _Kvc:
    device = "cpu"


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    endpoint = f"ipc://{tmp_path_factory.mktemp('hooks')}/kv.sock"
    config = KVStateServerConfig(endpoint, CPU_POOL_TOKENS, req_rows=CPU_REQ_ROWS,
                                 pool_builder="sglang_semipd.testing.pools:"
                                              "build_cpu_pools_with_allocator",
                                 pool_device="cpu", log_level="WARNING")
    proc = mp.get_context("spawn").Process(target=run_kv_state_server, args=(config,),
                                           daemon=True)
    proc.start()
    sup = KVStateClient(endpoint, "supervisor", timeout_s=15, register=False)
    wait_for_kv_server(sup, proc)
    yield endpoint, sup
    sup.shutdown()
    sup.close()
    proc.join(30)


def test_worker_hooks_attach_pools_and_hand_state_to_the_manager(manager):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_semipd.memory.pool_hooks import WorkerPoolHooks
    from sglang_semipd.memory.remote_allocator import RemoteTokenAllocator
    from sglang_semipd.memory.remote_req_pool import RemoteReqToTokenPool

    endpoint, sup = manager
    with KVStateClient(endpoint, "worker", role="prefill") as client:
        hooks = WorkerPoolHooks(client.pool_manifest(), client)
        pools = hooks.init_pools(_fake_init_pools, _Kvc(), sizes=_Sizes(),
                                 req_to_token_pool=None, token_to_kv_pool_allocator=None)
        assert isinstance(pools.token_to_kv_pool_allocator, RemoteTokenAllocator)
        rows = pools.req_to_token_pool
        assert isinstance(rows, RemoteReqToTokenPool)
        assert len(hooks.opened) == 1 + 2 * 2  # req_to_token + K and V of 2 layers

        reqs = [Req(f"r{i}", "", array("q", [1, 2, 3]), SamplingParams()) for i in range(3)]
        got = rows.alloc(reqs)
        assert sorted(got) == sorted({r.req_pool_idx for r in reqs}) and 0 not in got
        assert sup.stats().req_rows_held[client.client_id] == 3
        assert rows.available_size() == CPU_REQ_ROWS - 3
        more = [Req(f"m{i}", "", array("q", [1]), SamplingParams())
                for i in range(CPU_REQ_ROWS)]
        assert rows.alloc(more) is None  # manager out of rows: SGLang's contract
        assert all(r.req_pool_idx is None for r in more)
        for r in reqs:
            rows.free(r)
        assert sup.stats().req_rows_free == CPU_REQ_ROWS

        slots = pools.token_to_kv_pool_allocator.alloc(5)
        assert sup.stats().client_held[client.client_id] >= 5
        pools.token_to_kv_pool_allocator.free(slots)
        pools.token_to_kv_pool_allocator.close()
        client.goodbye()
        hooks.close()
    report = sup.check_invariant()
    assert report.ok and report.in_use == 0 and report.free == report.capacity


def test_worker_hooks_refuse_to_size_a_pool(manager):
    from sglang_semipd.memory.pool_hooks import WorkerPoolHooks

    endpoint, _ = manager
    with KVStateClient(endpoint, "w2") as client:
        hooks = WorkerPoolHooks(client.pool_manifest(), client)
        with pytest.raises(RuntimeError, match="must not size"):
            hooks.profile_available_bytes(None, _Kvc(), 1.0)
        with pytest.raises(RuntimeError, match="no pool sizes"):
            hooks.resolve_memory_pool_config(None, _Kvc(), 1.0)
        client.goodbye()


def test_manager_and_worker_server_args_are_overridden_copies(tmp_path):
    import pickle

    from sglang.srt.server_args import ServerArgs

    from sglang_semipd import protocol as P
    from sglang_semipd.memory_manager import manager_server_args
    from sglang_semipd.testing.model_maker import make_model
    from sglang_semipd.worker_attach import worker_server_args

    model = make_model(tmp_path / "tiny", "tiny", "bfloat16", seed=0)
    sa = ServerArgs(model_path=str(model), device="cpu", attention_backend="torch_native",
                    sampling_backend="pytorch", grammar_backend="none")
    manifest = P.PoolManifest(device="cuda", records=(), weight_socket="/tmp/w.sock")
    m, w = manager_server_args(sa), worker_server_args(sa, manifest)
    assert (sa.weight_cache_mode, m.weight_cache_mode, w.weight_cache_mode) == \
        ("off", "off", "daemon")
    assert w.weight_cache_socket == "/tmp/w.sock" and sa.weight_cache_socket is None
    assert pickle.loads(pickle.dumps(w)).weight_cache_socket == "/tmp/w.sock"  # spawn-able
    with pytest.raises(ValueError, match="no weight socket"):
        worker_server_args(sa, P.PoolManifest(device="cuda", records=()))


def test_transfer_over_zeromq_moves_a_request_to_another_worker(manager):
    endpoint, sup = manager
    with KVStateClient(endpoint, "p", role="prefill") as pre, \
            KVStateClient(endpoint, "d", role="decode") as dec:
        slots = pre.alloc(6)
        rows = pre.alloc_req_rows(1)
        reply = pre.transfer(dec.client_id, slots, rows)
        assert (reply.tokens, reply.rows, reply.locks) == (6, 1, 0)
        held = sup.stats()
        assert held.client_held.get(pre.client_id, 0) == 0
        assert held.client_held[dec.client_id] == 6
        assert held.req_rows_held[dec.client_id] == 1
        with pytest.raises(Exception):
            pre.transfer(dec.client_id, slots, rows)  # no longer the sender's
        dec.goodbye()
        pre.goodbye()
    assert sup.check_invariant().in_use == 0
