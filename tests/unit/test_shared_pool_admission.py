"""Both workers admit and allocate against one shared pool whose free count is an estimate.

* The prefill worker re-tries admission that SGLang blocked with ``batch_is_full``: SGLang
  0.5.17 admits nothing while its running batch's flag is set and clears it only at a decode
  step, which the prefill worker never runs (:class:`~sglang_semipd.workers.AdmissionRetry`).
* The decode worker leases its next step's slots before SGLang checks that the step fits
  (``RemoteTokenAllocator.secure``, tested against a real memory manager in
  ``test_remote_radix_cache.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_semipd.workers import ADMISSION_RETRY_S, AdmissionRetry


def _scheduler_stub(waiting: list) -> SimpleNamespace:
    """The attributes SGLang's prefill pass reads before its ``batch_is_full`` gate."""
    return SimpleNamespace(
        grammar_manager=SimpleNamespace(has_waiting_grammars=lambda: False),
        enable_hierarchical_cache=False, enable_priority_preemption=False,
        is_hybrid_swa=False, waiting_queue=waiting, chunked_req=None)


def test_sglang_admits_nothing_while_an_empty_running_batch_is_marked_full(tmp_path):
    """Pins the SGLang behaviour the prefill worker must undo: a waiting request and no
    running request, yet no prefill batch while the flag is set."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.runtime_context import publish, reset_context
    from sglang.srt.server_args import ServerArgs

    from sglang_semipd.testing.model_maker import make_model
    from sglang_semipd.workers import role_server_args

    model = make_model(tmp_path / "tiny", "tiny", "bfloat16", seed=0)
    sa = ServerArgs(model_path=str(model), device="cpu", attention_backend="triton",
                    sampling_backend="pytorch", grammar_backend="none")
    publish(role_server_args("prefill", sa), role="scheduler")  # as the worker process does
    running = ScheduleBatch(reqs=[], batch_is_full=True)
    stub = _scheduler_stub(waiting=[object()])
    try:
        batch, still = Scheduler._get_new_batch_prefill_raw(
            stub, prefill_delayer_single_pass=None, running_batch=running)
    finally:
        reset_context()
    assert batch is None and still is running and running.batch_is_full
    assert running.is_empty()


def test_the_flag_is_cleared_after_the_retry_interval_and_only_then():
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    now = [100.0]
    retry = AdmissionRetry(retry_s=0.01, clock=lambda: now[0])
    running = ScheduleBatch(reqs=[], batch_is_full=True)
    assert retry.check(running) is False and running.batch_is_full  # first seen full
    now[0] += 0.005
    assert retry.check(running) is False and running.batch_is_full
    now[0] += 0.006
    assert retry.check(running) is True and not running.batch_is_full
    assert retry.retries == 1
    # SGLang sets it again (admission failed again): another full interval before a retry
    running.batch_is_full = True
    assert retry.check(running) is False and running.batch_is_full
    now[0] += 0.011
    assert retry.check(running) is True and retry.retries == 2


def test_a_flag_cleared_elsewhere_restarts_the_interval():
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    now = [0.0]
    retry = AdmissionRetry(retry_s=1.0, clock=lambda: now[0])
    running = ScheduleBatch(reqs=[], batch_is_full=True)
    retry.check(running)
    running.batch_is_full = False  # e.g. SGLang cleared it when a merged batch shrank
    now[0] += 0.9
    assert retry.check(running) is False
    running.batch_is_full = True
    now[0] += 0.2
    assert retry.check(running) is False and running.batch_is_full  # interval restarted
    assert retry.check(None) is False


def test_the_default_interval_is_about_one_decode_step():
    assert 0.001 <= ADMISSION_RETRY_S <= 0.05
    assert AdmissionRetry().retry_s == pytest.approx(ADMISSION_RETRY_S)


def test_the_decode_seams_we_wrap_exist_in_sglang():
    """The decode worker secures its next step's slots in ``update_running_batch`` before
    SGLang's ``check_decode_mem``, counting with ``new_tokens_required_next_decode``."""
    import inspect

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler

    from sglang_semipd.workers import make_decode_scheduler_cls

    src = inspect.getsource(Scheduler.update_running_batch)
    assert '"KV cache pool is full. Retract requests. "' in src  # the GPU retract test's marker
    assert src.index("filter_batch") < src.index("check_decode_mem") < \
        src.index("prepare_for_decode")
    assert "new_tokens_required_next_decode" in inspect.getsource(ScheduleBatch.check_decode_mem)
    assert "update_running_batch" in make_decode_scheduler_cls().__dict__


