"""The diagnostic stack sampler: counts where a thread spends its time, and writes them."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from sglang_semipd import stack_sampler as S


def _spin_here(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(200))


def _sleep_there(seconds: float) -> None:
    time.sleep(seconds)


def test_sampler_finds_where_the_thread_spends_its_time(tmp_path):
    path = tmp_path / "main.json"
    sampler = S.StackSampler(path, interval_s=0.001, dump_every_s=0.2)
    sampler.start()
    _spin_here(0.6)
    _sleep_there(0.2)
    sampler.stop()
    sampler.join(5)
    data = json.loads(path.read_text())
    assert data["samples"] > 50
    inclusive = dict(data["inclusive"])
    spin = next(v for k, v in inclusive.items() if k.endswith(" _spin_here"))
    sleep = next(v for k, v in inclusive.items() if k.endswith(" _sleep_there"))
    assert spin > sleep > 0.05  # 3:1 in wall time
    assert data["paths"][0][0].split(" <- ")[0].endswith(("_spin_here", "<genexpr>"))
    this_test = "test_sampler_finds_where_the_thread_spends_its_time"
    assert inclusive[next(k for k in inclusive if k.endswith(this_test))] > 0.95


def test_sampler_stops_when_its_thread_is_gone(tmp_path):
    done = threading.Event()
    holder: dict = {}

    def target() -> None:
        holder["s"] = S.StackSampler(tmp_path / "t.json", interval_s=0.001)
        holder["s"].start()
        _spin_here(0.05)
        done.set()

    t = threading.Thread(target=target)
    t.start()
    t.join()
    holder["s"].join(5)
    assert not holder["s"].is_alive()
    assert json.loads((tmp_path / "t.json").read_text())["samples"] > 0


def test_maybe_start_is_off_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(S.SAMPLES_ENV, raising=False)
    assert S.maybe_start("x") is None
    monkeypatch.setenv(S.SAMPLES_ENV, str(tmp_path / "d"))
    sampler = S.maybe_start("decode")
    try:
        assert sampler is not None and sampler.path.parent == tmp_path / "d"
        assert sampler.path.name.startswith("decode-")
    finally:
        sampler.stop()
        sampler.join(5)
    assert sampler.path.exists()


def test_bad_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match="interval_s"):
        S.StackSampler(tmp_path / "x.json", interval_s=0)


def test_samples_are_also_counted_per_phase_the_thread_sets(tmp_path):
    sampler = S.StackSampler(tmp_path / "p.json", interval_s=0.001)
    sampler.start()
    sampler.phase = S.GAP_WAITING
    _spin_here(0.3)
    sampler.phase = None
    _sleep_there(0.2)
    sampler.phase = "other"
    _sleep_there(0.1)
    sampler.stop()
    sampler.join(5)
    data = sampler.snapshot()
    assert set(data["phases"]) == {S.GAP_WAITING, "other"}
    gap = dict(data["phases"][S.GAP_WAITING]["inclusive"])
    other = dict(data["phases"]["other"]["inclusive"])
    assert next(v for k, v in gap.items() if k.endswith(" _spin_here")) > 0.9
    assert not any(k.endswith(" _sleep_there") and v > 0.1 for k, v in gap.items())
    assert next(v for k, v in other.items() if k.endswith(" _sleep_there")) > 0.9
    # every sample counts in the whole-life digest, a phase's only in its own
    assert data["samples"] > data["phases"][S.GAP_WAITING]["samples"] + \
        data["phases"]["other"]["samples"]
    assert 0.2 < data["phases"][S.GAP_WAITING]["sampled_s"] < 0.45


def test_a_worker_marks_its_forward_and_the_gap_while_requests_wait(tmp_path):
    """The semi-PD worker's ``run_batch`` (SGLang's forward underneath played by a recorder of
    the phase it runs in) sets the sampler's phase: ``forward`` during the forward, then
    ``GAP_WAITING`` until the next forward if requests were left waiting, else none."""
    from array import array

    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_semipd.partition.resize import WorkerResizeState
    from sglang_semipd.workers import make_prefill_scheduler_cls

    worker = object.__new__(make_prefill_scheduler_cls())
    worker.enable_overlap = False
    worker.semipd_resize = WorkerResizeState("prefill", 0)
    worker.semipd_sampler = sampler = S.StackSampler(None)  # not started: phases only
    reports, during = [], []
    worker._send_control = reports.append
    worker._forward_on = lambda split, batch: during.append(sampler.phase) or "result"
    req = Req("r", "", array("q", [1, 2]), SamplingParams())
    batch = ScheduleBatch(reqs=[req], forward_mode=ForwardMode.EXTEND, extend_num_tokens=2)
    for waiting, after in (([req], S.GAP_WAITING), ([], None)):
        worker.waiting_queue = waiting
        assert worker.run_batch(batch) == "result"
        assert during.pop() == "forward" and sampler.phase == after
    assert [r.queued for r in reports] == [1, 0]


def test_timeline_says_which_second_the_thread_was_where(tmp_path):
    path = tmp_path / "main.json"
    sampler = S.StackSampler(path, interval_s=0.001, dump_every_s=10.0)
    sampler.start()
    start = int(time.time())
    _spin_here(1.2)
    _sleep_there(1.2)
    sampler.stop()
    sampler.join(5)
    data = json.loads(path.read_text())
    seconds = [row[0] for row in data["timeline"]]
    assert seconds == sorted(seconds) and seconds[0] >= start
    assert all(row[1] > 0 and len(row[2]) <= S.TIMELINE_TOP for row in data["timeline"])
    tops = [row[2][0][0].split(" <- ")[0] for row in data["timeline"]]
    assert tops[0].endswith(("_spin_here", "<genexpr>"))  # the first second: spinning
    assert any(t.endswith(" sleep") or "_sleep_there" in t for t in tops[-2:])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread CPU time from /proc")
def test_timeline_says_how_much_cpu_the_thread_used_each_second(tmp_path):
    path = tmp_path / "main.json"
    sampler = S.StackSampler(path, interval_s=0.001, dump_every_s=10.0)
    sampler.start()
    first = int(time.time()) + 1
    _sleep_there(first - time.time())
    _spin_here(first + 2 - time.time())  # seconds first and first + 1: on the CPU
    _sleep_there(first + 4.3 - time.time())  # first + 2 and first + 3: waiting in a C call
    sampler.stop()
    sampler.join(5)
    data = json.loads(path.read_text())
    cpu = {row[0]: row[3] for row in data["timeline"]}
    assert cpu[first] >= 0.5 and cpu[first + 1] >= 0.5, cpu
    assert cpu[first + 2] <= 0.2 and cpu[first + 3] <= 0.2, cpu
    assert cpu[max(cpu)] is None  # the second in progress at the end is not counted
    # the stack looks the same either way in a C call: only the CPU time tells them apart
    assert S.thread_cpu_s(None) is None and S.thread_cpu_s(2**31 - 1) is None
    assert S.thread_cpu_s(threading.get_native_id()) > 0


def test_timeline_keeps_only_the_last_seconds(monkeypatch):
    sampler = S.StackSampler(None)
    clock = [1_000_000.0]
    monkeypatch.setattr(S.time, "time", lambda: clock[0])
    for _ in range(S.TIMELINE_KEEP + 50):
        assert sampler.sample_once(0.01)
        clock[0] += 1.0
    kept = sorted(sampler.timeline)
    assert len(kept) == S.TIMELINE_KEEP and kept[-1] == int(clock[0] - 1.0)


def test_a_second_start_on_a_sampled_thread_renames_its_sampler(monkeypatch, tmp_path):
    monkeypatch.setenv(S.SAMPLES_ENV, str(tmp_path))
    first = S.maybe_start("child-run_scheduler_process")
    try:
        first.dump()
        assert [p.name for p in tmp_path.glob("*.json")] == [
            f"child-run_scheduler_process-{os.getpid()}.json"]
        again = S.maybe_start("scheduler")  # a semi-PD role naming its own sampler
        assert again is first and first.is_alive()
        first.dump()
        assert [p.name for p in tmp_path.glob("*.json")] == [f"scheduler-{os.getpid()}.json"]
    finally:
        first.stop()
        first.join(5)
    fresh = S.maybe_start("scheduler")  # the old one is gone: a new one starts
    try:
        assert fresh is not first and fresh.is_alive()
    finally:
        fresh.stop()
        fresh.join(5)
