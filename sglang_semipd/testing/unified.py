"""Process bodies for the unified-storage GPU proof (tests/gpu, benchmark/unified_storage.py).

* :func:`manager_main` runs the memory manager (:mod:`sglang_semipd.memory_manager`).
* :func:`worker_main` attaches an SGLang ``ModelRunner`` to it (weights and KV pool by CUDA
  IPC, allocation through the manager) and then obeys commands from the parent over a Pipe:
  ``("run", tokens, insert, decode_steps)`` runs one request through SGLang's own
  ``ScheduleBatch`` / ``ForwardBatch`` path exactly as the scheduler does (prefix match in the
  shared radix tree, lock, ``prepare_for_extend``, forward, greedy sample, decode steps,
  ``release_kv_cache``), ``("read_k", slots)`` checksums layer-0 K at ``slots``, ``("stats",)``
  returns the manager's invariant report, ``("exit",)`` detaches and exits.

The parent (pytest or a benchmark) drives two workers to show that a prefix one of them wrote
is read by the other through the shared pool.
"""

from __future__ import annotations

import logging
import os
from array import array
from typing import Any

logger = logging.getLogger(__name__)


def manager_main(spec: Any, conn: Any) -> None:
    """Run the memory manager; ``conn`` gets its ``ready`` dict (or ``{"error": ...}``)."""
    from sglang_semipd.memory_manager import run_memory_manager

    run_memory_manager(spec, conn)
    _exit_now(0)


def worker_main(cfg: dict, conn: Any) -> None:
    """See the module docstring. ``cfg``: server_args, kv_endpoint, name, role, gpu_id,
    nccl_port, cuda_graphs (bool)."""
    from sglang_semipd.testing.procs import run_reporting

    run_reporting(_worker_body, cfg, conn)
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Leave without joining threads SGLang may have started (its own processes do the same
    through ``kill_itself_when_parent_died`` / process-tree kills)."""
    logging.shutdown()
    os._exit(code)


def _worker_body(cfg: dict, conn: Any) -> None:
    import torch

    from sglang_semipd.memory.client import KVStateClient
    from sglang_semipd.runner import locally_allocated_bytes
    from sglang_semipd.worker_attach import attach_model_runner

    logging.basicConfig(level=cfg.get("log_level", "INFO"),
                        format=f"%(asctime)s {cfg['name']} %(name)s %(levelname)s %(message)s")
    client = KVStateClient(cfg["kv_endpoint"], cfg["name"], cfg["role"], timeout_s=60.0)
    torch.cuda.set_device(cfg.get("gpu_id", 0))
    alloc0 = torch.cuda.memory_allocated()
    runner, hooks = attach_model_runner(cfg["server_args"], client, cfg.get("gpu_id", 0),
                                        nccl_port=cfg["nccl_port"])
    local_w, foreign_w = locally_allocated_bytes(runner.model)
    local_derived, foreign_derived = locally_allocated_bytes(runner.model, buffers=True)
    attach_allocated = torch.cuda.memory_allocated() - alloc0
    runner.init_attention_backends()
    runner.init_cuda_graphs(capture_decode_cuda_graph=bool(cfg.get("cuda_graphs")))
    tree = _tree_cache(runner)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    conn.send({"pid": os.getpid(), "local_weight_bytes": local_w,
               "foreign_weight_bytes": foreign_w, "attach_allocated_bytes": attach_allocated,
               "local_buffer_bytes": local_derived, "foreign_buffer_bytes": foreign_derived,
               "opened_pool_bytes": hooks.opened.nbytes, "opened_pool_tensors": len(hooks.opened),
               "max_total_num_tokens": runner.max_total_num_tokens,
               "gpu_used_bytes": total - free,
               "cuda_allocated_bytes": torch.cuda.memory_allocated()})
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                break
            if cmd[0] == "run":
                conn.send(run_request(runner, tree, *cmd[1:]))
            elif cmd[0] == "read_k":
                idx = torch.tensor(cmd[1], dtype=torch.int64, device="cuda")
                k = runner.token_to_kv_pool.get_key_buffer(0)[idx]
                conn.send({"k_sum": float(k.float().sum()), "k_abs": float(k.float().abs().sum())})
            elif cmd[0] == "stats":
                conn.send({"report": client.check_invariant()})
            else:
                conn.send({"error": f"unknown command {cmd[0]!r}"})
    finally:
        runner.token_to_kv_pool_allocator.close()
        client.goodbye()
        hooks.close()
        client.close()
    conn.send({"exited": True})


def _tree_cache(runner: Any) -> Any:
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from sglang_semipd.memory.remote_radix_cache import RemoteRadixCache

    return RemoteRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
        page_size=runner.page_size))


def run_request(runner: Any, tree: Any, tokens: list[int], insert: bool,
                decode_steps: int) -> dict:
    """One greedy request through SGLang's batch objects (see the module docstring)."""
    import torch
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.mem_cache.common import release_kv_cache
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    req = Req(rid=f"r{os.getpid()}-{len(tokens)}-{tokens[0]}", origin_input_text="",
              origin_input_ids=array("q", tokens),
              sampling_params=SamplingParams(temperature=0, max_new_tokens=decode_steps + 1))
    req.logprob_start_len = -1
    req.init_next_round_input(tree)
    tree.inc_lock_ref(req.last_node)
    prefix_len = len(req.prefix_indices)
    req.set_extend_range(prefix_len, len(req.full_untruncated_fill_ids))
    batch = ScheduleBatch.init_new(
        reqs=[req], req_to_token_pool=runner.req_to_token_pool,
        token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, tree_cache=tree,
        model_config=runner.model_config, enable_overlap=False,
        spec_algorithm=SpeculativeAlgorithm.NONE)
    with torch.no_grad():
        batch.prepare_for_extend()
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device, non_blocking=True)
            batch.prefill_input_ids_cpu = None
        fb = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)
        out = runner.forward(fb).logits_output
        next_ids = runner.sample(out, fb)
        logits = out.next_token_logits[0].float().cpu()
        generated = [int(next_ids[0])]
        for _ in range(decode_steps):
            req.output_ids.append(generated[-1])
            batch.output_ids = next_ids
            batch.input_ids = next_ids.to(torch.int64)
            batch.prepare_for_decode()
            fb = ForwardBatch.init_new(batch, runner, return_hidden_states_before_norm=False)
            out = runner.forward(fb).logits_output
            next_ids = runner.sample(out, fb)
            generated.append(int(next_ids[0]))
        torch.cuda.synchronize()  # KV writes visible before anyone is told about them
    row = runner.req_to_token_pool.req_to_token[req.req_pool_idx]
    slots = row[:len(tokens)].tolist()
    alloc = runner.token_to_kv_pool_allocator
    alloc.free_group_begin()
    release_kv_cache(req, tree, is_insert=insert)
    alloc.free_group_end()
    alloc.flush()
    return {"prefix_len": prefix_len, "logits": logits.numpy(), "tokens": generated,
            "slots": slots}


