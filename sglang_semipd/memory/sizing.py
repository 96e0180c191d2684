"""How big the shared KV pool may be when two workers share the GPU (pure arithmetic, no torch).

Stock SGLang splits GPU memory with ``--mem-fraction-static f``: ``f`` of the card holds the
weights and the KV pool ("static"), the remaining ``1 - f`` is left for the one process's
activations, CUDA graphs, workspaces and CUDA context. Semi-PD keeps one copy of the weights and
one KV pool, but runs **two** worker processes (plus the memory manager's context), each of
which needs that dynamic headroom. The reference prototype sized the pool as if the decode
process were alone and ran out of memory; here every process's headroom is paid for first:

    kv_bytes = f * total - weights - (workers - 1) * (1 - f) * total - manager_overhead

so with the same ``--mem-fraction-static`` each worker keeps exactly the headroom stock SGLang
would have, and the pool shrinks by the extra headroom instead.
"""

from __future__ import annotations

import dataclasses


class PoolSizingError(ValueError):
    """The settings leave no memory for a KV pool."""


@dataclasses.dataclass(frozen=True)
class PoolBudget:
    """The outcome of :func:`kv_pool_budget`, all in bytes except ``tokens``."""

    total: int
    weights: int
    per_worker_headroom: int
    manager_overhead: int
    kv_bytes: int
    tokens: int

    @property
    def static_fraction_for_manager(self) -> float:
        """The ``mem_fraction_static`` to hand SGLang's own sizing in the memory manager."""
        return (self.weights + self.kv_bytes) / self.total


def kv_pool_budget(total_bytes: int, mem_fraction_static: float, weights_bytes: int,
                   bytes_per_token: int, workers: int = 2,
                   manager_overhead_bytes: int = 0) -> PoolBudget:
    """KV pool size for ``workers`` processes sharing one GPU; see the module docstring."""
    if not 0.0 < mem_fraction_static < 1.0:
        raise PoolSizingError(f"mem_fraction_static {mem_fraction_static} outside (0, 1)")
    if min(total_bytes, bytes_per_token) <= 0 or weights_bytes < 0 or workers < 1:
        raise PoolSizingError("sizes must be positive and workers >= 1")
    static = int(mem_fraction_static * total_bytes)
    headroom = total_bytes - static  # what stock SGLang leaves its one process
    kv = static - weights_bytes - (workers - 1) * headroom - manager_overhead_bytes
    if kv < bytes_per_token:
        raise PoolSizingError(
            f"no room for a KV pool: {total_bytes / 2**30:.1f} GiB x {mem_fraction_static} "
            f"static - {weights_bytes / 2**30:.1f} GiB weights - {workers - 1} extra worker "
            f"headroom of {headroom / 2**30:.1f} GiB leaves {kv / 2**30:.2f} GiB; raise "
            "--mem-fraction-static or use a smaller model")
    return PoolBudget(total=total_bytes, weights=weights_bytes, per_worker_headroom=headroom,
                      manager_overhead=manager_overhead_bytes, kv_bytes=kv,
                      tokens=kv // bytes_per_token)


def mha_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                        v_head_dim: int | None = None) -> int:
    """K and V bytes of one token across all layers of an MHA/GQA model."""
    return layers * kv_heads * (head_dim + (v_head_dim or head_dim)) * dtype_bytes


def mla_bytes_per_token(layers: int, kv_lora_rank: int, qk_rope_head_dim: int,
                        dtype_bytes: int) -> int:
    """Latent-KV bytes of one token across all layers of an MLA model."""
    return layers * (kv_lora_rank + qk_rope_head_dim) * dtype_bytes


def shared_pool_available_bytes(free_now: int, pre_model_load_free: int,
                                mem_fraction_static: float, workers: int = 2,
                                worker_context_bytes: int = 0) -> int:
    """KV budget for the memory manager's pool, in SGLang's own profiling terms.

    Stock SGLang (``KVCacheConfigurator._profile_available_bytes``) gives the pool what is
    free after loading the weights minus ``pre_model_load_free * (1 - f)``: one process's
    runtime headroom. The memory manager keeps that headroom for *each* worker and also
    leaves room for each worker's CUDA context, which does not exist yet when it profiles
    (its own context and the weights are already out of ``free_now``). Raises
    :class:`PoolSizingError` when nothing is left.
    """
    if not 0.0 < mem_fraction_static < 1.0:
        raise PoolSizingError(f"mem_fraction_static {mem_fraction_static} outside (0, 1)")
    if workers < 1 or min(free_now, pre_model_load_free) <= 0 or worker_context_bytes < 0:
        raise PoolSizingError("sizes must be positive and workers >= 1")
    headroom = int(pre_model_load_free * (1.0 - mem_fraction_static))
    rest = free_now - workers * (headroom + worker_context_bytes)
    if rest <= 0:
        need = 1.0 - (free_now / workers - worker_context_bytes) / pre_model_load_free
        raise PoolSizingError(
            f"no room for a shared KV pool: {free_now / 2**30:.1f} GiB free after loading "
            f"the weights, {workers} workers need {headroom / 2**30:.1f} GiB headroom + "
            f"{worker_context_bytes / 2**30:.1f} GiB context each; raise "
            f"--mem-fraction-static above {need:.3f}")
    return rest
