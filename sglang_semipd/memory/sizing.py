"""How big the shared KV pool may be when two workers share the GPU (pure arithmetic, no torch).

Stock SGLang splits GPU memory with ``--mem-fraction-static f``: ``f`` of the card holds the
weights and the KV pool ("static"), the remaining ``1 - f`` is left for the one process's
activations, CUDA graphs, workspaces and CUDA context. Semi-PD keeps one copy of the weights and
one KV pool, but runs **two** worker processes (plus the memory manager's context), each of
which needs that dynamic headroom. The reference prototype sized the pool as if the decode
process were alone and ran out of memory; here every worker's headroom (and CUDA context) is
paid for first, in SGLang's own profiling terms (see :func:`shared_pool_available_bytes`), so
with the same ``--mem-fraction-static`` each worker keeps exactly the headroom stock SGLang would
give its one process, and the pool shrinks instead. SGLang's configurator turns the budget into
tokens (bytes per token of whatever pool it builds).
"""

from __future__ import annotations


class PoolSizingError(ValueError):
    """The settings leave no memory for a KV pool."""


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
