"""A worker of a swapped-out pair (``--sm-partition mps``) retires only when idle: the semi-PD
worker mixin (``workers._SemiPDMixin``) takes ``Retire`` from its control socket between
iterations, keeps serving while it still has work, and once idle gives its slots back to a real
memory-manager process (``RemoteTokenAllocator`` + ``Goodbye``) and leaves the event loop.
SGLang's ``Scheduler`` underneath is played by a small base class (the mixin is under test)."""

from __future__ import annotations

import multiprocessing as mp
import time
from types import SimpleNamespace

import pytest
import zmq

from sglang_semipd import protocol as P
from sglang_semipd.memory.client import KVStateClient
from sglang_semipd.memory.remote_allocator import RemoteTokenAllocator
from sglang_semipd.memory.rpc import KVStateServerConfig, run_kv_state_server
from sglang_semipd.testing.procs import wait_for_kv_server
from sglang_semipd.workers import WorkerRetired, _SemiPDMixin


class _Batch:
    def __init__(self, n: int, rids: tuple[str, ...] = ()) -> None:
        self.n = n
        self.reqs = [SimpleNamespace(rid=r) for r in rids]

    def is_empty(self) -> bool:
        return self.n == 0


class _SchedulerStandIn:
    """What the mixin uses of SGLang's ``Scheduler``."""

    def __init__(self) -> None:
        self.waiting_queue: list = []
        self.chunked_req = None
        self.calls = 0

    def get_next_batch_to_run(self, running_batch, last_batch):
        """SGLang returns a plan: the running batch and the batch to run (None: idle)."""
        self.calls += 1
        return SimpleNamespace(running_batch=running_batch, batch_to_run=None
                               if running_batch.is_empty() else running_batch)


class Worker(_SemiPDMixin, _SchedulerStandIn):
    semipd_role = "decode"


@pytest.fixture()
def manager(tmp_path):
    cfg = KVStateServerConfig(f"ipc://{tmp_path}/kv.sock", 4096, page_size=1, req_rows=16,
                              log_level="WARNING")
    proc = mp.get_context("spawn").Process(target=run_kv_state_server, args=(cfg,),
                                           daemon=True)
    proc.start()
    sup = KVStateClient(cfg.endpoint, "supervisor", timeout_s=15, register=False)
    wait_for_kv_server(sup, proc)
    yield cfg.endpoint, sup
    sup.shutdown()
    sup.close()
    proc.join(10)


def test_retire_waits_for_idle_then_gives_everything_back(manager, tmp_path):
    endpoint, sup = manager
    client = KVStateClient(endpoint, "decode@1-0", "decode@1", timeout_s=15)
    w = Worker()
    w.semipd_client = client
    w.token_to_kv_pool_allocator = RemoteTokenAllocator(client, lease_block=64)
    held = w.token_to_kv_pool_allocator.alloc(10)  # a running request's slots ...
    ctx = zmq.Context.instance()
    ctl = ctx.socket(zmq.PUSH)
    ctl.bind(f"ipc://{tmp_path}/ctl")
    w.semipd_control = ctx.socket(zmq.PULL)
    w.semipd_control.connect(f"ipc://{tmp_path}/ctl")
    w.semipd_streams = SimpleNamespace(splits=[None])
    time.sleep(0.1)
    ctl.send_multipart(P.encode_control(P.Retire(generation=1)))
    time.sleep(0.2)
    busy = _Batch(1)
    assert w.get_next_batch_to_run(busy, None).batch_to_run is busy  # still decoding
    assert w.semipd_retire and w.calls == 1
    w.waiting_queue.append(SimpleNamespace(rid="queued"))
    assert w.get_next_batch_to_run(_Batch(0), None).batch_to_run is None  # queued: stays
    w.waiting_queue.clear()
    w.token_to_kv_pool_allocator.free(held)  # ... finished
    assert sup.check_invariant().client_held  # the worker still holds its lease
    with pytest.raises(WorkerRetired):
        w.get_next_batch_to_run(_Batch(0), None)
    assert w.calls == 2  # it left without running another iteration
    report = sup.check_invariant()
    assert report.ok and report.client_held == {} and report.leased == 0, report
    ctl.close(0)
    w.semipd_control.close(0)


