"""Attach an SGLang TP worker to the memory manager (weights and KV pool by CUDA IPC).

A worker (prefill or decode) registers with the memory manager's KV-state RPC, fetches the
:class:`~sglang_semipd.protocol.PoolManifest`, then builds SGLang's ``ModelRunner`` as usual,
with two differences:

* ``--weight-cache-mode daemon`` pointed at the manager's weight socket: SGLang's
  ``IpcModelLoader`` builds the model on the meta device and maps every parameter and buffer
  from the manager (a missing manager is an error, never a silent second load);
* the pool construction runs under :class:`~sglang_semipd.memory.pool_hooks.WorkerPoolHooks`
  (manager's sizes, replayed views, remote allocator and request rows).

:func:`attach_model_runner` is used by tests and tools; the semi-PD worker processes use
:func:`worker_server_args` and :func:`attached_pools` around SGLang's own scheduler instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator

from sglang_semipd import protocol as P

logger = logging.getLogger(__name__)


def worker_server_args(server_args: Any, manifest: P.PoolManifest) -> Any:
    """A worker's ServerArgs: the user's, loading weights from the memory manager."""
    if not manifest.weight_socket:
        raise ValueError("the memory manager's manifest names no weight socket")
    sa = copy.deepcopy(server_args)  # resolved ServerArgs are read-only: override a copy
    sa.override("sglang-semipd worker", weight_cache_mode="daemon",
                weight_cache_socket=manifest.weight_socket)
    return sa


@contextlib.contextmanager
def attached_pools(client: Any, manifest: P.PoolManifest) -> Iterator[Any]:
    """While active, SGLang's pool construction in this process attaches to the manager's."""
    from sglang_semipd import patches
    from sglang_semipd.memory.pool_hooks import WorkerPoolHooks, activate

    patches.apply("worker")
    with activate(WorkerPoolHooks(manifest, client)) as hooks:
        yield hooks


def attach_model_runner(server_args: Any, client: Any, gpu_id: int = 0, tp_rank: int = 0,
                        nccl_port: int = 0) -> tuple[Any, Any]:
    """``(model_runner, hooks)`` with weights and pools attached; ``client`` must be a
    registered :class:`~sglang_semipd.memory.client.KVStateClient`. Backends and CUDA graphs
    are the caller's (``init_attention_backends`` / ``init_cuda_graphs``); call
    ``hooks.close()`` at exit."""
    import torch

    from sglang_semipd.runner import build_model_runner, publish_server_args

    manifest = client.pool_manifest()
    sa = worker_server_args(server_args, manifest)
    publish_server_args(sa)
    torch.cuda.set_device(gpu_id)
    with attached_pools(client, manifest) as hooks:
        runner = build_model_runner(sa, gpu_id, tp_rank, nccl_port)
        runner.alloc_memory_pool()
    return runner, hooks
