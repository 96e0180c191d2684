"""The semi-PD scheduler process: SGLang's ``run_scheduler_process_func`` for one GPU.

SGLang's launcher (``http_server.launch_server``) starts this function where it would start
its own scheduler. It brings up, in this order, the memory manager
(:mod:`sglang_semipd.memory_manager`), the prefill worker and the decode worker
(:mod:`sglang_semipd.workers`, SGLang ``Scheduler`` subclasses), then reports ready to the
launcher and routes messages between them:

* from the TokenizerManager (SGLang's pickled messages, forwarded as the same bytes):
  generation requests, aborts and fire-and-forget control messages go to **both** workers
  (the decode worker builds its own ``Req`` for every request and parks it until the
  hand-off); requests that need exactly one reply (flush cache, internal state, profiling,
  weight updates, ...) and embedding requests go to the **prefill** worker only;
* from each worker's output socket (SGLang's ``send_to_detokenizer``, pointed at us): its
  token outputs, forwarded unchanged to the DetokenizerManager through one socket, and -- on
  the prefill worker's socket only -- :class:`~sglang_semipd.protocol.HandOff` records
  (typed, msgspec), forwarded to the decode worker. Because a hand-off travels on the same
  socket as the first token it announces, and we forward in arrival order, the detokenizer
  always sees the prefill worker's first token of a request before any decode output for it.

Replies to control requests go from the prefill worker straight to the TokenizerManager. If
any child dies this process exits non-zero, which makes SGLang's watchdog tear the whole server
down.

Under ``--sm-partition mps`` a resize starts a standby worker pair and swaps it in once it is
ready; swapped-out pairs (:class:`Generation`) finish their own requests and then retire
(:mod:`sglang_semipd.partition.standby`). A retired worker's clean exit is not a failure.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import tempfile
import time
from typing import Any, Optional

import zmq
from sglang.srt.utils.network import get_free_port

from sglang_semipd import protocol as P
from sglang_semipd.config import SemiPDConfig
from sglang_semipd.partition.controller import PartitionController
from sglang_semipd.partition.resize import ResizeTracker
from sglang_semipd.partition.splits import SMSplit, loan_and_base_fractions, nearest_split
from sglang_semipd.partition.standby import GenerationTracker
from sglang_semipd.trace import Trace

logger = logging.getLogger(__name__)

# SGLang message classes (by name) that both workers must see.
TO_BOTH = frozenset({
    "TokenizedGenerateReqInput", "BatchTokenizedGenerateReqInput", "AbortReq",
    "CloseSessionReqInput", "ShutdownReq", "PauseGenerationReqInput",
    "ContinueGenerationReqInput", "ConfigureLoggingReq",
})


HOLD_TIMEOUT_S = 10.0  # longest a cache flush waits for the decode worker's release


def also_to_decode(obj: Any) -> bool:
    """Whether one SGLang message from the TokenizerManager goes to the decode worker too
    (every message goes to the prefill worker)."""
    return type(obj).__name__ in TO_BOTH


@dataclasses.dataclass(frozen=True)
class WorkerEndpoints:
    """Private endpoints of one worker (the rest of its PortArgs are SGLang's own)."""

    role: str
    scheduler_input: str  # we bind PUSH, the worker's Scheduler connects PULL
    rpc: str
    output: str  # the worker's detokenizer socket connects here; we bind PULL
    handoff: str  # decode only: hand-offs for it (we bind PUSH, it connects PULL)
    control: str  # resize commands (we bind PUSH, it connects PULL)
    nccl_port: int


GENERATION_REQS = frozenset({"TokenizedGenerateReqInput", "BatchTokenizedGenerateReqInput"})
RETIRE_WARN_S = 60.0  # a retiring worker still up this long after Retire is logged


@dataclasses.dataclass
class Generation:
    """One prefill/decode pair and the scheduler's sockets to it. The current pair's sockets
    are the Coordinator's own attributes; under ``--sm-partition mps`` a resize starts a
    standby pair (:mod:`sglang_semipd.partition.standby`) and the swapped-out one is kept here
    until it retires."""

    id: int
    split: int
    endpoints: dict[str, "WorkerEndpoints"]
    to_worker: dict[str, Any]
    from_worker: dict[str, Any]
    to_control: dict[str, Any]
    to_decode: Any
    procs: dict[str, Any] = dataclasses.field(default_factory=dict)
    pipes: dict[str, Any] = dataclasses.field(default_factory=dict)
    ready: dict[str, dict] = dataclasses.field(default_factory=dict)
    started_at: float = 0.0
    retire_sent_at: Optional[float] = None
    warned: bool = False

    def sockets(self) -> list[Any]:
        return [*self.to_worker.values(), *self.from_worker.values(),
                *self.to_control.values(), self.to_decode]


def _sms(split: SMSplit) -> str:
    return split.describe()


def worker_port_args(port_args: Any, ep: WorkerEndpoints) -> Any:
    """SGLang PortArgs for one worker: its own input, RPC and NCCL port; the tokenizer and
    detokenizer endpoints (and instance id) stay the server's."""
    pa = copy.deepcopy(port_args)
    pa.scheduler_input_ipc_name = ep.scheduler_input
    pa.rpc_ipc_name = ep.rpc
    pa.detokenizer_ipc_name = ep.output
    pa.nccl_port = ep.nccl_port
    return pa


class Coordinator:
    """Owns the child processes and the routing loop (see the module docstring)."""

    def __init__(self, server_args: Any, port_args: Any, gpu_id: int, tp_rank: int,
                 semipd: Optional[SemiPDConfig] = None) -> None:
        self.server_args, self.port_args = server_args, port_args
        self.gpu_id, self.tp_rank = gpu_id, tp_rank
        self.cfg = semipd or SemiPDConfig()
        self.run_dir = tempfile.mkdtemp(prefix="semipd-run-")
        self.kv_endpoint = f"ipc://{self.run_dir}/kv.sock"
        self.weight_socket = f"{self.run_dir}/weights.sock"
        self.endpoints = self._make_endpoints(0)
        self.procs: dict[str, Any] = {}
        self.gens = GenerationTracker()  # request -> worker generation (mps resizes)
        self.old: dict[int, Generation] = {}  # swapped out, finishing their requests
        self.standby: Optional[Generation] = None  # starting, for an mps resize
        self._next_gen = 1
        self._sockets_changed = False
        self._manager_ready: Any = None
        self.ctx = zmq.Context.instance()
        self.handoffs = 0
        self.splits: list[SMSplit] = []
        self.resizes: Optional[ResizeTracker] = None
        self.controller: Optional[PartitionController] = None
        self.metrics: Any = None  # PartitionMetrics with --enable-metrics
        self.controller_s = 0.0  # time spent feeding the controller (overhead)
        self.trace = Trace.from_env()
        self._held: list[bytes] = []  # prefill-bound messages behind a cache flush
        self._quiet_seqs: set[int] = set()  # resizes (and their acks) logged at DEBUG
        self._release_seq = 0
        self._held_since = 0.0
        self._stop = False
        self._shutting_down = False  # SGLang's ShutdownReq went to the workers

    # ------------------------------------------------------------ start-up
    def start(self, pipes: Optional[dict[str, Any]] = None) -> dict:
        """Wait until the memory manager and both workers (spawned by :meth:`spawn_children`,
        unless ``pipes`` says they were) are ready; returns SGLang's ready dict."""
        pipes = pipes if pipes is not None else self.spawn_children()
        info = self._wait_ready("memory_manager", pipes["memory_manager"])
        logger.info("memory manager ready: %d KV slots, %.2f GiB weights, %d derived weight "
                    "tensors shared; start-up phases (s): %s", info["max_total_num_tokens"],
                    info["weights_bytes"] / 2**30, info.get("derived_weights", 0),
                    info.get("startup_phases_s"))
        self._bind_sockets()
        self._manager_ready.set()
        ready = {role: self._wait_ready(role, pipes[role]) for role in self.endpoints}
        burst = ready["prefill"].get("semipd_burst_split")
        self.splits = [SMSplit(p, d, 1.0 if i == burst else p / (p + d), unconfined=i == burst)
                       for i, (p, d) in enumerate(ready["prefill"]["semipd_splits"])]
        start = ready["prefill"]["semipd_start_split"]
        self.resizes = ResizeTracker(start)
        cfg = self.cfg
        fractions = [x.prefill_fraction for x in self.splits]
        loans, base = loan_and_base_fractions(self.splits, cfg.sm_splits, cfg.plans_loan_splits)
        self.controller = PartitionController(
            fractions, start,
            policy=cfg.partition_policy if cfg.sm_partition == "green" else "static",
            ttft_s=cfg.slo_ttft_ms / 1e3, tpot_s=cfg.slo_tpot_ms / 1e3,
            attainment=cfg.slo_attainment, now=time.monotonic(), loan_fractions=loans,
            base_fractions=base, burst_split=burst, eager_loan=cfg.eager_loan)
        if getattr(self.server_args, "enable_metrics", False):
            from sglang_semipd.partition.metrics import PartitionMetrics

            self.metrics = PartitionMetrics(
                {"model_name": str(self.server_args.served_model_name)})
            self.metrics.set_split(self.splits[start])
        logger.info("SM partition %s: splits (prefill/decode SMs) %s, starting on %s",
                    self.cfg.sm_partition, ", ".join(map(_sms, self.splits)),
                    _sms(self.splits[start]))
        return {"status": "ready", "max_total_num_tokens": info["max_total_num_tokens"],
                "max_req_input_len": ready["prefill"]["max_req_input_len"],
                "startup_time": ready["prefill"].get("startup_time")}

    def spawn_children(self) -> dict[str, Any]:
        """Spawn the memory manager and both workers at once, without waiting (the workers
        import SGLang while the manager loads the model, and touch CUDA only once it is
        ready); returns their ready pipes for :meth:`start`."""
        from sglang_semipd.memory_manager import MemoryManagerSpec, run_memory_manager

        self._manager_ready = mp.get_context("spawn").Event()
        spec = MemoryManagerSpec(server_args=self.server_args, kv_endpoint=self.kv_endpoint,
                                 weight_socket=self.weight_socket, nccl_port=get_free_port(),
                                 gpu_id=self.gpu_id, tp_rank=self.tp_rank,
                                 log_level=self.server_args.log_level or "info")
        pipes = {}
        self.procs["memory_manager"], pipes["memory_manager"] = self._spawn(
            "memory_manager", run_memory_manager, (spec,))
        for role, ep in self.endpoints.items():
            self.procs[role], pipes[role] = self._spawn_worker(role, ep, 0, None)
        return pipes

    def _spawn(self, name: str, target: Any, args: tuple) -> tuple[Any, Any]:
        """(process, ready pipe): ``target(*args, pipe_writer)`` in a spawned process."""
        spawn = mp.get_context("spawn")
        reader, writer = spawn.Pipe(duplex=False)
        proc = spawn.Process(target=target, args=(*args, writer), name=f"semipd-{name}")
        proc.start()
        return proc, reader

    def _spawn_worker(self, role: str, ep: WorkerEndpoints, gen_id: int,
                      split: Optional[int]) -> tuple[Any, Any]:
        """(process, ready pipe) of one worker of generation ``gen_id`` (0: the pair started
        with the server, on ``--prefill-sm-share``; else an mps standby on ``split``)."""
        from sglang_semipd.workers import WorkerPlan, run_worker_process

        share = self.cfg.prefill_sm_share if split is None else \
            self.splits[split].prefill_fraction
        plan = WorkerPlan(role=role, kv_endpoint=self.kv_endpoint, handoff_endpoint=ep.handoff,
                          control_endpoint=ep.control, sm_partition=self.cfg.sm_partition,
                          shares=self.cfg.planned_shares, start_share=share, gpu_id=self.gpu_id,
                          tp_rank=self.tp_rank, generation=gen_id,
                          decode_overlap=self.cfg.decode_overlap,
                          batch_handoff=self.cfg.batch_handoff,
                          prefill_overlap=self.cfg.prefill_overlap,
                          prefill_chunk_reserve=self.cfg.prefill_chunk_reserve,
                          prefill_graphs=self.cfg.prefill_graphs,
                          burst_unconfined=self.cfg.burst_unconfined)
        args = (plan, self.server_args, worker_port_args(self.port_args, ep),
                self._manager_ready)
        return self._spawn(role if gen_id == 0 else f"{role}@{gen_id}", run_worker_process,
                           args)

    def _wait_ready(self, name: str, reader: Any, timeout_s: float = 900.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while not reader.poll(1.0):
            for other, proc in self.procs.items():
                if not proc.is_alive():
                    raise RuntimeError(f"semi-PD {other} died during start-up "
                                       f"(exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"semi-PD {name} did not start in {timeout_s:.0f}s")
        msg = reader.recv()
        if not isinstance(msg, dict) or "error" in msg or msg.get("status", "ready") != "ready":
            raise RuntimeError(f"semi-PD {name} failed to start: {msg}")
        return msg

    def _bind_sockets(self) -> None:
        self.from_tokenizer = self.ctx.socket(zmq.PULL)
        self.from_tokenizer.connect(self.port_args.scheduler_input_ipc_name)
        self.to_detokenizer = self.ctx.socket(zmq.PUSH)
        self.to_detokenizer.connect(self.port_args.detokenizer_ipc_name)
        g = self._bind_generation(0, self.endpoints, split=0)
        self.to_worker, self.from_worker = g.to_worker, g.from_worker
        self.to_control, self.to_decode = g.to_control, g.to_decode

    def _make_endpoints(self, gen: int) -> dict[str, WorkerEndpoints]:
        tag = "" if gen == 0 else f"@{gen}"
        return {role: WorkerEndpoints(
            role, f"ipc://{self.run_dir}/{role}{tag}-in", f"ipc://{self.run_dir}/{role}{tag}-rpc",
            f"ipc://{self.run_dir}/{role}{tag}-out", f"ipc://{self.run_dir}/{role}{tag}-handoff",
            f"ipc://{self.run_dir}/{role}{tag}-ctl", get_free_port())
            for role in ("prefill", "decode")}

    def _bind_generation(self, gen: int, endpoints: dict[str, WorkerEndpoints],
                         split: int) -> Generation:
        """Bind our side of one worker pair's private sockets (the workers connect)."""
        def bound(kind: int, addr: str) -> Any:
            sock = self.ctx.socket(kind)
            sock.bind(addr)
            return sock

        return Generation(
            id=gen, split=split, endpoints=endpoints,
            to_worker={r: bound(zmq.PUSH, ep.scheduler_input) for r, ep in endpoints.items()},
            from_worker={r: bound(zmq.PULL, ep.output) for r, ep in endpoints.items()},
            to_control={r: bound(zmq.PUSH, ep.control) for r, ep in endpoints.items()},
            to_decode=bound(zmq.PUSH, endpoints["decode"].handoff))

    # ------------------------------------------------------------ routing
    def _poller(self) -> Any:
        poller = zmq.Poller()
        poller.register(self.from_tokenizer, zmq.POLLIN)
        for sock in self.from_worker.values():
            poller.register(sock, zmq.POLLIN)
        for gen in self.old.values():
            for sock in gen.from_worker.values():
                poller.register(sock, zmq.POLLIN)
        return poller

    def serve(self) -> None:
        poller = self._poller()
        last_check = 0.0
        while not self._stop:
            if self._sockets_changed:
                poller, self._sockets_changed = self._poller(), False
            events = dict(poller.poll(self._poll_ms()))
            if self.from_tokenizer in events:
                self._drain_tokenizer()
            for role, sock in self.from_worker.items():
                if sock in events:
                    self._drain_outputs(role, sock, self.to_decode)
            for gen in list(self.old.values()):
                for role, sock in gen.from_worker.items():
                    if sock in events:
                        self._drain_outputs(role, sock, gen.to_decode)
            if self.standby is not None:
                self._poll_standby()
            now = time.monotonic()
            if self._held and now - self._held_since > HOLD_TIMEOUT_S:
                logger.warning("decode worker did not release its idle slots in %.0f s; "
                               "flushing anyway", HOLD_TIMEOUT_S)
                self._release_held()
            if self.controller is not None:
                self._guarded(self._tick, now)
            # children are checked once a second, ten times a second once SGLang asked the
            # workers to shut down (the server's exit waits for this loop to see them gone)
            if now - last_check > (0.1 if self._shutting_down else 1.0):
                last_check = now
                self._check_children()

    def _poll_ms(self) -> int:
        """The loop's poll timeout: 100 ms; 10 ms while a burst could start or end (a burst
        split planned, and a request waiting for its first token or a burst in force); the
        eager-loan delay (5 ms) while an eager loan could start; so that the controller's
        check runs on time even when no message arrives."""
        c = self.controller
        if c is None:
            return 100
        if c.eager_armed:
            return max(1, min(10, round(c.eager_after_s * 1000)))
        if c.burst_split is not None and (c.in_burst or c.latency.waiting_first_token):
            return 10
        return 100

    def _drain_tokenizer(self) -> None:
        while True:
            try:
                raw = self.from_tokenizer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            # SGLang's own wire format (send_pyobj), read only to route; the bytes go on
            obj = pickle.loads(raw)
            if self.controller is not None:
                self._guarded(self._observe_request, obj)
            name, both = type(obj).__name__, also_to_decode(obj)
            if name == "ShutdownReq" and not self._shutting_down:
                # SGLang's graceful exit (SIGTERM to the server): the workers release their
                # resources and exit 0, then this process stops (see _check_children)
                logger.info("SGLang asked the schedulers to shut down: the workers first")
                self._shutting_down = True
            if self.cfg.sm_partition == "mps" and name in GENERATION_REQS:
                for rid in _rids(obj):
                    self.gens.route(rid)  # served by the current pair, start to finish
            elif both:  # aborts & co.: swapped-out pairs still serve some
                for gen in self.old.values():
                    for sock in gen.to_worker.values():
                        sock.send(raw)
            if both:  # first: it must know the request before
                self.to_worker["decode"].send(raw)  # the hand-off
            if name == "FlushCacheReqInput" and not self._held:
                # the decode worker gives back its idle slots first, or the memory
                # manager's reset would see them held
                self._release_seq += 1
                self._held_since = time.monotonic()
                self.to_control["decode"].send_multipart(
                    P.encode_control(P.ReleaseIdle(seq=self._release_seq)))
                self._held.append(raw)
            elif self._held:
                self._held.append(raw)  # keep the prefill worker's order
            else:
                self.to_worker["prefill"].send(raw)

    def _guarded(self, fn: Any, arg: Any) -> None:
        """Run (and time, in ``controller_s``) a partition-controller step; a failure there
        must not take the server down: log it once and keep serving on the current split."""
        t0 = time.monotonic()
        try:
            fn(arg)
        except Exception:  # noqa: BLE001
            logger.exception("partition controller failed; serving on, split fixed at %s",
                             _sms(self.splits[self.resizes.split]) if self.resizes else "?")
            self.controller = None
        self.controller_s += time.monotonic() - t0

    def _observe_request(self, obj: Any) -> None:
        t0 = time.monotonic()
        name = type(obj).__name__
        decision = None
        if name in GENERATION_REQS:
            for rid, tokens in zip(_rids(obj), _prompt_lens(obj)):
                decision = self.controller.on_request(rid, t0, tokens) or decision
        elif name == "AbortReq" and obj.rid:
            self.controller.on_abort(obj.rid)
        self._apply_decision(decision)

    def _observe_output(self, obj: Any) -> None:
        """Per-request first tokens and finishes from SGLang's output batches (read only: the
        same bytes go on to the detokenizer)."""
        if type(obj).__name__ == "BatchTokenIDOutput":
            self.controller.on_output(obj.rids, obj.completion_tokens,
                                      [r is not None for r in obj.finished_reasons],
                                      time.monotonic())

    def _observe_handoff(self, h: Optional[P.HandOff]) -> None:
        self._apply_decision(self.controller.on_handoff(
            time.monotonic(), h.rid if h is not None else None))

    def _tick(self, now: float) -> None:
        self._apply_decision(self.controller.tick(now))
        if self.metrics is not None and self.controller.attainment is not None:
            self.metrics.attainment.set(self.controller.attainment)

    def _apply_decision(self, decision: Any) -> None:
        if decision is None:
            return
        self.trace.write("decision", {
            "t": decision.t, "share": decision.share, "previous": decision.previous_share,
            "target": decision.target_share, "mode": decision.mode, "reason": decision.reason,
            "loan": decision.loan, "split": decision.split, "inputs": dict(decision.inputs)})
        reason = f"{decision.mode}: {decision.reason}"
        quiet = decision.mode.startswith("eager-")  # come and go with every request
        if decision.split is not None:  # a burst move names its split
            self.resize(decision.split, reason=reason)
        elif decision.changed:
            self.resize_to_share(decision.share, reason=reason, quiet=quiet)

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for raw in held:
            self.to_worker["prefill"].send(raw)

    def _drain_outputs(self, role: str, sock: Any, to_decode: Any) -> None:
        """One worker's output socket; its hand-offs go to ``to_decode``, the decode worker of
        the same pair."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            tag = frames[0].bytes if len(frames) == 2 else None
            if tag == P.HANDOFF_TAG:
                mps = self.cfg.sm_partition == "mps"
                h = (self._read_handoff(frames)
                     if mps or (role == "prefill" and self.controller is not None) else None)
                if mps and h is not None:
                    self._on_handoff(h)
                if role == "prefill":
                    self.handoffs += 1
                    if self.controller is not None:  # a decode loan ends before it arrives
                        self._guarded(self._observe_handoff, h)
                    to_decode.send_multipart(frames, copy=False)
                # from the decode worker: only a note that a request ended there (above)
            elif tag == P.CONTROL_TAG:
                self._on_control(role, frames)
            else:
                if len(frames) == 1 and (self.controller is not None
                                         or self.cfg.sm_partition == "mps"):
                    self._on_output_batch(frames)
                self.to_detokenizer.send_multipart(frames, copy=False)

    def _on_output_batch(self, frames: Any) -> None:
        """Read (never change) one SGLang output batch: the controller's latencies (every
        policy: its tracker must see requests finish) and, under mps, finished requests of
        swapped-out pairs."""
        obj = pickle.loads(frames[0].buffer)
        if self.controller is not None:
            self._guarded(self._observe_output, obj)
        if self.cfg.sm_partition == "mps":
            rids, reasons = getattr(obj, "rids", None), getattr(obj, "finished_reasons", None)
            if rids and reasons:
                done = [r for r, why in zip(rids, reasons) if why is not None]
                for gen in self.gens.finish(done):
                    self._retire(gen)

    @staticmethod
    def _read_handoff(frames: Any) -> Optional[P.HandOff]:
        try:
            return P.decode_handoff(frames)
        except P.ProtocolError as exc:
            logger.error("unreadable hand-off: %s", exc)
            return None

    def _on_handoff(self, h: P.HandOff) -> None:
        """Under mps: a hand-off marked ``finished`` ends its request in its generation. The
        workers answer some requests straight to the TokenizerManager (an abort of a queued
        request, a request aborted while its hand-off was on the way), so no output batch
        through here says they finished; without this their pair would never retire."""
        if h.finished:
            for gen in self.gens.finish([h.rid]):
                self._retire(gen)

    # ------------------------------------------------------------ SM partition
    def _on_control(self, role: str, frames: Any) -> None:
        try:
            msg = P.decode_control(frames)
        except P.ProtocolError as exc:
            logger.error("dropping a malformed control message from %s: %s", role, exc)
            return
        if isinstance(msg, P.IterationStat):
            self.trace.write("iteration", msg)
            if self.metrics is not None:
                self.metrics.observe_iteration(msg.role, msg.end - msg.start)
            if self.controller is not None:
                self._guarded(lambda m: self._apply_decision(self.controller.on_iteration(m)),
                              msg)
        elif isinstance(msg, P.ResizeAck):
            self._on_ack(msg)
        elif isinstance(msg, P.ResizeRequest):
            self._on_resize_request(msg)
        elif isinstance(msg, P.Released):
            if msg.seq == self._release_seq and self._held:
                self._release_held()
        else:
            logger.error("unexpected control message from %s: %r", role, msg)

    def _on_resize_request(self, msg: P.ResizeRequest) -> None:
        """An operator's ``/set_internal_state``: a policy switch and/or a share."""
        if msg.share is not None and not 0.0 < msg.share < 1.0:
            logger.error("dropping a resize request for share %r", msg.share)
            return
        split = None if msg.share is None else nearest_split(self.splits, msg.share)
        if msg.policy is not None:
            if self.controller is None or self.cfg.sm_partition != "green":
                logger.warning("partition policy %r ignored: no controller for --sm-partition "
                               "%s", msg.policy, self.cfg.sm_partition)
            else:
                try:
                    self.controller.set_policy(msg.policy, split)
                except ValueError as exc:
                    logger.error("dropping a resize request: %s", exc)
                    return
                logger.info("partition policy set to %s (set_internal_state)", msg.policy)
                self.trace.write("policy", {"t": time.monotonic(), "policy": msg.policy,
                                            "split": split})
        if split is not None:
            self.resize(split, reason="set_internal_state")

    def resize_to_share(self, share: float, reason: str = "",
                        quiet: bool = False) -> Optional[P.Resize]:
        """Resize both workers to the planned split nearest to ``share`` (prefill)."""
        return self.resize(nearest_split(self.splits, share), reason, quiet)

    def resize(self, split: int, reason: str = "", quiet: bool = False) -> Optional[P.Resize]:
        """Send a resize to both workers (a newer one supersedes one still in flight);
        None when they already run on ``split`` or the mode cannot resize in place.
        ``quiet``: logged at DEBUG, not INFO (eager loans)."""
        if self.resizes is None or not 0 <= split < len(self.splits):
            raise ValueError(f"no planned split {split}")
        if self.cfg.sm_partition == "mps":
            self._start_standby(split, reason)
            return None
        if self.cfg.sm_partition != "green":
            logger.warning("--sm-partition %s does not resize; ignoring a resize to %s (%s)",
                           self.cfg.sm_partition, _sms(self.splits[split]), reason)
            return None
        cmd = self.resizes.start(split, force=True, now=time.monotonic())
        if cmd is None:
            return None
        for sock in self.to_control.values():
            sock.send_multipart(P.encode_control(cmd))
        if quiet:
            self._quiet_seqs.add(cmd.seq)
        logger.log(logging.DEBUG if quiet else logging.INFO,
                   "resize #%d to %s prefill/decode SMs (%s)", cmd.seq,
                   _sms(self.splits[split]), reason or "requested")
        self.trace.write("resize", cmd, reason=reason)
        return cmd

    def _on_ack(self, ack: P.ResizeAck) -> None:
        tracker = self.resizes
        sent = tracker.in_flight.sent_at if tracker.in_flight is not None and \
            tracker.in_flight.seq == ack.seq else None
        try:
            done = tracker.on_ack(ack)
        except ValueError as exc:
            logger.error("dropping a resize ack: %s", exc)
            return
        latency_ms = (ack.applied_at - sent) * 1e3 if sent is not None else None
        if done and self.controller is not None:
            self.controller.on_resized(tracker.split)
        if self.metrics is not None:
            if latency_ms is not None:
                self.metrics.resize_latency.observe(latency_ms / 1e3)
            if done:
                self.metrics.resizes.inc()
                self.metrics.set_split(self.splits[tracker.split])
        self.trace.write("resize_ack", ack, latency_ms=latency_ms)
        logger.log(logging.DEBUG if ack.seq in self._quiet_seqs else logging.INFO,
                   "resize #%d: %s runs %s from iteration %d%s", ack.seq, ack.role,
                   _sms(self.splits[ack.split]), ack.iteration,
                   f" ({latency_ms:.2f} ms after the command)" if latency_ms is not None
                   else "")
        if done:  # this one and any it superseded are over
            self._quiet_seqs = {seq for seq in self._quiet_seqs if seq > ack.seq}

    # ------------------------------------------------------------ mps resizes
    def _start_standby(self, split: int, reason: str) -> None:
        """``--sm-partition mps``: start a prefill/decode pair with the new MPS percentages,
        attached to the same memory manager; :meth:`_poll_standby` swaps it in once ready."""
        if self.standby is not None:
            logger.warning("resize to %s ignored: the standby pair for %s is still starting",
                           _sms(self.splits[split]), _sms(self.splits[self.standby.split]))
            return
        if split == self.resizes.split:
            return
        gen_id, self._next_gen = self._next_gen, self._next_gen + 1
        endpoints = self._make_endpoints(gen_id)
        gen = self._bind_generation(gen_id, endpoints, split)
        gen.started_at = time.monotonic()
        self.standby = gen
        for role, ep in endpoints.items():
            gen.procs[role], gen.pipes[role] = self._spawn_worker(role, ep, gen_id, split)
        logger.info("mps resize to %s prefill/decode SMs: standby pair (generation %d) "
                    "starting (%s)", _sms(self.splits[split]), gen_id, reason or "requested")
        self.trace.write("standby_start", {"t": gen.started_at, "generation": gen_id,
                                           "split": split, "reason": reason})

    def _poll_standby(self) -> None:
        gen = self.standby
        for role, reader in gen.pipes.items():
            if role in gen.ready:
                continue
            if reader.poll():
                msg = reader.recv()
                if not isinstance(msg, dict) or "error" in msg or \
                        msg.get("status", "ready") != "ready":
                    return self._abandon_standby(f"{role} failed to start: {msg}")
                gen.ready[role] = msg
            elif not gen.procs[role].is_alive():
                return self._abandon_standby(f"{role} exited during start-up "
                                             f"(code {gen.procs[role].exitcode})")
        if len(gen.ready) == len(gen.procs):
            self._swap()

    def _abandon_standby(self, why: str) -> None:
        gen, self.standby = self.standby, None
        logger.error("mps resize abandoned, serving on %s: standby generation %d %s",
                     _sms(self.splits[self.resizes.split]), gen.id, why)
        for proc in gen.procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        for sock in gen.sockets():
            sock.close(0)
        self.trace.write("standby_failed", {"t": time.monotonic(), "generation": gen.id,
                                            "why": why})

    def _swap(self) -> None:
        """The standby pair becomes current: new requests go to it from now on; the old pair
        finishes what it has and then retires."""
        new, self.standby = self.standby, None
        old = Generation(id=self.gens.current, split=self.resizes.split,
                         endpoints=self.endpoints, to_worker=self.to_worker,
                         from_worker=self.from_worker, to_control=self.to_control,
                         to_decode=self.to_decode,
                         procs={r: self.procs.pop(r) for r in ("prefill", "decode")})
        self.old[old.id] = old
        self.endpoints, self.to_worker, self.from_worker = new.endpoints, new.to_worker, \
            new.from_worker
        self.to_control, self.to_decode = new.to_control, new.to_decode
        self.procs.update(new.procs)
        self.resizes = ResizeTracker(new.split)
        self._sockets_changed = True
        now = time.monotonic()
        latency_ms = (now - new.started_at) * 1e3
        logger.info("mps resize: generation %d (%s prefill/decode SMs) serves new requests "
                    "%.0f ms after the command; generation %d finishes its %d", new.id,
                    _sms(self.splits[new.split]), latency_ms, old.id,
                    self.gens.in_flight(old.id))
        self.trace.write("standby_swap", {"t": now, "generation": new.id, "split": new.split,
                                          "latency_ms": latency_ms,
                                          "old_in_flight": self.gens.in_flight(old.id)})
        if self.controller is not None:
            self.controller.on_resized(new.split)
        if self.metrics is not None:
            self.metrics.resize_latency.observe(latency_ms / 1e3)
            self.metrics.resizes.inc()
            self.metrics.set_split(self.splits[new.split])
        empty = self.gens.swap(new.id)
        if empty is not None:
            self._retire(empty)

    def _retire(self, gen_id: int) -> None:
        gen = self.old[gen_id]
        gen.retire_sent_at = time.monotonic()
        for sock in gen.to_control.values():
            sock.send_multipart(P.encode_control(P.Retire(generation=gen_id)))
        logger.info("generation %d has no requests left: retiring it", gen_id)

    def _forget(self, gen: Generation) -> None:
        """Both workers of a retired generation exited cleanly."""
        for proc in gen.procs.values():
            proc.join(1)
        for sock in gen.sockets():
            sock.close(0)
        del self.old[gen.id]
        self.gens.retired(gen.id)
        self._sockets_changed = True
        self.trace.write("retired", {"t": time.monotonic(), "generation": gen.id})
        logger.info("generation %d retired", gen.id)

    def _check_children(self) -> None:
        """A child that exited is a failure (raises, and the server goes down), except the
        workers' exits after SGLang's ``ShutdownReq``: once every worker is gone this loop
        stops and :meth:`stop` ends the memory manager."""
        if self._shutting_down:
            self._check_shutdown()
            return
        for name, proc in self.procs.items():
            if not proc.is_alive():
                raise RuntimeError(f"semi-PD {name} exited (code {proc.exitcode})")
        for gen in list(self.old.values()):
            for role, proc in gen.procs.items():
                if not proc.is_alive() and (gen.retire_sent_at is None or proc.exitcode != 0):
                    raise RuntimeError(f"semi-PD {role} (generation {gen.id}) exited "
                                       f"(code {proc.exitcode})")
            if all(not p.is_alive() for p in gen.procs.values()):
                self._forget(gen)
            elif gen.retire_sent_at is not None and not gen.warned and \
                    time.monotonic() - gen.retire_sent_at > RETIRE_WARN_S:
                gen.warned = True
                logger.warning("generation %d not retired %.0f s after Retire (in flight: %d)",
                               gen.id, RETIRE_WARN_S, self.gens.in_flight(gen.id))

    def _check_shutdown(self) -> None:
        # the serving pairs got the ShutdownReq; a standby pair still starting did not, and
        # stop() ends it with the memory manager
        workers = {name: proc for name, proc in self.procs.items() if name != "memory_manager"}
        workers.update({f"{role} (generation {gen.id})": proc for gen in self.old.values()
                        for role, proc in gen.procs.items()})
        if any(proc.is_alive() for proc in workers.values()):
            return
        failed = {name: proc.exitcode for name, proc in workers.items() if proc.exitcode != 0}
        if failed:
            logger.warning("workers that exited with an error during shutdown: %s", failed)
        logger.info("every worker has shut down: stopping")
        self._stop = True

    def stop(self) -> None:
        others = [p for g in [*self.old.values(), self.standby] if g is not None
                  for p in g.procs.values()]
        for proc in [self.procs.get("prefill"), self.procs.get("decode"), *others,
                     self.procs.get("memory_manager")]:
            if proc is not None and proc.is_alive():
                proc.terminate()
        for proc in [*self.procs.values(), *others]:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
        if self.controller is not None:
            logger.info("partition controller (%s): %d decisions, %.1f ms of bookkeeping in "
                        "the scheduler loop", self.controller.kind, self.controller.decisions,
                        self.controller_s * 1e3)
        self.trace.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _single_reqs(obj: Any) -> list[Any]:
    """The single requests of an SGLang generation request (itself, or a batch's)."""
    return obj.batch if type(obj).__name__ == "BatchTokenizedGenerateReqInput" else [obj]


def _rids(obj: Any) -> list[str]:
    """The request ids of an SGLang generation request (one, or a batch's)."""
    return [r.rid for r in _single_reqs(obj)]


def _prompt_lens(obj: Any) -> list[int]:
    """The prompt lengths (input ids) of an SGLang generation request, as ``_rids`` orders
    them; 0 where a request carries no ids."""
    return [len(getattr(r, "input_ids", None) or ()) for r in _single_reqs(obj)]


def run_semipd_scheduler_process(server_args: Any, port_args: Any, gpu_id: int, tp_rank: int,
                                 attn_cp_rank: int, moe_dp_rank: int, moe_ep_rank: int,
                                 pp_rank: int, dp_rank: Optional[int], pipe_writer: Any,
                                 *display_ranks: Any,
                                 semipd: Optional[SemiPDConfig] = None) -> None:
    """SGLang's ``run_scheduler_process`` contract: send the ready dict on ``pipe_writer``,
    then serve until the server goes down. ``semipd``: the semi-PD flags (bound by the
    launcher with ``functools.partial``)."""
    coordinator = Coordinator(server_args, port_args, gpu_id, tp_rank, semipd)
    signal.signal(signal.SIGTERM, lambda *_: setattr(coordinator, "_stop", True))
    try:
        # the children first: their imports (the memory manager's are the server's start-up
        # critical path) then overlap this process's import of SGLang's scheduler module
        pipes = coordinator.spawn_children()
        from sglang.srt.managers.scheduler import configure_scheduler_process

        configure_scheduler_process(server_args, gpu_id, tp_rank, attn_cp_rank, moe_dp_rank,
                                    moe_ep_rank, pp_rank, dp_rank)
        pipe_writer.send(coordinator.start(pipes))
        from sglang_semipd.stack_sampler import maybe_start

        maybe_start("scheduler")  # diagnostics, off unless its environment variable is set
        coordinator.serve()
    except BaseException as exc:
        logger.exception("semi-PD scheduler failed")
        try:
            pipe_writer.send({"status": "error", "error": repr(exc)})
        except Exception:  # noqa: BLE001 - the launcher may already be gone
            pass
        coordinator.stop()
        os._exit(1)
    coordinator.stop()