def test_the_decode_worker_secures_the_step_before_sglang_checks_it(monkeypatch):
    """``DecodeScheduler.update_running_batch`` leases the next step's slots, then runs
    SGLang's (played here by a recorder: the override's order is under test)."""
    from types import SimpleNamespace

    from sglang.srt.managers.scheduler import Scheduler

    from sglang_semipd.workers import make_decode_scheduler_cls

    calls = []
    monkeypatch.setattr(Scheduler, "update_running_batch",
                        lambda self, batch: calls.append(("sglang", batch)) or batch)
    cls = make_decode_scheduler_cls()
    worker = object.__new__(cls)
    worker.token_to_kv_pool_allocator = SimpleNamespace(
        secure=lambda n: calls.append(("secure", n)) or True)
    batch = SimpleNamespace(is_empty=lambda: False, new_tokens_required_next_decode=lambda: 7)
    assert worker.update_running_batch(batch) is batch
    assert calls == [("secure", 7), ("sglang", batch)]
    calls.clear()
    empty = SimpleNamespace(is_empty=lambda: True)
    worker.update_running_batch(empty)
    assert calls == [("sglang", empty)]  # nothing to secure for an empty batch


def test_the_decode_worker_leases_a_re_prefill_before_sglang_admits_it(monkeypatch):
    """Requests the decode worker retracted wait in its queue and are re-prefilled by SGLang's
    prefill pass; the override leases what that pass may allocate first (the allocator side
    is tested against a real memory manager in ``test_remote_radix_cache.py``)."""
    from sglang.srt.managers.scheduler import Scheduler

    from sglang_semipd.workers import make_decode_scheduler_cls

    calls = []
    monkeypatch.setattr(Scheduler, "get_new_batch_prefill",
                        lambda self, running: calls.append(("sglang", running)) or "plan")
    worker = object.__new__(make_decode_scheduler_cls())
    alloc = SimpleNamespace(
        lease_block=64, leased_available=0,
        secure_up_to=lambda n: calls.append(("secure_up_to", n)) or n,
        release_lease=lambda: calls.append(("release_lease",)))
    worker.token_to_kv_pool_allocator = alloc
    worker.server_args = SimpleNamespace(chunked_prefill_size=512)
    worker.page_size = 1
    worker.waiting_queue = [SimpleNamespace(origin_input_ids=[1] * 100, output_ids=[2] * 30)]
    assert worker.get_new_batch_prefill("running") == "plan"
    assert calls == [("secure_up_to", 131), ("sglang", "running")]
    calls.clear()
    alloc.leased_available = 65  # the pass left more than a lease block unused: handed back
    worker.get_new_batch_prefill("running")
    assert calls == [("secure_up_to", 131), ("sglang", "running"), ("release_lease",)]
    calls.clear()
    worker.waiting_queue = []
    worker.get_new_batch_prefill("running")
    assert calls == [("sglang", "running")]  # nothing retracted: nothing leased


def test_the_re_prefill_bound_covers_whole_sequences_up_to_one_chunk():
    from sglang_semipd.workers import reprefill_bound

    reqs = [SimpleNamespace(origin_input_ids=[0] * n, output_ids=[0] * m)
            for n, m in ((300, 200), (1000, 0))]
    assert reprefill_bound(reqs, None, 1) == 1502
    assert reprefill_bound(reqs, -1, 1) == 1502  # chunked prefill off
    assert reprefill_bound(reqs, 512, 16) == 512 + 32  # one chunk, a page per request
    assert reprefill_bound([], 512, 1) == 0


