"""Build an SGLang ``ModelRunner`` outside SGLang's scheduler (memory manager, tests, tools).

The same construction as SGLang's own ``sglang.benchmark.one_batch.load_model`` (0.5.17): a
``ParallelState`` for this rank, then ``ModelRunner(...)``, which loads the model;
``alloc_memory_pool()`` builds the KV pools separately. Inside a worker the pools are built
under :mod:`sglang_semipd.memory.pool_hooks`, so the same call attaches instead of allocating.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def parallel_state(server_args: Any, gpu_id: int, tp_rank: int) -> Any:
    """SGLang's ``ParallelState`` for ``tp_rank`` (no pipeline parallelism, one DP rank)."""
    from sglang.srt.distributed.parallel_state_wrapper import ParallelState
    from sglang.srt.layers.dp_attention import compute_dp_attention_world_info

    attn_tp_rank, attn_tp_size, attn_dp_rank, attn_dp_size = compute_dp_attention_world_info(
        server_args.enable_dp_attention, tp_rank, server_args.tp_size, server_args.dp_size,
        server_args.attn_cp_size)
    return ParallelState(
        tp_rank=tp_rank, tp_size=server_args.tp_size, pp_rank=0, pp_size=1, dp_rank=None,
        dp_size=server_args.dp_size, attn_tp_rank=attn_tp_rank, attn_tp_size=attn_tp_size,
        attn_cp_rank=0, attn_cp_size=server_args.attn_cp_size, attn_dp_rank=attn_dp_rank,
        attn_dp_size=attn_dp_size, moe_ep_rank=tp_rank // (server_args.tp_size //
                                                            server_args.ep_size),
        moe_ep_size=server_args.ep_size, moe_dp_rank=None,
        moe_dp_size=server_args.moe_dp_size, dcp_size=server_args.dcp_size, gpu_id=gpu_id)


def publish_server_args(server_args: Any, role: str = "scheduler") -> None:
    """Install ``server_args`` as this process's SGLang runtime context (as SGLang's own
    scheduler process does before it builds a worker). Process-wide environment set-up
    (SGLang's ``_set_envs_and_config``) is the launcher's job, inherited by children."""
    from sglang.srt.runtime_context import publish

    publish(server_args, role=role)


def build_model_runner(server_args: Any, gpu_id: int, tp_rank: int, nccl_port: int) -> Any:
    """Construct (and so load) a ``ModelRunner``; pools, backends and graphs are separate
    calls (``alloc_memory_pool``, ``init_attention_backends``, ``init_cuda_graphs``)."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner

    model_config = ModelConfig.from_server_args(server_args)
    return ModelRunner(model_config=model_config,
                       mem_fraction_static=server_args.mem_fraction_static, gpu_id=gpu_id,
                       ps=parallel_state(server_args, gpu_id, tp_rank), nccl_port=nccl_port,
                       server_args=server_args)


def module_tensor_storages(module: Any, buffers: bool = False) -> dict[int, tuple[int, Any]]:
    """Distinct storages behind ``module``'s parameters (the weights; tied ones count once),
    or with ``buffers`` behind its buffers that are not also parameters (RoPE caches and the
    like): ``{data_ptr: (nbytes, device)}``."""
    params: dict[int, tuple[int, Any]] = {}
    for _, t in module.named_parameters(remove_duplicate=False):
        if t.device.type != "meta":
            s = t.untyped_storage()
            params[s.data_ptr()] = (s.nbytes(), t.device)
    if not buffers:
        return params
    out: dict[int, tuple[int, Any]] = {}
    for _, t in module.named_buffers(remove_duplicate=False):
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                out[s.data_ptr()] = (s.nbytes(), t.device)
    return out


# Tensors some SGLang models derive from their weights in ``post_load_weights`` and keep as
# plain module attributes, neither parameters nor buffers: DeepSeek-V2/V3's MLA splits
# ``kv_b_proj`` into ``w_kc`` / ``w_vc`` (plus scales when quantised). SGLang's weight-cache
# daemon exports only parameters and buffers, and its ``IpcModelLoader`` skips
# ``post_load_weights`` (the daemon ran it), so a worker would keep ``w_kc = None``.
DERIVED_WEIGHT_ATTRS = ("w_kc", "w_vc", "w_scale", "w_scale_k", "w_scale_v")


def share_derived_weights(model: Any) -> list[str]:
    """Register every tensor held in one of :data:`DERIVED_WEIGHT_ATTRS` as a non-persistent
    buffer of its module, so the weight-cache export (``WeightCacheDaemon._export_state``,
    which exports non-persistent buffers too) shares it and ``IpcModelLoader`` maps it into
    each worker's model under the same attribute. Returns the dotted names promoted. These
    tensors are read-only at inference (the MLA absorb matmuls), so one copy serves every
    worker. Call in the memory manager after the model is loaded, before the export."""
    import torch

    promoted: list[str] = []
    for prefix, module in model.named_modules():
        for attr in DERIVED_WEIGHT_ATTRS:
            if attr in module._parameters or attr in module._buffers:
                continue
            value = module.__dict__.get(attr)
            if not isinstance(value, torch.Tensor):
                continue
            delattr(module, attr)
            module.register_buffer(attr, value, persistent=False)
            promoted.append(f"{prefix}.{attr}" if prefix else attr)
    if promoted:
        logger.info("shared %d derived weight tensors as buffers (%s, ...)", len(promoted),
                    promoted[0])
    return promoted


def locally_allocated_bytes(module: Any, buffers: bool = False) -> tuple[int, int]:
    """``(local, foreign)`` bytes of ``module``'s CUDA parameter storages (or, with
    ``buffers``, of its other buffers): *local* ones lie in a segment of this process's CUDA
    caching allocator (a copy this process allocated), *foreign* ones do not (CUDA-IPC
    mappings of another process's memory)."""
    import torch

    segments = [(s["address"], s["address"] + s["total_size"])
                for s in torch.cuda.memory_snapshot()]
    local = foreign = 0
    for ptr, (nbytes, device) in module_tensor_storages(module, buffers).items():
        if device.type != "cuda":
            continue
        if any(lo <= ptr < hi for lo, hi in segments):
            local += nbytes
        else:
            foreign += nbytes
    return local, foreign
