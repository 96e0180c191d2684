"""The prefill and decode worker processes: SGLang ``Scheduler`` subclasses (one module per
role pair, since they share the process entry).

Both run SGLang's own scheduler -- request intake, radix prefix matching (the ``semipd``
radix backend: the memory manager's tree), chunked prefill, sampling, grammar, stop
conditions, streaming to the DetokenizerManager -- attached to the memory manager's weights
and KV pool (:mod:`sglang_semipd.worker_attach`). What differs:

* :class:`PrefillScheduler` never runs a decode batch. When a request's prefill completes
  (first token sampled and streamed by SGLang's normal path), it hands the request's row,
  unaligned KV tail and radix lock to the decode worker in the memory manager (``Transfer``)
  and sends a :class:`~sglang_semipd.protocol.HandOff` on its output socket; the request
  leaves its batch so it is never merged into a running batch. KV writes are complete when
  the result is processed (SGLang synchronises the copy of the sampled ids with the forward
  stream), so the hand-off is sent after them. Requests that finish at prefill are finished
  here and the decode worker is told to drop its copy.
* :class:`DecodeScheduler` receives every request too but parks it (it never prefills);
  a hand-off adopts the parked request into the running batch the way SGLang's PD decode
  adopts a prebuilt request (``prepare_for_prebuilt`` / ``process_prebuilt``), with the
  prefill worker's stream cursors, so the stream continues where the first token left it.
  Decoding, CUDA graphs, finishing and retraction are SGLang's.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from sglang_semipd import protocol as P

logger = logging.getLogger(__name__)

_LOGPROB_FIELDS = (
    "input_token_logprobs_val", "input_token_logprobs_idx", "input_top_logprobs_val",
    "input_top_logprobs_idx", "input_token_ids_logprobs_val", "input_token_ids_logprobs_idx",
    "output_token_logprobs_val", "output_token_logprobs_idx", "output_top_logprobs_val",
    "output_top_logprobs_idx", "output_token_ids_logprobs_val",
    "output_token_ids_logprobs_idx",
)


def _plain(value: Any) -> Any:
    """Logprob values as msgpack-able lists (tensors and arrays converted)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def export_logprobs(req: Any) -> dict[str, Any] | None:
    lp = getattr(req, "logprob", None)
    if lp is None:
        return None
    if getattr(lp, "input_top_logprobs_val_flat", None) is not None:
        raise NotImplementedError("flat input top-logprobs cannot be handed off yet")
    return {f: _plain(getattr(lp, f)) for f in _LOGPROB_FIELDS
            if getattr(lp, f, None) is not None}


def _scheduler_base() -> type:
    from sglang.srt.managers.scheduler import Scheduler

    return Scheduler


class _SharedPoolChecks:
    """SGLang's invariant checker without the two pool-leak checks: they count this
    process's allocator as the whole pool, but the pool is shared and its invariant is the
    memory manager's (``KVStateService.check_invariant``). Everything else delegates."""

    def __init__(self, checker: Any) -> None:
        self._checker = checker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._checker, name)

    def _check_all_pools(self, *args: Any, **kwargs: Any) -> tuple[bool, list]:
        return False, []

    def _check_req_pool(self, *args: Any, **kwargs: Any) -> None:
        return None


class _SemiPDMixin:
    """Shared by both workers: the KV-state client and the shared-pool invariant checks."""

    semipd_client: Any

    def semipd_common_init(self, client: Any) -> None:
        self.semipd_client = client
        self.invariant_checker = _SharedPoolChecks(self.invariant_checker)


def tell_decode_about_aborts(sender: Any, notify: Any) -> None:
    """Wrap SGLang's ``SenderWrapper`` to the TokenizerManager: every ``AbortReq`` echo the
    prefill worker sends for one request (queue full, bad priority, waiting timeout, abort of a
    queued request, ...) also calls ``notify(rid)``, so the decode worker drops its parked
    copy of a request that will never be handed off."""
    original = sender.send_output

    def send_output(output: Any, recv_obj: Any = None) -> Any:
        result = original(output, recv_obj)
        if type(output).__name__ == "AbortReq" and output.rid and not output.abort_all:
            notify(output.rid)
        return result

    sender.send_output = send_output


