"""The memory manager's log lines reach the server's stderr at SGLang's ``--log-level``.

Before 2026-12-07 the scheduler spawned the manager without a log level, so its info lines
(start-up, each worker's registration and release with what it still held) went nowhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_semipd.memory_manager import MemoryManagerSpec

_CHILD = """
import logging, sys
from sglang_semipd.logs import configure_logging
configure_logging(sys.argv[1], "memory-manager")
logging.getLogger("sglang_semipd.memory.service").info("client 3 released: 0 tokens")
logging.getLogger("sglang_semipd.memory.service").debug("a debug line")
"""


def _run(level: str) -> str:
    out = subprocess.run([sys.executable, "-c", _CHILD, level], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


@pytest.mark.parametrize("level", ["info", "INFO", "debug"])
def test_sglang_log_level_names_configure_the_manager_in_any_case(level):
    err = _run(level)
    line = next(ln for ln in err.splitlines() if "released" in ln)
    assert line.startswith("[") and " memory-manager] client 3 released: 0 tokens" in line
    assert ("a debug line" in err) == (level == "debug")


def test_warning_level_keeps_info_lines_out():
    assert "released" not in _run("warning")


@pytest.mark.parametrize("level", ["debug", None])
def test_the_scheduler_spawns_the_manager_at_the_server_log_level(monkeypatch, level):
    """``Coordinator.spawn_children`` builds the manager's spec; the processes it would start
    are recorded instead (the spec is what is under test). SGLang's ``--log-level`` defaults
    to ``info``; a ``log_level`` of None gives ``info`` too."""
    from types import SimpleNamespace

    from sglang_semipd.scheduler import Coordinator

    coord = Coordinator(SimpleNamespace(log_level=level), SimpleNamespace(), gpu_id=0,
                        tp_rank=0)
    spawned = {}

    def record(name, target, args):
        spawned[name] = args
        return None, None  # (process, ready pipe): none started

    monkeypatch.setattr(coord, "_spawn", record)
    monkeypatch.setattr(coord, "_spawn_worker", lambda *a: (None, None))
    try:
        coord.spawn_children()
    finally:
        coord.procs.clear()  # nothing was started
        coord.stop()  # removes its run directory
    (spec,) = spawned["memory_manager"]
    assert isinstance(spec, MemoryManagerSpec) and spec.log_level == (level or "info")
