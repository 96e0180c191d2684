"""Small SGLang pools for tests of the memory manager (importable by spawned processes).

``build_cpu_pools`` is a ``pool_builder`` for :class:`~sglang_semipd.memory.rpc.KVStateServerConfig`
and is also what an attaching test worker replays. Sizes match :data:`CPU_POOL_TOKENS`.
"""

from __future__ import annotations

from typing import Any

CPU_POOL_TOKENS = 256
CPU_REQ_ROWS = 8
CPU_LAYERS = 2
CPU_HEADS = 2
CPU_HEAD_DIM = 8


def build_cpu_pools() -> list[Any]:
    """[ReqToTokenPool, MHATokenToKVPool] on the CPU (SGLang's own classes)."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    return [ReqToTokenPool(size=CPU_REQ_ROWS, max_context_len=128, device="cpu",
                           enable_memory_saver=False),
            MHATokenToKVPool(size=CPU_POOL_TOKENS, page_size=1, dtype=torch.float32,
                             head_num=CPU_HEADS, head_dim=CPU_HEAD_DIM, layer_num=CPU_LAYERS,
                             device="cpu", enable_memory_saver=False)]


def build_cpu_pools_with_allocator() -> list[Any]:
    """:func:`build_cpu_pools` plus SGLang's token allocator over them, in the order SGLang's
    ``KVCacheConfigurator._init_pools`` builds them (req pool, KV pool, allocator)."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    req, kv = build_cpu_pools()
    alloc = TokenToKVPoolAllocator(CPU_POOL_TOKENS, torch.float32, "cpu", kv, need_sort=False)
    return [req, kv, alloc]