def make_prefill_scheduler_cls() -> type:
    Scheduler = _scheduler_base()

    class PrefillScheduler(_SemiPDMixin, Scheduler):
        """See the module docstring."""

        def semipd_init(self, client: Any, handoff_endpoint: str) -> None:
            self.semipd_common_init(client)
            tell_decode_about_aborts(self.ipc_channels.send_to_tokenizer,
                                     lambda rid: self._send(P.HandOff(rid=rid, finished=True)))

        def process_batch_result(self, batch: Any, result: Any) -> None:
            if not batch.forward_mode.is_extend() or batch.is_dllm():
                return super().process_batch_result(batch, result)
            cand = [r for r in batch.reqs if r is not self.chunked_req
                    and r.inflight_middle_chunks <= 0 and not r.finished()
                    and not r.is_retracted]
            super().process_batch_result(batch, result)
            done = []
            for r in cand:
                if r.finished():
                    self._send(P.HandOff(rid=r.rid, finished=True))
                else:
                    self._hand_off(r)
                    done.append(r)
            if done:
                batch.filter_batch(chunked_req_to_exclude=done)

        def _hand_off(self, r: Any) -> None:
            row, kv_len, cpl = int(r.req_pool_idx), int(r.kv_committed_len), \
                int(r.cache_protected_len)
            tail = self.req_to_token_pool.req_to_token[row, cpl:kv_len].to("cpu")
            node = r.last_node
            locks = [] if node is None or node.is_root else [node.id]
            self.semipd_client.transfer(0, tail, [row], locks, to_role="decode")
            self._send(P.HandOff(
                rid=r.rid, req_pool_idx=row, kv_len=kv_len, first_token=int(r.output_ids[-1]),
                cache_protected_len=cpl, last_node=locks[0] if locks else 0,
                last_node_prefix_len=int(getattr(node, "prefix_len", 0)) if locks else 0,
                cached_tokens=int(r.cached_tokens),
                send_token_offset=int(r.send_token_offset),
                send_decode_id_offset=int(r.send_decode_id_offset),
                send_output_token_logprobs_offset=int(r.send_output_token_logprobs_offset),
                input_logprob_sent=bool(r.input_logprob_sent),
                logprob=export_logprobs(r) if r.return_logprob else None))
            r.req_pool_idx = None  # the decode worker owns the row now
            r.kv = None

        def _send(self, h: P.HandOff) -> None:
            sock = self.ipc_channels.send_to_detokenizer.socket
            sock.send_multipart(P.encode_handoff(h))

    return PrefillScheduler


def make_decode_scheduler_cls() -> type:
    Scheduler = _scheduler_base()

    class DecodeScheduler(_SemiPDMixin, Scheduler):
        """See the module docstring."""

        def semipd_init(self, client: Any, handoff_endpoint: str) -> None:
            self.semipd_common_init(client)
            self.parked: dict[str, Any] = {}
            self.early: dict[str, P.HandOff] = {}  # hand-off before its request (rare)
            self.dropped: set[str] = set()  # aborted here while still parked
            self._pending: list[P.HandOff] = []
            self.handoff_sock = zmq.Context.instance().socket(zmq.PULL)
            self.handoff_sock.connect(handoff_endpoint)

        def _add_request_to_queue(self, req: Any, is_retracted: bool = False) -> None:
            if is_retracted or req.finished():
                return super()._add_request_to_queue(req, is_retracted)
            h = self.early.pop(req.rid, None)
            self.parked[req.rid] = req
            if h is not None:
                self._pending.append(h)

        def abort_request(self, recv_req: Any) -> Any:
            for rid in [r for r in self.parked if recv_req.abort_all
                        or r.startswith(recv_req.rid)]:
                del self.parked[rid]  # the prefill worker answers for it
                self.dropped.add(rid)
            return super().abort_request(recv_req)

        def get_next_batch_to_run(self, running_batch: Any, last_batch: Any) -> Any:
            while True:
                try:
                    frames = self.handoff_sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self._pending.append(P.decode_handoff(frames))
                except P.ProtocolError as exc:  # never from our prefill worker; keep serving
                    logger.error("dropping a malformed hand-off: %s", exc)
            if self._pending:
                running_batch = self._adopt(running_batch)
            return super().get_next_batch_to_run(running_batch=running_batch,
                                                 last_batch=last_batch)

        def _adopt(self, running_batch: Any) -> Any:
            reqs, pending, self._pending = [], self._pending, []
            for h in pending:
                req = self.parked.pop(h.rid, None)
                if h.finished:
                    self.dropped.discard(h.rid)
                    continue
                if req is None:
                    if h.rid in self.dropped:
                        self.dropped.discard(h.rid)
                        self._drop_orphan(h)
                    else:
                        self.early[h.rid] = h  # its request is still on the way
                    continue
                reqs.append(self._prepare(req, h))
            if not reqs:
                return running_batch
            batch = self._prebuilt_batch(reqs)
            if batch.is_empty():
                return running_batch
            if running_batch.is_empty():
                running_batch = batch
            else:
                running_batch.merge_batch(batch)
            running_batch.batch_is_full = False
            self.running_batch = running_batch
            return running_batch

        def _drop_orphan(self, h: P.HandOff) -> None:
            """The request was aborted here before its hand-off: release what it holds."""
            tail = self.req_to_token_pool.req_to_token[h.req_pool_idx,
                                                       h.cache_protected_len:h.kv_len]
            if len(tail):
                self.semipd_client.free(tail.to("cpu"))
            if h.last_node:
                self.semipd_client.dec_lock_ref(h.last_node)
            self.semipd_client.free_req_rows([h.req_pool_idx])

        def _prepare(self, req: Any, h: P.HandOff) -> Any:
            import torch
            from sglang.srt.managers.schedule_batch import ReqKvInfo

            from sglang_semipd.memory.remote_radix_cache import RemoteNode

            req.req_pool_idx = h.req_pool_idx
            req.kv_committed_len = h.kv_len
            req.kv = ReqKvInfo(kv_allocated_len=h.kv_len, swa_evicted_seqlen=0)
            req.output_ids.append(h.first_token)
            req.prefix_indices = torch.empty((0,), dtype=torch.int64)
            req.init_next_round_input(None)
            req.set_extend_range(0, h.kv_len)
            req.cache_protected_len = h.cache_protected_len
            req.last_node = RemoteNode(h.last_node, h.last_node_prefix_len) \
                if h.last_node else None
            req.cached_tokens = h.cached_tokens
            req.already_computed = h.cached_tokens
            req.send_token_offset = h.send_token_offset
            req.send_decode_id_offset = h.send_decode_id_offset
            req.send_output_token_logprobs_offset = h.send_output_token_logprobs_offset
            req.input_logprob_sent = h.input_logprob_sent
            if h.logprob and req.logprob is not None:
                for name, value in h.logprob.items():
                    setattr(req.logprob, name, value)
            return req

        def _prebuilt_batch(self, reqs: list) -> Any:
            from sglang.srt.managers.schedule_batch import ScheduleBatch

            batch = ScheduleBatch.init_new(
                reqs=reqs, req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
                tree_cache=self.tree_cache, model_config=self.model_config,
                enable_overlap=self.enable_overlap, spec_algorithm=self.spec_algorithm)
            batch.prepare_for_prebuilt()
            batch.process_prebuilt(self.server_args, self.future_map)
            finished = []
            for r in batch.reqs:  # e.g. a grammar that rejects the first token
                if r.to_finish:
                    r.update_finish_state()
                if r.finished():
                    finished.append(r)
            if finished:  # only these: the others' first token is already out
                from sglang.srt.mem_cache.common import release_kv_cache

                for r in finished:
                    release_kv_cache(r, self.tree_cache)
                self.output_streamer.stream_output(finished, batch.return_logprob)
            batch.filter_batch()
            return batch

    return DecodeScheduler


