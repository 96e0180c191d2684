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


def _shutdown_worker(endpoint: str) -> Worker:
    client = KVStateClient(endpoint, "decode-0", "decode", timeout_s=15)
    w = Worker()
    w.semipd_client = client
    w.running_batch = _Batch(0)
    w.token_to_kv_pool_allocator = RemoteTokenAllocator(client, lease_block=64)
    return w


def _shutdown_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "at shutdown" in r.getMessage()]


def test_at_a_drained_shutdown_a_worker_gives_everything_back_and_says_what(manager, caplog):
    """After SGLang's ShutdownReq the worker's goodbye reaches the memory manager (which then
    logs what it held): a worker whose requests all finished reports nothing held, at INFO."""
    endpoint, sup = manager
    w = _shutdown_worker(endpoint)
    done = w.token_to_kv_pool_allocator.alloc(10)  # a finished request's slots, freed
    w.token_to_kv_pool_allocator.free(done)
    assert sup.check_invariant().client_held  # its slot lease is still open
    with caplog.at_level("INFO", logger="sglang_semipd.workers"):
        w.semipd_shutdown_report()
    report = sup.check_invariant()
    assert report.ok and report.client_held == {} and report.leased == 0, report
    assert _shutdown_lines(caplog) == [
        "semi-PD decode worker at shutdown: gave back 0 slots, 0 locks, 0 rows"]
    assert all(r.levelname == "INFO" for r in caplog.records if "at shutdown" in r.getMessage())


@pytest.mark.parametrize("with_request", [False, True], ids=["leaked", "request-left"])
def test_at_shutdown_slots_held_without_a_request_are_reported_as_a_leak(
        manager, caplog, with_request):
    endpoint, sup = manager
    w = _shutdown_worker(endpoint)
    w.token_to_kv_pool_allocator.alloc(10)  # never freed
    if with_request:  # ... because a request still runs (the drain left it)
        w.running_batch = _Batch(1, ("r7",))
    with caplog.at_level("INFO", logger="sglang_semipd.workers"):
        w.semipd_shutdown_report()
    assert sup.check_invariant().client_held == {}  # the goodbye gave them back either way
    [line] = _shutdown_lines(caplog)
    [rec] = [r for r in caplog.records if "at shutdown" in r.getMessage()]
    if with_request:
        assert line.endswith(
            "gave back 10 slots, 0 locks, 0 rows held by 1 request(s) still here")
        assert rec.levelname == "INFO"
    else:
        assert line.endswith("gave back 10 slots, 0 locks, 0 rows with no request left: leaked")
        assert rec.levelname == "WARNING"


def test_a_shutdown_goodbye_to_a_manager_already_gone_only_warns(tmp_path, caplog, monkeypatch):
    import sglang_semipd.workers as W

    monkeypatch.setattr(W, "SHUTDOWN_GOODBYE_TIMEOUT_S", 0.2)
    w = Worker()
    w.running_batch = _Batch(0)
    w.semipd_client = KVStateClient(f"ipc://{tmp_path}/nobody.sock", "decode-0", "decode",
                                    timeout_s=0.2, register=False)
    w._release_idle = lambda: None  # nothing leased: no allocator needed
    t0 = time.monotonic()
    w.semipd_shutdown_report()
    assert time.monotonic() - t0 < 5
    assert any("no goodbye to the memory manager at shutdown" in m
               for m in [r.getMessage() for r in caplog.records if r.levelname == "WARNING"])


def test_a_worker_whose_loop_returns_reports_before_it_exits():
    """``run_event_loop_to_exit`` calls the worker's shutdown report after SGLang's loop
    returns (ShutdownReq), and not after a crash or a retire."""
    from sglang_semipd.workers import run_event_loop_to_exit

    calls: list[str] = []
    loop = SimpleNamespace(run_event_loop=lambda: calls.append("loop"),
                           semipd_shutdown_report=lambda: calls.append("report"))
    run_event_loop_to_exit(loop, "decode", 0)
    assert calls == ["loop", "report"]
