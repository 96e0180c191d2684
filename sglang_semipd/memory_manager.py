"""The memory-manager process: one per GPU, the single owner of the weights, the KV pool and
the allocation state (ARCHITECTURE.md sections 2 and 5).

It is built from SGLang's own pieces:

* **Weights.** An SGLang ``ModelRunner`` loads the model once (SGLang's loader and
  post-processing, so fused, transposed or quantisation-derived tensors are the ones shared).
  The parameters and buffers are exported by SGLang's ``WeightCacheDaemon``
  (``srt/weight_cache``): this process *is* that daemon for its workers, on a private socket.
  Workers load with ``--weight-cache-mode daemon`` (``IpcModelLoader``: meta-device model,
  every tensor a CUDA-IPC view; no fallback to disk, so no second copy by accident).
* **KV pool.** The same ``ModelRunner.alloc_memory_pool()`` builds whatever pools SGLang picks
  for the model (MHA, MLA, ...) and the ``req_to_token`` table, sized by
  :class:`~sglang_semipd.memory.pool_hooks.ManagerPoolHooks` for two workers, and recorded
  for export (:class:`~sglang_semipd.protocol.PoolManifest`).
* **Allocation state.** A :class:`~sglang_semipd.memory.service.KVStateService` (token slots,
  request rows, SGLang's ``RadixCache``) behind the ZeroMQ
  :class:`~sglang_semipd.memory.rpc.KVStateServer`, which also hands out the manifest.

Lifecycle: :func:`run_memory_manager` sends one ``ready`` dict on ``ready_conn`` once both
sockets accept connections, then serves until SIGTERM/SIGINT or a KV-state ``Shutdown``; at
exit both sockets are removed and the pools and weights freed with the process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Optional

from sglang_semipd.logs import configure_logging

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MemoryManagerSpec:
    """Everything the memory-manager process needs (picklable: spawn passes it)."""

    server_args: Any  # sglang ServerArgs as the user gave them
    kv_endpoint: str  # ZeroMQ endpoint of the KV-state RPC, e.g. ipc:///tmp/x/kv.sock
    weight_socket: str  # Unix socket path of the weight-cache protocol
    nccl_port: int
    gpu_id: int = 0
    tp_rank: int = 0
    workers: int = 2
    worker_context_bytes: int = 512 << 20
    log_level: Optional[str] = None


def weight_cache_config(server_args: Any, model_config: Any, ps: Any) -> Any:
    """The ``CacheConfig`` fingerprint SGLang's ``IpcModelLoader`` will ask for; computed as
    ``WeightCacheDaemon.load`` does, before loading (loading may mutate the quant config)."""
    from sglang.srt.weight_cache.protocol import (CacheConfig, check_ipc_quant_support,
                                                  compute_env_stamp, get_quant_method_name,
                                                  hash_quant_config)

    quant_config = getattr(model_config.hf_config, "quantization_config", None)
    quant_method = get_quant_method_name(model_config.quantization)
    if not quant_method and quant_config is not None:
        quant_method = get_quant_method_name(quant_config)
    check_ipc_quant_support(quant_method, quant_config, where="daemon")
    arch = model_config.hf_config.architectures
    return CacheConfig(model_path=model_config.model_path, model_arch=arch[0] if arch else "",
                       tp_size=ps.tp_size, tp_rank=ps.tp_rank, pp_size=ps.pp_size,
                       pp_rank=ps.pp_rank, dp_size=ps.dp_size, ep_size=ps.moe_ep_size,
                       quant_method=quant_method,
                       quant_config_hash=hash_quant_config(quant_config),
                       dtype=str(model_config.dtype), revision=model_config.revision or "",
                       **compute_env_stamp())


def manager_server_args(server_args: Any) -> Any:
    """The memory manager's copy of the user's ServerArgs: it loads from disk itself."""
    sa = copy.deepcopy(server_args)
    sa.override("sglang-semipd memory manager", weight_cache_mode="off",
                weight_cache_socket=None)
    return sa


def _wait_then_report(ready_path: str, ready_conn: Any, info: dict, stop: threading.Event
                      ) -> None:
    while not stop.is_set():
        if os.path.exists(ready_path):
            if ready_conn is not None:
                ready_conn.send(info)
            logger.info("memory manager ready: %s", info)
            return
        time.sleep(0.05)


def set_process_title(role: str) -> None:
    """``sglang::semipd_<role>`` in ps/top, next to SGLang's ``sglang::scheduler`` (the
    semi-PD scheduler process) and its other ``sglang::`` processes."""
    try:
        import setproctitle
    except ImportError:  # cosmetic only
        return
    setproctitle.setproctitle(f"sglang::semipd_{role}")


def run_memory_manager(spec: MemoryManagerSpec, ready_conn: Any = None) -> None:
    """Process entry (``multiprocessing`` target); see the module docstring."""
    from sglang.srt.utils import kill_itself_when_parent_died

    kill_itself_when_parent_died()  # a SIGKILLed semi-PD scheduler takes the manager along
    set_process_title("memory_manager")
    if spec.log_level:
        configure_logging(spec.log_level, "memory-manager")
    try:
        _serve(spec, ready_conn)
    except BaseException as exc:
        logger.exception("memory manager failed")
        if ready_conn is not None:
            ready_conn.send({"error": repr(exc)})
        raise


def _serve(spec: MemoryManagerSpec, ready_conn: Any) -> None:
    phases: dict[str, float] = {}  # seconds per start-up phase (the server's critical path)
    t0 = time.monotonic()

    def phase(name: str) -> None:
        nonlocal t0
        now = time.monotonic()
        phases[name] = round(now - t0, 2)
        t0 = now

    import torch
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.weight_cache.daemon import WeightCacheDaemon

    from sglang_semipd import patches
    from sglang_semipd.memory.pool_attach import shared_bytes
    from sglang_semipd.memory.pool_hooks import ManagerPoolHooks, activate
    from sglang_semipd.memory.rpc import KVStateServer
    from sglang_semipd.memory.service import KVStateService
    from sglang_semipd.runner import (build_model_runner, module_tensor_storages,
                                      parallel_state, publish_server_args,
                                      share_derived_weights)

    if os.path.exists(spec.weight_socket):
        raise RuntimeError(f"weight socket {spec.weight_socket} already exists: another "
                           "memory manager is running, or a stale one left it behind")
    phase("imports")
    patches.apply("memory_manager")
    sa = manager_server_args(spec.server_args)
    publish_server_args(sa)
    WeightCacheDaemon._assert_ipc_compatible_allocator()
    torch.cuda.set_device(spec.gpu_id)
    cache_config = weight_cache_config(sa, ModelConfig.from_server_args(sa),
                                       parallel_state(sa, spec.gpu_id, spec.tp_rank))
    hooks = ManagerPoolHooks(workers=spec.workers,
                             worker_context_bytes=spec.worker_context_bytes)
    phase("cuda_and_config")
    with activate(hooks):
        runner = build_model_runner(sa, spec.gpu_id, spec.tp_rank, spec.nccl_port)
        phase("model_runner_and_weights")
        runner.alloc_memory_pool()
    phase("kv_pools")
    derived = share_derived_weights(runner.model)  # e.g. DeepSeek's MLA w_kc / w_vc
    weights = module_tensor_storages(runner.model)
    weights_bytes = sum(n for n, _ in weights.values())
    manifest = hooks.manifest(spec.weight_socket, weights_bytes)
    service = KVStateService(runner.max_total_num_tokens, runner.page_size,
                             req_rows=runner.req_to_token_pool.size,
                             eviction_policy=sa.radix_eviction_policy)
    kv_server = KVStateServer(service, spec.kv_endpoint, manifest=manifest)
    kv_server.bind()

    daemon = WeightCacheDaemon(model_path=sa.model_path, gpu_id=spec.gpu_id,
                               tp_size=sa.tp_size, tp_rank=spec.tp_rank)
    daemon.socket_path, daemon.ready_path = spec.weight_socket, spec.weight_socket + ".ready"
    daemon.model, daemon.config = runner.model, cache_config
    daemon._export_state()
    phase("kv_service_and_weight_export")

    stop = threading.Event()

    def serve_kv() -> None:
        from sglang_semipd.stack_sampler import maybe_start

        maybe_start("memory_manager-kv")  # diagnostics, off unless its variable is set
        try:
            kv_server.serve_forever(stop)
        finally:
            daemon._running = False  # a KV-state Shutdown stops the weight socket too

    free, total = torch.cuda.mem_get_info(spec.gpu_id)
    info = {"pid": os.getpid(), "kv_endpoint": spec.kv_endpoint,
            "weight_socket": spec.weight_socket, "weights_bytes": weights_bytes,
            "weight_storages": len(weights), "derived_weights": len(derived),
            "max_total_num_tokens": runner.max_total_num_tokens,
            "req_rows": runner.req_to_token_pool.size, "page_size": runner.page_size,
            "kv_pool_bytes": shared_bytes([runner.req_to_token_pool, runner.token_to_kv_pool]),
            "pool_tensors": len(manifest.shared), "gpu_used_bytes": total - free,
            "cuda_allocated_bytes": torch.cuda.memory_allocated(spec.gpu_id),
            "startup_phases_s": phases}
    threads = [threading.Thread(target=serve_kv, name="kv-state", daemon=True),
               threading.Thread(target=_wait_then_report, name="ready",
                                args=(daemon.ready_path, ready_conn, info, stop), daemon=True)]
    for t in threads:
        t.start()
    try:
        daemon.serve()  # main thread: SGLang's loop installs SIGTERM/SIGINT handlers
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        kv_server.close()
        logger.info("memory manager stopped")