def role_server_args(role: str, sa: Any) -> Any:
    """What a worker's ServerArgs change for its role (``sa`` is already a private copy):
    the ``semipd`` radix backend and SGLang's non-overlapped loop for both; the prefill worker
    never runs a decode batch, so it captures no decode CUDA graphs."""
    overrides: dict[str, Any] = dict(radix_cache_backend="semipd", disable_overlap_schedule=True)
    if role == "prefill":
        import copy
        import dataclasses

        from sglang.srt.model_executor.cuda_graph_config import Backend

        graphs = copy.deepcopy(sa.cuda_graph_config)
        graphs.decode = dataclasses.replace(graphs.decode, backend=Backend.DISABLED)
        overrides["cuda_graph_config"] = graphs
    sa.override(f"sglang-semipd {role} worker", **overrides)
    return sa


def run_worker_process(role: str, server_args: Any, port_args: Any, gpu_id: int,
                       tp_rank: int, kv_endpoint: str, handoff_endpoint: str,
                       pipe_writer: Any) -> None:
    """Process entry of a prefill or decode worker (spawned by the semi-PD scheduler)."""
    from sglang.srt.managers.scheduler import configure_scheduler_process

    from sglang_semipd.memory.backend import register_semipd_radix_backend
    from sglang_semipd.memory.client import KVStateClient
    from sglang_semipd.runner import publish_server_args
    from sglang_semipd.worker_attach import attached_pools, worker_server_args

    try:
        configure_scheduler_process(server_args, gpu_id, tp_rank, 0, 0, 0, 0, None)
        client = KVStateClient(kv_endpoint, f"{role}-{tp_rank}", role, timeout_s=60.0)
        manifest = client.pool_manifest()
        sa = role_server_args(role, worker_server_args(server_args, manifest))
        register_semipd_radix_backend(lambda ctx: client)
        publish_server_args(sa)
        cls = make_prefill_scheduler_cls() if role == "prefill" else make_decode_scheduler_cls()
        with attached_pools(client, manifest):
            scheduler = cls(sa, port_args, gpu_id, tp_rank, 0, 0, 0, 0, None)
        scheduler.semipd_init(client, handoff_endpoint)
        pipe_writer.send(scheduler.get_init_info())
    except BaseException as exc:
        logger.exception("semi-PD %s worker failed to start", role)
        pipe_writer.send({"status": "error", "error": repr(exc)})
        raise
    scheduler.run_event_loop()