class UnifiedStack:
    """A memory manager plus attached workers in spawned processes (a context manager).

    ``workers``: ``{name: {"role": ..., "cuda_graphs": bool}}``. After ``__enter__``,
    ``manager`` is the manager's ready dict and ``reports[name]`` each worker's attach report;
    :meth:`call` sends a command to a worker and returns its reply. ``__exit__`` detaches
    the workers, shuts the manager down through the KV-state RPC and kills whatever is left.
    """

    def __init__(self, server_args: Any, run_dir: str, workers: dict[str, dict],
                 start_timeout_s: float = 300.0, log_level: str = "INFO") -> None:
        self.server_args, self.run_dir, self.worker_cfg = server_args, run_dir, workers
        self.timeout = start_timeout_s
        self.log_level = log_level
        self.kv_endpoint = f"ipc://{run_dir}/kv.sock"
        self.weight_socket = f"{run_dir}/weights.sock"
        self.procs: dict[str, Any] = {}
        self.conns: dict[str, Any] = {}
        self.manager: dict = {}
        self.reports: dict[str, dict] = {}
        self.exit_codes: dict[str, Any] = {}

    def __enter__(self) -> "UnifiedStack":
        import multiprocessing as mp

        from sglang.srt.utils.network import get_free_port

        from sglang_semipd.memory_manager import MemoryManagerSpec
        from sglang_semipd.testing.procs import recv_reply

        ctx = mp.get_context("spawn")
        spec = MemoryManagerSpec(server_args=self.server_args, kv_endpoint=self.kv_endpoint,
                                 weight_socket=self.weight_socket, nccl_port=get_free_port(),
                                 workers=max(len(self.worker_cfg), 1),
                                 log_level=self.log_level)
        try:
            self._start(ctx, "manager", manager_main, spec)
            self.manager = recv_reply(self.conns["manager"], self.timeout)
            for name, cfg in self.worker_cfg.items():
                full = dict(cfg, server_args=self.server_args, kv_endpoint=self.kv_endpoint,
                            name=name, nccl_port=get_free_port(), log_level=self.log_level)
                self._start(ctx, name, worker_main, full)
            for name in self.worker_cfg:
                self.reports[name] = recv_reply(self.conns[name], self.timeout)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, ctx: Any, name: str, target: Any, arg: Any) -> None:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(arg, child), name=f"semipd-{name}")
        proc.start()
        self.procs[name], self.conns[name] = proc, parent

    def call(self, name: str, *cmd: Any, timeout_s: float = 120.0) -> dict:
        from sglang_semipd.testing.procs import recv_reply

        self.conns[name].send(cmd)
        return recv_reply(self.conns[name], timeout_s)

    def __exit__(self, *exc: Any) -> None:
        from sglang_semipd.memory.client import KVStateClient

        for name in self.worker_cfg:
            proc = self.procs.get(name)
            if proc is not None and proc.is_alive():
                try:
                    self.conns[name].send(("exit",))
                    self.conns[name].poll(30)
                except (OSError, EOFError):
                    pass
        for name in self.worker_cfg:
            self._reap(name, 30)
        manager = self.procs.get("manager")
        if manager is not None and manager.is_alive():
            try:
                with KVStateClient(self.kv_endpoint, "stack-shutdown", timeout_s=10.0,
                                   register=False) as c:
                    c.shutdown()
            except Exception:  # noqa: BLE001 - fall back to SIGTERM below
                logger.warning("KV-state shutdown failed; terminating the manager")
                manager.terminate()
            self._reap("manager", 60)

    def _reap(self, name: str, timeout_s: float) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        proc.join(timeout_s)
        if proc.is_alive():
            logger.warning("%s did not exit in %.0fs; killing it", name, timeout_s)
            proc.kill()
            proc.join(10)
        self.exit_codes[name] = proc.exitcode