def test_the_prefill_pass_seam_we_wrap_exists_in_sglang():
    import inspect

    from sglang.srt.managers.scheduler import Scheduler

    src = inspect.getsource(Scheduler.get_next_batch_to_run)
    assert "self.get_new_batch_prefill(running_batch)" in src
    assert "alloc_for_extend" in inspect.getsource(
        __import__("sglang.srt.managers.schedule_batch", fromlist=["x"]).ScheduleBatch
        .prepare_for_extend)


def test_a_request_dropped_on_arrival_of_its_hand_off_is_released_answered_and_noted():
    """The decode worker got the abort before the hand-off: it frees the request's own slots
    (not the radix-protected prefix), unlocks its node, frees its row, answers the abort to
    the TokenizerManager, and tells the scheduler the request ended (under mps the request's
    worker pair retires only once all its requests ended)."""
    import torch

    from sglang_semipd import protocol as P
    from sglang_semipd.workers import make_decode_scheduler_cls

    calls = []
    worker = object.__new__(make_decode_scheduler_cls())
    worker.req_to_token_pool = SimpleNamespace(req_to_token=torch.arange(40).reshape(4, 10))
    worker.semipd_client = SimpleNamespace(
        free=lambda t: calls.append(("free", t.tolist())),
        dec_lock_ref=lambda node: calls.append(("unlock", node)),
        free_req_rows=lambda rows: calls.append(("rows", rows)))
    worker.ipc_channels = SimpleNamespace(
        send_to_tokenizer=SimpleNamespace(
            send_output=lambda out: calls.append(("tokenizer", type(out).__name__, out.rid))),
        send_to_detokenizer=SimpleNamespace(socket=SimpleNamespace(
            send_multipart=lambda frames: calls.append(("note", P.decode_handoff(frames))))))
    worker._drop_orphan(P.HandOff(rid="x", req_pool_idx=2, kv_len=7, cache_protected_len=4,
                                  last_node=9))
    assert calls == [("free", [24, 25, 26]), ("unlock", 9), ("rows", [2]),
                     ("tokenizer", "AbortReq", "x"),
                     ("note", P.HandOff(rid="x", finished=True))]


def test_only_the_prefill_worker_publishes_sglangs_load_snapshot(tmp_path):
    """The decode worker closes the load-snapshot writer SGLang's init gave it (same slot,
    same file as the prefill worker's); SGLang's own publish then writes nothing."""
    import inspect

    from sglang.srt.managers.load_snapshot import LoadSnapshot, ShmLoadSnapshotWriter
    from sglang.srt.managers.scheduler import Scheduler

    from sglang_semipd.workers import make_decode_scheduler_cls, make_prefill_scheduler_cls

    decode_init = inspect.getsource(make_decode_scheduler_cls().semipd_init)
    assert "semipd_stop_load_snapshots()" in decode_init
    assert "semipd_stop_load_snapshots" not in inspect.getsource(
        make_prefill_scheduler_cls().semipd_init)
    worker = object.__new__(make_decode_scheduler_cls())
    path = tmp_path / "loads.shm"
    worker.load_snapshot_writer = writer = ShmLoadSnapshotWriter(str(path), 1, 0)
    before = path.read_bytes()
    worker.semipd_stop_load_snapshots()
    assert worker.load_snapshot_writer is None
    with pytest.raises(OSError):  # closed: its file descriptor is gone
        writer.write(LoadSnapshot(dp_rank=0, num_running_reqs=3))
    worker.load_inquirer = SimpleNamespace(
        get_loads=lambda: pytest.fail("a stopped writer still built a snapshot"))
    Scheduler.publish_load_snapshot(worker, force=True)  # SGLang's method, a no-op now
    assert path.read_bytes() == before
    worker.semipd_stop_load_snapshots()  # twice is harmless
