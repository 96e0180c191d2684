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

The prefill worker runs SGLang's non-overlapped event loop, or with ``--prefill-overlap``
the overlap loop as the decode worker does (there it empties its last prefill batch before
SGLang merges it into the running batch: under overlap the merge comes before the batch's
hand-off). The decode worker runs SGLang's
overlap loop (``--decode-overlap``, on unless ``--disable-overlap-schedule``; its CPU work for
step N+1 overlaps the GPU's step N): SGLang's ``forward_stream`` is the active split's stream
(switched between launches, the new stream waiting for the old), each launch records an
event, and the KV slots and rows it frees are held back until the event of the forward
launched last has completed (:mod:`sglang_semipd.memory.gated`: the other worker could
otherwise be handed them while that forward still writes them). Its iteration reports are
sent when a step's result is processed: ``start`` is the later of its launch and the
previous step's result, ``end`` when its result was in.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Optional

import msgspec
import zmq

from sglang_semipd import chunk_reserve
from sglang_semipd import protocol as P
from sglang_semipd.handoff import DecodeInbox
from sglang_semipd.stack_sampler import GAP_WAITING

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


STALL_REPORT_S = 30.0  # a worker holding requests this long without a batch logs them
ADMISSION_RETRY_S = 0.01  # the prefill worker re-tries a blocked admission this often
PREFILL_OOM_WAIT_S = 30.0  # a refused prefill allocation waits this long for decode to free
SHUTDOWN_GOODBYE_TIMEOUT_S = 2.0  # a worker's goodbye at shutdown waits this long for a reply


def reprefill_bound(waiting: Any, chunked_prefill_size: Optional[int], page_size: int) -> int:
    """Most KV slots one SGLang prefill pass may allocate for ``waiting`` requests: their
    whole sequences (prompt + output so far; a radix hit only lowers it), at most one chunk
    when chunked prefill is on, plus a page of rounding per request."""
    total = sum(len(r.origin_input_ids) + len(r.output_ids) for r in waiting)
    if chunked_prefill_size is not None and chunked_prefill_size > 0:
        total = min(total, chunked_prefill_size)
    return total + max(page_size, 1) * len(waiting)


class AdmissionRetry:
    """Clears SGLang's ``ScheduleBatch.batch_is_full`` in the prefill worker.

    SGLang's scheduler sets ``batch_is_full`` on its running batch when admission runs out of
    KV tokens (``AddReqResult.NO_TOKEN``) or request rows, and admits nothing while it is
    set; it clears it at the next decode step (``update_running_batch``) or when a prefill
    batch it merges has shrunk. The prefill worker has neither: its requests leave at the
    hand-off and it never decodes, so one failed admission would stop it for good while the
    decode worker frees the pool (seen on the H100: 39 requests waiting, none admitted).
    Here the flag is cleared once it has been set for ``retry_s`` -- about one decode step,
    the rate at which stock SGLang re-tries -- so admission is tried again as the decode
    worker finishes, retracts or caches requests."""

    def __init__(self, retry_s: float = ADMISSION_RETRY_S,
                 clock: Any = time.monotonic) -> None:
        self.retry_s, self.clock = retry_s, clock
        self._since: float | None = None
        self.retries = 0

    def check(self, running_batch: Any) -> bool:
        """Call before each scheduling pass; True when it cleared the flag."""
        if running_batch is None or not running_batch.batch_is_full:
            self._since = None
            return False
        now = self.clock()
        if self._since is None:
            self._since = now
            return False
        if now - self._since < self.retry_s:
            return False
        running_batch.batch_is_full = False
        self._since = None
        self.retries += 1
        return True


class _SemiPDMixin:
    """Shared by both workers: the KV-state client, the shared-pool invariant checks, and the
    SM partition -- every forward pass runs on the active split's stream, resize commands from
    the scheduler are taken between iterations only (:class:`WorkerResizeState`), and each
    iteration is reported to the scheduler as an :class:`~sglang_semipd.protocol.IterationStat`.
    """

    semipd_client: Any
    semipd_role: str = ""
    semipd_sampler: Any = None  # the diagnostic stack sampler, when on (stack_sampler.py)

    def semipd_common_init(self, client: Any, streams: Any, start_split: int,
                           control_endpoint: str) -> None:
        from sglang_semipd.partition.resize import WorkerResizeState

        self.semipd_client = client
        self.invariant_checker = _SharedPoolChecks(self.invariant_checker)
        self.semipd_streams = streams
        self.semipd_resize = WorkerResizeState(self.semipd_role, start_split)
        self.semipd_control = zmq.Context.instance().socket(zmq.PULL)
        self.semipd_control.connect(control_endpoint)

    # -------------------------------------------------------------- control channel
    def _send_control(self, msg: Any) -> None:
        self.ipc_channels.send_to_detokenizer.socket.send_multipart(P.encode_control(msg))

    def _send_handoff(self, h: P.HandOff) -> None:
        """On this worker's output socket, to the scheduler (the prefill worker's hand-offs
        go on to its decode worker; ``finished`` ones also end the request there)."""
        self.ipc_channels.send_to_detokenizer.socket.send_multipart(P.encode_handoff(h))

    def _poll_control(self) -> None:
        while True:
            try:
                frames = self.semipd_control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode_control(frames)
            except P.ProtocolError as exc:
                logger.error("dropping a malformed control message: %s", exc)
                continue
            if isinstance(msg, P.ReleaseIdle):
                self._release_idle()  # frees, rows + lease back to the manager
                self._send_control(P.Released(seq=msg.seq))
                continue
            if isinstance(msg, P.Retire):
                logger.info("retiring (generation %d): exiting once idle", msg.generation)
                self.semipd_retire = True
                continue
            if not isinstance(msg, P.Resize) or not 0 <= msg.split < len(
                    self.semipd_streams.splits):
                logger.error("dropping an unexpected control message: %r", msg)
                continue
            ack = self.semipd_resize.receive(msg)
            if ack is not None:
                self._switch(ack)

    def semipd_stop_load_snapshots(self) -> None:
        """Stop publishing SGLang's load snapshot (``/v1/loads``, ``/get_load``) from this
        worker. Both workers inherit SGLang's writer for the same slot of the same file, so
        each snapshot overwrote the other's. One writer is left per server: the prefill
        worker's (its waiting queue and the shared pool's usage as it estimates it). (The
        H100 stack samples put 28% of the decode worker's and 53% of the prefill worker's
        main-thread time in that writer's ``flock``: SGLang publishes on every idle pass, so
        that is idle time; a write next to a writer spinning on the same lock took 7 us at
        the median on a CPU host, against 5 us alone.)"""
        writer, self.load_snapshot_writer = getattr(self, "load_snapshot_writer", None), None
        if writer is not None:
            writer.close()

    def _release_idle(self) -> None:
        """Everything this worker holds but does not use goes back to the memory manager
        (gated frees and rows after their forwards)."""
        self.token_to_kv_pool_allocator.clear()
        flush_rows = getattr(getattr(self, "req_to_token_pool", None), "flush_rows", None)
        if flush_rows is not None:
            flush_rows(wait=True)

    def _switch(self, ack: Any) -> None:
        self.semipd_activate(ack.split)
        self._send_control(msgspec.structs.replace(ack, applied_at=time.monotonic()))

    def semipd_activate(self, split: int) -> None:
        """Make ``split`` the one the next iteration runs on (the stream is looked up per
        iteration; under SGLang's overlap loop it becomes the forward stream) and swap in the
        CUDA graphs captured on it (the decode worker's decode graphs; the prefill worker's
        prefill graphs with ``--prefill-graphs``)."""
        runner = getattr(self, "semipd_graph_runners", {}).get(split)
        if runner is not None:
            setattr(self.tp_worker.model_runner, f"{self.semipd_role}_cuda_graph_runner",
                    runner)
        if getattr(self, "enable_overlap", False):
            self._semipd_use_stream(self.semipd_streams.streams[split])

    def semipd_capture_split_graphs(self, start: int) -> None:
        """SGLang's CUDA graphs of this worker's phase (decode | prefill) for every split, each
        captured on its split's stream: SGLang's init captured the start split's, on its
        stream (``capture_stream``); a graph keeps the SMs of its capture stream, so each
        split needs its own; splits that share a stream (the burst split's decode side) share
        its runner. Decode runners get an attention backend each (a decode runner
        keeps the backend whose graph buffers it captured); prefill runners share the
        model runner's, which SGLang's prefill runner reads at every replay (its attention
        runs eagerly, between the captured pieces). Nothing to do without a graph runner
        (SGLang's own rules may have turned the phase's graphs off) or outside ``green``."""
        from sglang.srt.model_executor.runner.eager_runner import EagerRunner

        from sglang_semipd.partition.streams import capture_stream

        mr, phase = self.tp_worker.model_runner, self.semipd_role
        attr = f"{phase}_cuda_graph_runner"
        first = getattr(mr, attr, None)
        self.semipd_graph_runners = runners = {start: first}
        if first is None or isinstance(first, EagerRunner) \
                or self.semipd_streams.mode != "green":
            return
        init = getattr(mr, f"init_{phase}_cuda_graph")
        original = mr.attn_backend
        t0 = time.monotonic()
        owner = {id(self.semipd_streams.streams[start]): start}  # stream -> its runner's split
        try:
            for i, stream in enumerate(self.semipd_streams.streams):
                if i == start:
                    continue
                if id(stream) in owner:  # the decode side of the burst split: same stream
                    runners[i] = runners[owner[id(stream)]]
                    continue
                owner[id(stream)] = i
                if phase == "decode":
                    mr.attn_backend = mr._get_attention_backend()
                with capture_stream(stream):
                    init()
                runners[i] = getattr(mr, attr)
        finally:
            mr.attn_backend = original
            setattr(mr, attr, first)
        captured = len({id(r) for r in runners.values()})
        logger.info("%s CUDA graphs captured for %d splits (%.1f s for the extra %d)", phase,
                    captured, time.monotonic() - t0, captured - 1)

    # -------------------------------------------------------------- SGLang seams
    def get_next_batch_to_run(self, running_batch: Any, last_batch: Any) -> Any:
        self._poll_control()
        if getattr(self, "semipd_retire", False) and self.semipd_idle(running_batch):
            self._retire()
        plan = super().get_next_batch_to_run(running_batch=running_batch,
                                             last_batch=last_batch)
        self._watch_stall(plan.batch_to_run)  # SGLang returns a plan (running, to run)
        return plan

    def _watch_stall(self, batch: Any) -> None:
        """Log once (a warning) when this worker has held requests for ``STALL_REPORT_S``
        without running a batch: where they are and their first rids. A request stuck here
        would otherwise only show as a client that never gets an answer."""
        now = time.monotonic()
        if batch is not None or not hasattr(self, "_stall_since"):
            self._stall_since, self._stall_logged = now, False
            return
        if self._stall_logged or now - self._stall_since < STALL_REPORT_S:
            return
        held = {k: v for k, v in self.semipd_held().items() if v}
        if not held:
            self._stall_since = now
            return
        self._stall_logged = True
        logger.warning("semi-PD %s worker: no batch for %.0f s while holding %s", self.semipd_role,
                       now - self._stall_since, "; ".join(
                           f"{k}: {len(v)} ({', '.join(v[:5])}{', ...' if len(v) > 5 else ''})"
                           for k, v in held.items()))

    def semipd_held(self) -> dict[str, list[str]]:
        """Rids of the requests this worker holds, by place (for stall reports)."""
        chunked = getattr(self, "chunked_req", None)
        running = getattr(self, "running_batch", None)
        return {"waiting": [r.rid for r in self.waiting_queue],
                "running": [r.rid for r in running.reqs] if running is not None else [],
                "chunked": [chunked.rid] if chunked is not None else []}

    def semipd_idle(self, running_batch: Any) -> bool:
        """Nothing queued, running or half-prefilled here (the decode worker also checks its
        hand-off inbox)."""
        return not self.waiting_queue and (running_batch is None or running_batch.is_empty()) \
            and getattr(self, "chunked_req", None) is None \
            and not getattr(self, "result_queue", None)  # overlap: a result still to process

    def semipd_shutdown_report(self) -> None:
        """After SGLang's ``ShutdownReq`` (its drain has finished the requests): give back what
        this worker holds and say goodbye, so that the memory manager logs what each worker
        still held ("client N released: ..."). A worker that holds no request should hold no
        slot, row or lock by then: if it does, that is a leak, logged here as a warning.
        Best effort: a manager that is already gone only costs a warning."""
        if getattr(self, "semipd_client", None) is None:
            return
        try:
            requests = {k: v for k, v in self.semipd_held().items() if v}
            bye = self._hand_back(SHUTDOWN_GOODBYE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - shutting down either way
            logger.warning("semi-PD %s worker: no goodbye to the memory manager at shutdown "
                           "(%s)", self.semipd_role, exc)
            return
        held = bye.freed_tokens or bye.dropped_locks or bye.freed_rows
        level = logging.WARNING if held and not requests else logging.INFO
        logger.log(level, "semi-PD %s worker at shutdown: gave back %d slots, %d locks, %d rows%s",
                   self.semipd_role, bye.freed_tokens, bye.dropped_locks, bye.freed_rows,
                   f" held by {sum(map(len, requests.values()))} request(s) still here"
                   if requests else (" with no request left: leaked" if held else ""))

    def _hand_back(self, timeout_s: Optional[float] = None) -> Any:
        """Give everything back to the memory manager and unregister (``ReleaseReply``)."""
        self._release_idle()
        return self.semipd_client.goodbye(timeout_s=timeout_s)

    def _retire(self) -> None:
        """Give everything back to the memory manager and leave SGLang's event loop."""
        bye = self._hand_back()
        logger.info("retired: gave back %d slots, %d locks, %d rows", bye.freed_tokens,
                    bye.dropped_locks, bye.freed_rows)
        raise WorkerRetired()

    def run_batch(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        overlap = getattr(self, "enable_overlap", False)
        state = self.semipd_resize
        split = state.split
        queued = len(self.waiting_queue)
        iteration = state.begin_iteration()
        sampler = self.semipd_sampler
        if sampler is not None:
            sampler.phase = "forward"
        start = time.monotonic()
        try:
            result = self._launch(batch, *args, **kwargs) if overlap else \
                self._forward_on(split, batch, *args, **kwargs)
        finally:
            ack = state.end_iteration()
            if sampler is not None:  # until the next forward: the gap the phase profile
                # reports as "idle with work waiting" when requests wait
                sampler.phase = GAP_WAITING if queued else None
        mode = batch.forward_mode
        tokens = batch.extend_num_tokens if mode.is_extend() else batch.batch_size()
        stat = P.IterationStat(
            role=self.semipd_role, iteration=iteration, split=split,
            mode=mode.name.lower(), batch_size=batch.batch_size(), tokens=int(tokens or 0),
            start=start, end=start if overlap else time.monotonic(), queued=queued)
        if overlap:
            self.semipd_launched.append(stat)  # reported once its result is in
        else:
            self._send_control(stat)
        if ack is not None:
            self._switch(ack)
        return result

    def _forward_on(self, split: int, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """SGLang's non-overlapped forward, on ``split``'s stream, waited for."""
        import torch

        stream = self.semipd_streams.streams[split]
        current = torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            result = super().run_batch(batch, *args, **kwargs)
        current.wait_stream(stream)
        stream.synchronize()  # SGLang's non-overlapped loop waits for it next anyway
        return result

    # -------------------------------------------------------------- SGLang's overlap loop
    def semipd_overlap_init(self, split: int) -> None:
        """Under SGLang's overlap loop: forward on ``split``'s stream, frees gated on the
        forward launched last (see the module docstring)."""
        self.semipd_inflight: Any = None  # event after the latest launch
        self.semipd_launched: collections.deque = collections.deque()  # stats of launches
        self.semipd_last_ready = 0.0
        self._semipd_use_stream(self.semipd_streams.streams[split])

        def gate() -> Any:
            return self.semipd_inflight

        self.token_to_kv_pool_allocator.free_gate = gate
        self.req_to_token_pool.free_gate = gate
        logger.info(OVERLAP_LOG, self.semipd_role)

    def _release_done_frees(self) -> None:
        """Under the overlap loop: the freed slots and rows whose gating forward has
        completed go back to the memory manager."""
        self.token_to_kv_pool_allocator.release_ready()
        self.req_to_token_pool.flush_rows()

    def _semipd_use_stream(self, stream: Any) -> None:
        import torch

        old = getattr(self, "forward_stream", None)
        if old is stream:
            return
        if old is not None:
            stream.wait_stream(old)  # the next forward reads what the last one wrote
        self.forward_stream = stream
        self.forward_stream_ctx = torch.cuda.stream(stream)

    def _launch(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """SGLang's overlapped launch (on ``self.forward_stream``), then the event that gates
        the frees made until the next launch."""
        import torch

        result = super().run_batch(batch, *args, **kwargs)
        done = torch.cuda.Event()
        done.record(self.forward_stream)
        self.semipd_inflight = done
        return result

    def process_batch_result(self, batch: Any, result: Any) -> None:
        super().process_batch_result(batch, result)
        launched = getattr(self, "semipd_launched", None)
        if launched:  # overlap: this step's report, now that its result is in
            stat = launched.popleft()
            now = time.monotonic()
            begin, self.semipd_last_ready = max(stat.start, self.semipd_last_ready), now
            self._send_control(msgspec.structs.replace(stat, start=begin, end=now))


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


BATCH_HANDOFF_LOG = "prefill worker: one PrefillHandOff per prefill batch (--batch-handoff)"
OVERLAP_LOG = "%s worker: SGLang's overlap loop, frees gated on the forward in flight"
CHUNK_RESERVE_LOG = ("prefill worker: up to %.2f of each chunk's budget held back for the "
                     "waiting prompts (--prefill-chunk-reserve)")


def make_prefill_scheduler_cls() -> type:
    Scheduler = _scheduler_base()

    class PrefillScheduler(_SemiPDMixin, Scheduler):
        """See the module docstring."""

        semipd_role = "prefill"

        def semipd_init(self, client: Any, plan: "WorkerPlan", streams: Any,
                        start_split: int) -> None:
            self.semipd_common_init(client, streams, start_split, plan.control_endpoint)
            self.semipd_peer = plan.kv_role("decode")  # hand-offs go to this decode client
            if plan.prefill_graphs:
                self.semipd_capture_split_graphs(start_split)
            self.semipd_batch_handoff = plan.batch_handoff
            if plan.batch_handoff:
                logger.info(BATCH_HANDOFF_LOG)
            if self.enable_overlap:
                self.semipd_overlap_init(start_split)
            self.semipd_chunk_reserve = plan.prefill_chunk_reserve
            if self.semipd_chunk_reserve and \
                    getattr(self.server_args, "enable_deterministic_inference", False):
                logger.warning("--prefill-chunk-reserve is ignored with "
                               "--enable-deterministic-inference (chunk boundaries would "
                               "differ from stock SGLang's)")
                self.semipd_chunk_reserve = 0.0
            if self.semipd_chunk_reserve:
                logger.info(CHUNK_RESERVE_LOG, self.semipd_chunk_reserve)
            self.semipd_admission = AdmissionRetry()
            # a refused allocation waits for the decode worker (RemoteTokenAllocator's doc)
            self.token_to_kv_pool_allocator.oom_wait_s = PREFILL_OOM_WAIT_S
            tell_decode_about_aborts(self.ipc_channels.send_to_tokenizer,
                                     lambda rid: self._send_handoff(P.HandOff(rid=rid,
                                                                              finished=True)))

        def get_next_batch_to_run(self, running_batch: Any, last_batch: Any) -> Any:
            self.semipd_admission.check(running_batch)
            if self.enable_overlap:
                self._release_done_frees()
                if last_batch is not None and last_batch.forward_mode.is_extend():
                    # SGLang merges the last prefill batch into the running batch here, and
                    # under overlap that comes before its results: every request of it
                    # leaves for the decode worker (or ends) then, and none may join this
                    # worker's running batch (without overlap the hand-off filters them out
                    # first). The batch its results are handled with is a copy.
                    last_batch.filter_batch(keep_indices=[])
            return super().get_next_batch_to_run(running_batch=running_batch,
                                                 last_batch=last_batch)

        def get_new_batch_prefill(self, running_batch: Any) -> Any:
            with chunk_reserve.holding(self._chunk_reserve_now()):
                return super().get_new_batch_prefill(running_batch)

        def _chunk_reserve_now(self) -> int:
            """Tokens of this round's chunk budget held back from the chunked request for
            the waiting prompts that fit in them, which move to the front of the waiting
            queue (``--prefill-chunk-reserve``; :mod:`chunk_reserve`)."""
            req, budget = self.chunked_req, self.chunked_prefill_size
            fraction = getattr(self, "semipd_chunk_reserve", 0.0)
            if not fraction or req is None or not self.waiting_queue or \
                    budget is None or budget <= 0:
                return 0
            queue = self.waiting_queue
            held, chosen = chunk_reserve.plan_reserve(
                budget, len(req.origin_input_ids) - len(req.prefix_indices),
                [len(r.origin_input_ids) + len(r.output_ids) for r in queue],
                self.page_size, fraction)
            if held:  # the chosen prompts first (SGLang's fcfs policy keeps this order)
                queue[:] = [queue[i] for i in chunk_reserve.overtaking_order(len(queue),
                                                                             chosen)]
            return held

        def process_batch_result(self, batch: Any, result: Any) -> None:
            if not batch.forward_mode.is_extend() or batch.is_dllm():
                return super().process_batch_result(batch, result)
            cand = [r for r in batch.reqs if r is not self.chunked_req
                    and r.inflight_middle_chunks <= 0 and not r.finished()
                    and not r.is_retracted]
            batched = self.semipd_batch_handoff
            if batched:  # SGLang's result loop caches each prefilled request
                # (cache_unfinished_req); the tree cache defers that to the hand-off's one
                # round trip
                self.tree_cache.defer_unfinished(cand)
            super().process_batch_result(batch, result)
            done = []
            for r in cand:
                if r.finished():
                    self._send_handoff(P.HandOff(rid=r.rid, finished=True))
                else:
                    done.append(r)
            if batched:
                self.tree_cache.hand_off(done, self.semipd_peer)  # also ends the deferral
            for r in done:
                if not batched:  # --no-batch-handoff: one Transfer per request
                    self._transfer(r)
                self._send_handoff(self._hand_off_record(r))
                r.req_pool_idx = None  # the decode worker owns the row now
                r.kv = None
            if done and not self.enable_overlap:
                # without overlap ``batch`` is the last batch SGLang merges next: the handed-off
                # requests leave it here. Under overlap it is ``ScheduleBatch.copy()`` (no CPU
                # index lists to filter) and the last batch was emptied already
                # (get_next_batch_to_run)
                batch.filter_batch(chunked_req_to_exclude=done)

        def _transfer(self, r: Any) -> None:
            """Move one cached request's row, tail slots (past ``cache_protected_len``) and
            lock ref to the decode client (the per-request hand-off)."""
            row, cpl = int(r.req_pool_idx), int(r.cache_protected_len)
            tail = self.req_to_token_pool.req_to_token[row, cpl:int(r.kv_committed_len)]
            node = r.last_node
            locks = [] if node is None or node.is_root else [node.id]
            self.semipd_client.transfer(0, tail.to("cpu"), [row], locks,
                                        to_role=self.semipd_peer)

        @staticmethod
        def _hand_off_record(r: Any) -> P.HandOff:
            """What the decode worker needs of a request whose row, tail slots and lock ref
            have moved to it (the tree cache's ``hand_off``, or ``_transfer``)."""
            node = r.last_node
            locked = node is not None and not node.is_root
            return P.HandOff(
                rid=r.rid, req_pool_idx=int(r.req_pool_idx), kv_len=int(r.kv_committed_len),
                first_token=int(r.output_ids[-1]),
                cache_protected_len=int(r.cache_protected_len),
                last_node=int(node.id) if locked else 0,
                last_node_prefix_len=int(getattr(node, "prefix_len", 0)) if locked else 0,
                cached_tokens=int(r.cached_tokens),
                send_token_offset=int(r.send_token_offset),
                send_decode_id_offset=int(r.send_decode_id_offset),
                send_output_token_logprobs_offset=int(r.send_output_token_logprobs_offset),
                input_logprob_sent=bool(r.input_logprob_sent),
                logprob=export_logprobs(r) if r.return_logprob else None)

        def flush_cache(self, empty_cache: bool = True) -> bool:
            """SGLang's flush; refused (False, not a crash) while the decode worker still
            holds requests in the shared pool -- the memory manager's reset is BUSY then."""
            try:
                return super().flush_cache(empty_cache)
            except P.KVStateError as exc:
                logger.warning("cache not flushed: %s", exc)
                return False

        def set_internal_state(self, recv_req: Any) -> Any:
            """SGLang's ``/set_internal_state``, plus ``semipd_prefill_sm_share`` (the
            scheduler resizes both workers to the nearest planned split) and
            ``semipd_slo_policy`` (``0``: the static policy pins the split, ``1``: the SLO
            controller moves it again); both go to the scheduler as one ``ResizeRequest``.
            Numbers only: SGLang's ``SetInternalStateReq`` refuses other values (HTTP 400)."""
            args = dict(recv_req.server_args or {})
            share = args.pop(SHARE_KEY, None)
            policy = args.pop(POLICY_KEY, None)
            if share is None and policy is None:
                return super().set_internal_state(recv_req)
            from sglang.srt.managers.io_struct import SetInternalStateReqOutput

            if share is not None and (isinstance(share, bool) or not isinstance(
                    share, (int, float)) or not 0.0 < float(share) < 1.0):
                logger.warning("%s=%r rejected: a prefill SM share is in (0, 1)", SHARE_KEY,
                               share)
                return SetInternalStateReqOutput(updated=False)
            if policy is not None and (isinstance(policy, bool) or policy not in (0, 1)):
                logger.warning("%s=%r rejected: 1 (slo) or 0 (static)", POLICY_KEY, policy)
                return SetInternalStateReqOutput(updated=False)
            if policy is not None:
                policy = POLICY_BY_SWITCH[int(policy)]
            if args:
                recv_req.server_args = args
                out = super().set_internal_state(recv_req)
                if not out.updated:
                    return out
            self._send_control(P.ResizeRequest(
                share=None if share is None else float(share), policy=policy))
            return SetInternalStateReqOutput(updated=True)

        def get_internal_state(self, recv_req: Any) -> Any:
            """SGLang's internal state plus ``semipd``: the split in force and the memory
            manager's full invariant report of the shared pool (``pool``)."""
            out = super().get_internal_state(recv_req)
            state = self._semipd_state()
            try:
                pool = msgspec.structs.asdict(self.semipd_client.check_invariant())
                state["pool"] = {k: {str(c): n for c, n in v.items()} if isinstance(v, dict)
                                 else v for k, v in pool.items()}  # JSON: string keys
            except P.KVStateError as exc:  # reported, never fatal for a status request
                state["pool"] = {"error": str(exc)}
            if isinstance(getattr(out, "internal_state", None), dict):
                out.internal_state["semipd"] = state
            return out

        def _semipd_state(self) -> dict:
            from sglang_semipd.partition.splits import burst_index

            streams, state = self.semipd_streams, self.semipd_resize
            split = streams.splits[state.split]
            return {"sm_partition": streams.mode, "split": state.split,
                    "prefill_sms": split.prefill_sms, "decode_sms": split.decode_sms,
                    "resizes_applied": state.applied_seq, "iterations": state.iteration,
                    "splits": [[s.prefill_sms, s.decode_sms] for s in streams.splits],
                    "burst_split": burst_index(streams.splits)}

    return PrefillScheduler


def make_decode_scheduler_cls() -> type:
    Scheduler = _scheduler_base()

    class DecodeScheduler(_SemiPDMixin, Scheduler):
        """See the module docstring."""

        semipd_role = "decode"

        def semipd_init(self, client: Any, plan: "WorkerPlan", streams: Any,
                        start_split: int) -> None:
            self.semipd_common_init(client, streams, start_split, plan.control_endpoint)
            self.semipd_stop_load_snapshots()  # the prefill worker's snapshot stands alone
            self.semipd_capture_split_graphs(start_split)
            self.inbox: DecodeInbox[Any, P.HandOff] = DecodeInbox()
            self.handoff_sock = zmq.Context.instance().socket(zmq.PULL)
            self.handoff_sock.connect(plan.handoff_endpoint)
            if self.enable_overlap:
                self.semipd_overlap_init(start_split)

        def update_running_batch(self, batch: Any) -> Any:
            """SGLang's, after securing the next decode step's KV slots in this worker's
            lease (``RemoteTokenAllocator.secure``): SGLang checks an estimate of the shared
            pool, and an allocation refused after that check raises instead of retracting.
            Counted over the unfiltered batch (finished requests included: a few slots too
            many), since filtering here would hide the finished ones from SGLang."""
            if not batch.is_empty():
                self.token_to_kv_pool_allocator.secure(batch.new_tokens_required_next_decode())
            return super().update_running_batch(batch)

        def get_new_batch_prefill(self, running_batch: Any) -> Any:
            """SGLang's, which here only re-prefills requests this worker retracted, after
            leasing the KV slots that pass may allocate (``RemoteTokenAllocator.secure_up_to``):
            SGLang admits against the shared pool's estimate and allocates afterwards, and
            a refused allocation there raises (measured on the H100: the decode worker died
            in ``alloc_token_slots`` re-prefilling retracted requests). What the pass did
            not use goes back to the pool beyond one lease block: the prefill worker may be
            waiting for room."""
            if not self.waiting_queue:
                return super().get_new_batch_prefill(running_batch)
            alloc = self.token_to_kv_pool_allocator
            alloc.secure_up_to(reprefill_bound(
                self.waiting_queue, self.server_args.chunked_prefill_size, self.page_size))
            plan = super().get_new_batch_prefill(running_batch)
            if alloc.leased_available > alloc.lease_block:
                alloc.release_lease()
            return plan

        def _add_request_to_queue(self, req: Any, is_retracted: bool = False) -> None:
            if is_retracted or req.finished():
                return super()._add_request_to_queue(req, is_retracted)
            self.inbox.park(req.rid, req)  # adopted when its hand-off arrives

        def abort_request(self, recv_req: Any) -> Any:
            self.inbox.abort(recv_req.rid, recv_req.abort_all)  # prefill answers for these
            return super().abort_request(recv_req)

        def semipd_idle(self, running_batch: Any) -> bool:
            return super().semipd_idle(running_batch) and not self.inbox.parked \
                and not self.inbox.has_pending

        def semipd_held(self) -> dict[str, list[str]]:
            held = super().semipd_held()
            held["parked (no hand-off yet)"] = list(self.inbox.parked)
            held["hand-off before request"] = list(self.inbox.early)
            return held

        def get_next_batch_to_run(self, running_batch: Any, last_batch: Any) -> Any:
            if self.enable_overlap:
                self._release_done_frees()
            while True:
                try:
                    frames = self.handoff_sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.inbox.receive(P.decode_handoff(frames))
                except P.ProtocolError as exc:  # never from our prefill worker; keep serving
                    logger.error("dropping a malformed hand-off: %s", exc)
            if self.inbox.has_pending:
                running_batch = self._adopt(running_batch)
            return super().get_next_batch_to_run(running_batch=running_batch,
                                                 last_batch=last_batch)

        def _adopt(self, running_batch: Any) -> Any:
            adopt, release = self.inbox.take()
            for h in release:
                self._drop_orphan(h)
            reqs = [self._prepare(req, h) for req, h in adopt]
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
            """The request was aborted here while its hand-off was on the way: release what
            it holds and answer the abort (the prefill worker, which handed it off before the
            abort reached it, no longer has the request; the TokenizerManager would wait for
            ever). A second answer for one rid is harmless: SGLang ignores it."""
            from sglang.srt.managers.io_struct import AbortReq

            tail = self.req_to_token_pool.req_to_token[h.req_pool_idx,
                                                       h.cache_protected_len:h.kv_len]
            if len(tail):
                self.semipd_client.free(tail.to("cpu"))
            if h.last_node:
                self.semipd_client.dec_lock_ref(h.last_node)
            self.semipd_client.free_req_rows([h.req_pool_idx])
            self.ipc_channels.send_to_tokenizer.send_output(AbortReq(rid=h.rid))
            # the scheduler sees no output batch for it: tell it the request ended here
            self._send_handoff(P.HandOff(rid=h.rid, finished=True))
            logger.debug("aborted %s while its hand-off was on the way: released, answered",
                         h.rid)

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


def role_server_args(role: str, sa: Any, decode_overlap: bool = False,
                     prefill_overlap: bool = False, prefill_graphs: bool = False) -> Any:
    """What a worker's ServerArgs change for its role (``sa`` is already a private copy):
    the ``semipd`` radix backend and SGLang's non-overlapped loop, except the decode worker's
    with ``decode_overlap`` and the prefill worker's with ``prefill_overlap`` (unless SGLang
    itself turned overlap off for these arguments: then it stays off, with a warning). The
    decode worker captures no prefill CUDA graphs (it never prefills), and the prefill worker,
    which never runs a decode batch, no decode graphs. The prefill worker keeps SGLang's own
    prefill-graph setting with ``prefill_graphs`` (``--prefill-graphs``; captured once per
    split, on the split's stream, as decode's are) and runs its prefills eagerly without."""
    import copy

    from sglang.srt.model_executor.cuda_graph_config import Backend

    graphs = copy.deepcopy(sa.cuda_graph_config)
    if not (role == "prefill" and prefill_graphs):
        graphs.prefill = dataclasses.replace(graphs.prefill, backend=Backend.DISABLED)
    if role == "prefill":
        graphs.decode = dataclasses.replace(graphs.decode, backend=Backend.DISABLED)
    overlap = decode_overlap if role == "decode" else prefill_overlap
    if overlap and sa.disable_overlap_schedule:
        logger.warning("--%s-overlap: SGLang turned the overlap scheduler off for these "
                       "server arguments; the %s worker runs without it", role, role)
        overlap = False
    sa.override(f"sglang-semipd {role} worker", radix_cache_backend="semipd",
                disable_overlap_schedule=not overlap, cuda_graph_config=graphs)
    return sa


SHARE_KEY = "semipd_prefill_sm_share"
POLICY_KEY = "semipd_slo_policy"  # 1: --partition-policy slo, 0: static (numbers only)
POLICY_BY_SWITCH = {0: "static", 1: "slo"}  # every one of config.PARTITION_POLICIES


def mps_thread_percentage(role: str, prefill_share: float) -> int:
    """``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` of a worker under ``--sm-partition mps``."""
    prefill = min(99, max(1, round(prefill_share * 100)))
    return prefill if role == "prefill" else 100 - prefill


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What the scheduler tells a worker at spawn, besides SGLang's own arguments."""

    role: str
    kv_endpoint: str
    handoff_endpoint: str  # decode: hand-offs arrive here
    control_endpoint: str  # resize commands arrive here
    sm_partition: str  # green | mps | none
    shares: tuple[float, ...]  # planned prefill shares (partition.splits.plan_splits)
    start_share: float
    gpu_id: int
    tp_rank: int
    generation: int = 0  # > 0: a standby pair of an --sm-partition mps resize
    decode_overlap: bool = False  # --decode-overlap
    batch_handoff: bool = False  # --batch-handoff
    prefill_overlap: bool = False  # --prefill-overlap
    prefill_chunk_reserve: float = 0.0  # --prefill-chunk-reserve
    prefill_graphs: bool = False  # --prefill-graphs
    burst_unconfined: bool = False  # --burst-unconfined: one more split (partition.splits)

    def kv_role(self, role: str = "") -> str:
        """The memory-manager client role of ``role`` (default: this worker's) in this
        plan's generation: a prefill worker hands off to its own generation's decode."""
        role = role or self.role
        return role if self.generation == 0 else f"{role}@{self.generation}"


WORKER_CRASH_EXIT_CODE = 70  # a worker whose event loop raised (run_worker_process)


class WorkerRetired(Exception):
    """Raised out of SGLang's event loop by a worker that retired (``Retire``)."""


def run_worker_process(plan: WorkerPlan, server_args: Any, port_args: Any,
                       manager_ready: Any, pipe_writer: Any) -> None:
    """Process entry of a prefill or decode worker (spawned by the semi-PD scheduler at the
    same time as the memory manager: SGLang's imports happen here while the manager loads the
    model; nothing touches CUDA before ``manager_ready`` is set, so the manager's memory
    accounting sees no worker context)."""
    from sglang.srt.managers.scheduler import configure_scheduler_process
    from sglang.srt.utils import kill_itself_when_parent_died

    from sglang_semipd.memory.backend import register_semipd_radix_backend
    from sglang_semipd.memory.client import KVStateClient
    from sglang_semipd.memory_manager import set_process_title
    from sglang_semipd.partition.splits import burst_index, nearest_split
    from sglang_semipd.partition.streams import build_split_streams, capture_stream
    from sglang_semipd.runner import publish_server_args
    from sglang_semipd.worker_attach import attached_pools, worker_server_args

    kill_itself_when_parent_died()  # also while waiting for the manager (no CUDA yet)
    role = plan.role
    try:
        cls = make_prefill_scheduler_cls() if role == "prefill" else make_decode_scheduler_cls()
        if plan.sm_partition == "mps":  # the paper's mechanism: a fixed share per process
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(mps_thread_percentage(
                role, plan.start_share))
        while not manager_ready.wait(1.0):
            pass
        configure_scheduler_process(server_args, plan.gpu_id, plan.tp_rank, 0, 0, 0, 0, None)
        set_process_title(plan.kv_role())  # after SGLang's "sglang::scheduler"
        client = KVStateClient(plan.kv_endpoint, f"{plan.kv_role()}-{plan.tp_rank}",
                               plan.kv_role(),
                               timeout_s=60.0)
        manifest = client.pool_manifest()
        sa = role_server_args(role, worker_server_args(server_args, manifest),
                              plan.decode_overlap, plan.prefill_overlap, plan.prefill_graphs)
        register_semipd_radix_backend(lambda ctx: client)
        publish_server_args(sa)
        import torch

        streams = build_split_streams(role, plan.sm_partition, plan.shares,
                                      torch.cuda.current_device(), plan.burst_unconfined)
        start = nearest_split(streams.splits, plan.start_share)
        with attached_pools(client, manifest), capture_stream(streams.streams[start]):
            scheduler = cls(sa, port_args, plan.gpu_id, plan.tp_rank, 0, 0, 0, 0, None)
        scheduler.semipd_init(client, plan, streams, start)
        info = scheduler.get_init_info()
        info["semipd_splits"] = [[s.prefill_sms, s.decode_sms] for s in streams.splits]
        info["semipd_start_split"] = start
        info["semipd_burst_split"] = burst_index(streams.splits)
        pipe_writer.send(info)
    except BaseException as exc:
        logger.exception("semi-PD %s worker failed to start", role)
        pipe_writer.send({"status": "error", "error": repr(exc)})
        raise
    from sglang_semipd.stack_sampler import maybe_start

    # diagnostics, off unless its environment variable is set; run_batch marks its phases
    scheduler.semipd_sampler = maybe_start(plan.kv_role())
    run_event_loop_to_exit(scheduler, role, plan.generation)


def run_event_loop_to_exit(scheduler: Any, role: str, generation: int) -> None:
    """Run a started worker's SGLang event loop. It returns after SGLang's ``ShutdownReq``,
    once the worker has said goodbye to the memory manager (``semipd_shutdown_report``).
    A retire (``WorkerRetired``) ends the process with code 0; an exception out of the loop
    ends it with :data:`WORKER_CRASH_EXIT_CODE`, at once: SGLang's helper threads (and CUDA
    teardown) could otherwise keep a crashed worker's process alive, and the semi-PD
    scheduler, which takes a dead child down with the server, would never see it die while
    the worker's requests hung."""
    try:
        scheduler.run_event_loop()
        scheduler.semipd_shutdown_report()
    except WorkerRetired:  # an --sm-partition mps resize swapped this generation out
        logger.info("semi-PD %s worker (generation %d) retired", role, generation)
        logging.shutdown()
        os._exit(0)
    except Exception:  # as SGLang's run_scheduler_process, which then SIGQUITs its parent
        logger.exception("semi-PD %s worker (generation %d) crashed", role, generation)
        logging.shutdown()
        os._exit(WORKER_CRASH_EXIT_CODE)
