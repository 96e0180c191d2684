"""What the memory manager and the workers do differently when SGLang builds its KV pools.

SGLang 0.5.17 builds the pools in ``KVCacheConfigurator.configure``:
``_resolve_memory_pool_config`` (sizes, via ``_profile_available_bytes``) then
``_init_pools`` (the constructors). :mod:`sglang_semipd.patches` replaces those three methods
with thin wrappers that call into the hooks object made active here, and fall through to
SGLang's original when none is active (so an unpatched code path behaves exactly as stock).

* :class:`ManagerPoolHooks` (memory manager): the budget pays two workers' headroom
  (:func:`~sglang_semipd.memory.sizing.shared_pool_available_bytes`) and the constructors
  run under :class:`~sglang_semipd.memory.pool_attach.RecordAllocations`, so the manager can
  export a :class:`~sglang_semipd.protocol.PoolManifest`.
* :class:`WorkerPoolHooks` (prefill / decode worker): the sizes are the manager's, the
  constructors run under :class:`~sglang_semipd.memory.pool_attach.ReplayAllocations` (views
  of the manager's KV buffers and ``req_to_token``, no copy), and allocation state is handed
  to the manager: the token allocator becomes a
  :class:`~sglang_semipd.memory.remote_allocator.RemoteTokenAllocator`, the request rows a
  :class:`~sglang_semipd.memory.remote_req_pool.RemoteReqToTokenPool`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, Optional

from sglang_semipd import protocol as P

logger = logging.getLogger(__name__)

_ACTIVE: list[Any] = []


def active_hooks() -> Optional[Any]:
    """The hooks object of the innermost :func:`activate` block, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def activate(hooks: Any) -> Iterator[Any]:
    """Make ``hooks`` answer SGLang's pool-building calls inside the block."""
    _ACTIVE.append(hooks)
    try:
        yield hooks
    finally:
        _ACTIVE.remove(hooks)


@dataclasses.dataclass
class ManagerPoolHooks:
    """Memory-manager side: size for ``workers`` processes, record the allocations."""

    workers: int = 2
    worker_context_bytes: int = 512 << 20
    recorder: Any = None
    pools: Any = None  # SGLang's _InitializedPools, kept alive by the manager
    sizes: Optional[P.PoolSizes] = None

    def profile_available_bytes(self, original: Callable, kvc: Any,
                                pre_model_load_memory: float) -> int:
        if not str(kvc.device).startswith("cuda"):
            return original(kvc, pre_model_load_memory)
        import torch

        from sglang.srt.runtime_context import get_schedule

        from sglang_semipd.memory.sizing import shared_pool_available_bytes

        free_now, _total = torch.cuda.mem_get_info(kvc.gpu_id)
        budget = shared_pool_available_bytes(
            free_now, int(pre_model_load_memory * (1 << 30)),
            get_schedule().mem_fraction_static, self.workers, self.worker_context_bytes)
        logger.info("shared KV budget %.2f GiB (%.2f GiB free after weights, %d workers)",
                    budget / 2**30, free_now / 2**30, self.workers)
        return budget

    def resolve_memory_pool_config(self, original: Callable, kvc: Any,
                                   pre_model_load_memory: float) -> Any:
        config = original(kvc, pre_model_load_memory)
        self.sizes = P.PoolSizes(
            max_total_num_tokens=int(config.max_total_num_tokens),
            max_running_requests=config.max_running_requests,
            full_max_total_num_tokens=config.full_max_total_num_tokens,
            swa_max_total_num_tokens=config.swa_max_total_num_tokens,
            mem_fraction_static=config.mem_fraction_static)
        return config

    def init_pools(self, original: Callable, kvc: Any, **kwargs: Any) -> Any:
        from sglang_semipd.memory.pool_attach import RecordAllocations

        self.recorder = RecordAllocations(str(kvc.device).split(":")[0])
        with self.recorder:
            self.pools = original(kvc, **kwargs)
        return self.pools

    def manifest(self, weight_socket: str = "", weights_bytes: int = 0) -> P.PoolManifest:
        """The manifest of the recorded pools (after SGLang built them)."""
        if self.recorder is None or self.pools is None:
            raise RuntimeError("no pools were built under these hooks")
        import msgspec

        base = self.recorder.manifest([self.pools.req_to_token_pool,
                                       self.pools.token_to_kv_pool])
        return msgspec.structs.replace(base, sizes=self.sizes, weight_socket=weight_socket,
                                       weights_bytes=weights_bytes)


@dataclasses.dataclass
class WorkerPoolHooks:
    """Worker side: the manager's sizes, replayed pools, remote allocation state."""

    manifest: P.PoolManifest
    client: Any  # KVStateClient (registered)
    lease_block: int = 256
    opened: Any = None  # OpenedTensors; close() at exit

    def profile_available_bytes(self, original: Callable, kvc: Any,
                                pre_model_load_memory: float) -> int:
        raise RuntimeError("a worker must not size its own KV pool")  # sizes are given

    def resolve_memory_pool_config(self, original: Callable, kvc: Any,
                                   pre_model_load_memory: float) -> Any:
        from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

        if self.manifest.sizes is None:
            raise RuntimeError("the memory manager's manifest carries no pool sizes")
        s = self.manifest.sizes
        return MemoryPoolConfig(max_total_num_tokens=s.max_total_num_tokens,
                                max_running_requests=s.max_running_requests,
                                full_max_total_num_tokens=s.full_max_total_num_tokens,
                                swa_max_total_num_tokens=s.swa_max_total_num_tokens,
                                mem_fraction_static=s.mem_fraction_static)

    def init_pools(self, original: Callable, kvc: Any, **kwargs: Any) -> Any:
        import msgspec

        from sglang_semipd.memory.pool_attach import ReplayAllocations
        from sglang_semipd.memory.remote_allocator import RemoteTokenAllocator
        from sglang_semipd.memory.remote_req_pool import adopt_req_pool
        from sglang_semipd.memory.tensor_ipc import OpenedTensors

        if self.opened is None:
            self.opened = OpenedTensors()
        replay = ReplayAllocations(self.manifest, self.opened)
        with replay:
            pools = original(kvc, **kwargs)
        replay.finish()
        allocator = RemoteTokenAllocator(self.client, device=kvc.device,
                                         kvcache=pools.token_to_kv_pool,
                                         lease_block=self.lease_block)
        adopt_req_pool(pools.req_to_token_pool, self.client)
        pools = msgspec.structs.replace(pools, token_to_kv_pool_allocator=allocator)
        logger.info("attached to the shared KV pool: %d tensors opened, %.1f MiB, %d slots",
                    len(self.opened), self.opened.nbytes / 2**20, self.client.capacity)
        return pools

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()