def test_a_worker_holding_requests_without_running_a_batch_says_so_once(monkeypatch, caplog):
    """The stall report: a worker that holds requests but has run no batch for
    ``STALL_REPORT_S`` logs one warning naming where they are; running a batch re-arms it."""
    import sglang_semipd.workers as W

    monkeypatch.setattr(W, "STALL_REPORT_S", 0.05)
    w = Worker()
    w._poll_control = lambda: None
    w.running_batch = _Batch(0)
    w.get_next_batch_to_run(_Batch(0), None)  # idle, nothing held: no report
    time.sleep(0.1)
    w.get_next_batch_to_run(_Batch(0), None)
    assert "no batch" not in caplog.text
    w.waiting_queue.extend(SimpleNamespace(rid=f"r{i}") for i in range(7))
    w.get_next_batch_to_run(_Batch(0), None)
    time.sleep(0.1)
    for _ in range(3):
        w.get_next_batch_to_run(_Batch(0), None)
    reports = [r.getMessage() for r in caplog.records if "no batch" in r.getMessage()]
    assert len(reports) == 1 and "waiting: 7 (r0, r1, r2, r3, r4, ...)" in reports[0]
    w.get_next_batch_to_run(_Batch(1, ("r9",)), None)  # a batch ran: re-armed
    time.sleep(0.1)
    w.get_next_batch_to_run(_Batch(0), None)
    assert len([r for r in caplog.records if "no batch" in r.getMessage()]) == 2


class _ResultsStandIn:
    """SGLang's ``process_batch_result`` (the results of one launched step)."""

    def __init__(self) -> None:
        self.processed: list = []

    def process_batch_result(self, batch, result):
        self.processed.append(result)


class OverlapWorker(_SemiPDMixin, _ResultsStandIn):
    semipd_role = "decode"


def test_overlap_reports_each_step_when_its_result_is_in(monkeypatch):
    """Under the overlap loop a step's report goes out when its result is processed, in
    launch order: from the later of its launch and the previous step's result, to now."""
    w = OverlapWorker()
    sent: list = []
    w._send_control = sent.append
    w.semipd_launched = __import__("collections").deque()
    w.semipd_last_ready = 0.0

    def stat(i: int, launched: float) -> P.IterationStat:
        return P.IterationStat(role="decode", iteration=i, split=1, mode="decode", batch_size=4,
                               tokens=4, start=launched, end=launched, queued=0)

    clock = iter([10.0, 10.5, 12.0])
    monkeypatch.setattr("sglang_semipd.workers.time.monotonic", lambda: next(clock))
    w.semipd_launched.extend([stat(0, 9.0), stat(1, 9.2)])  # step 1 queued behind step 0
    w.process_batch_result(None, "r0")
    w.process_batch_result(None, "r1")
    w.semipd_launched.append(stat(2, 11.0))  # launched after an idle gap
    w.process_batch_result(None, "r2")
    assert w.processed == ["r0", "r1", "r2"]
    assert [(s.iteration, s.start, s.end) for s in sent] == [
        (0, 9.0, 10.0), (1, 10.0, 10.5), (2, 11.0, 12.0)]
    w.process_batch_result(None, "r3")  # not overlapped (nothing launched here): no report
    assert len(sent) == 3


class _LoopThatLeavesAThread:
    """An event loop that starts a non-daemon helper thread (as SGLang's do) and then ends
    with ``outcome``: an exception to raise, or None to return."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    def run_event_loop(self) -> None:
        import threading

        threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
        if self.outcome is not None:
            raise self.outcome


def _run_loop(outcome) -> None:
    from sglang_semipd.workers import run_event_loop_to_exit

    run_event_loop_to_exit(_LoopThatLeavesAThread(outcome), "prefill", 0)


@pytest.mark.parametrize("outcome,code", [(RuntimeError("a bug in a result pass"), None),
                                          (WorkerRetired(), 0)], ids=["crash", "retire"])
def test_a_worker_whose_loop_ends_exits_though_a_helper_thread_lives_on(outcome, code):
    """The scheduler takes the server down when a worker process dies; a crashed worker's
    process must therefore die even with SGLang's helper threads still running (on the H100 a
    prefill worker's exception left its process alive and every request hung until the
    client gave up). A retired worker exits 0, a crashed one with WORKER_CRASH_EXIT_CODE."""
    from sglang_semipd.workers import WORKER_CRASH_EXIT_CODE

    proc = mp.get_context("spawn").Process(target=_run_loop, args=(outcome,))
    proc.start()
    proc.join(30)
    alive = proc.is_alive()
    if alive:
        proc.kill()
        proc.join(5)
    assert not alive, "the worker process outlived its event loop"
    assert proc.exitcode == (WORKER_CRASH_EXIT_CODE if code is None else code)
