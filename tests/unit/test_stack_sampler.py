"""The diagnostic stack sampler: counts where a thread spends its time, and writes them."""

from __future__ import annotations

import json
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
