"""On the GPU host: a semi-PD process killed with SIGKILL takes the whole server down cleanly.

For each of the decode worker, the prefill worker, the memory manager and the semi-PD scheduler
(SGLang's ``sglang::scheduler`` process): start the server (tiny bf16 model), check it serves,
``kill -9`` that process, and require within a minute that the launcher exits, ``/health``
stops answering, the log names the dead process, and no GPU process, no process of ours and no
MPS daemon is left. No hang. The same when a worker's event loop raises (SGLang's own crash
trigger, ``SGLANG_TEST_CRASH_AFTER_STREAM_OUTPUTS``): its process must die though SGLang's
helper threads live on (they once kept it alive and every request hung)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from sglang_semipd.testing.server import ServerProcess, http_json, python_module_cmd

pytestmark = pytest.mark.gpu

PORT = int(os.environ.get("SEMIPD_TEST_PORT", "31000")) + 17
FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend",
         "none", "--mem-fraction-static", "0.8", "--max-total-tokens", "100000",
         "--cuda-graph-max-bs-decode", "8", "--sm-splits", "0.5")


def _procs_named(name: str, session: int | None = None) -> list[int]:
    """PIDs whose command line / process title contains ``name`` (our processes set
    ``sglang::semipd_<role>``), in process session ``session`` when given (the server's:
    ServerProcess starts it in a session of its own)."""
    args = ["pgrep", "-f", name] if session is None else ["pgrep", "-s", str(session), "-f",
                                                           name]
    out = subprocess.run(args, capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def _gone(server: ServerProcess) -> bool:
    if server.proc is not None and server.proc.poll() is None:
        return False
    try:
        urllib.request.urlopen(server.url + "/health", timeout=2)
        return False
    except (urllib.error.URLError, ConnectionError, OSError):
        return True


def _assert_down_and_freed(server: ServerProcess) -> None:
    """Within a minute the server is gone; within another, no GPU process, no process of ours
    and no MPS daemon is left."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _gone(server):
        time.sleep(1)
    assert _gone(server), "server still up a minute after a process died"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                               "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip()
        ours = _procs_named("sglang::") + _procs_named("semipd-mps-") + \
            _procs_named("nvidia-cuda-mps")
        if not apps and not ours:
            break
        time.sleep(2)
    assert not apps, f"GPU processes left: {apps}"
    assert not ours, f"processes left: {ours}"


@pytest.mark.parametrize("victim", ["sglang::semipd_decode", "sglang::semipd_prefill",
                                    "sglang::semipd_memory_manager", "sglang::scheduler"])
def test_a_killed_process_stops_the_server_and_frees_the_gpu(victim, tiny_bf16, gpu_log_dir):
    tiny, log_dir = tiny_bf16, gpu_log_dir
    role = victim.removeprefix("sglang::").removeprefix("semipd_")
    log = os.path.join(log_dir, f"server_crash_{role}.log")
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny),
                            "--port", str(PORT), *FLAGS)
    server = ServerProcess(cmd, PORT, log).start()
    try:
        out = http_json(server.url + "/generate", {"input_ids": [5, 6, 7], "sampling_params": {
            "temperature": 0, "max_new_tokens": 4}})
        assert len(out["output_ids"]) == 4
        pids = _procs_named(victim, session=server.proc.pid)
        assert len(pids) == 1, f"processes titled {victim} in the server's session: {pids}"
        os.kill(pids[0], signal.SIGKILL)
        _assert_down_and_freed(server)
        text = open(log, errors="replace").read()
        # a worker or the manager: the semi-PD scheduler names it; the scheduler itself:
        # SGLang's SubprocessWatchdog in the launcher does
        expected = "crashed with exit code" if role == "scheduler" else f"semi-PD {role} exited"
        assert expected in text
    finally:
        server.stop(grace_s=10)


def test_an_exception_in_a_worker_loop_stops_the_server(tiny_bf16, gpu_log_dir):
    """Both workers raise out of SGLang's event loop at their 40th ``stream_output`` (SGLang's
    test trigger); whichever comes first must exit with ``WORKER_CRASH_EXIT_CODE`` and take the
    server down, and the requests in flight must end (an error or a closed connection), not
    hang."""
    from concurrent.futures import ThreadPoolExecutor

    from sglang_semipd.workers import WORKER_CRASH_EXIT_CODE

    log = os.path.join(gpu_log_dir, "server_crash_loop_exception.log")
    cmd = python_module_cmd("sglang_semipd.launch_server", "--model-path", str(tiny_bf16),
                            "--port", str(PORT), *FLAGS)
    env = dict(os.environ, SGLANG_TEST_CRASH_AFTER_STREAM_OUTPUTS="40")
    server = ServerProcess(cmd, PORT, log, env=env).start()
    try:
        def one(k: int) -> str:
            try:
                http_json(server.url + "/generate", {"input_ids": [5, 6, 7 + k],
                          "sampling_params": {"temperature": 0, "max_new_tokens": 64}},
                          timeout=90)
                return "answered"
            except Exception as exc:  # the server went down under it
                return type(exc).__name__
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            ends = list(pool.map(one, range(8)))
        assert time.monotonic() - start < 90, f"requests hung: {ends}"
        _assert_down_and_freed(server)
        text = open(log, errors="replace").read()
        assert "Test crash after stream_output" in text
        assert any(f"semi-PD {role} worker (generation 0) crashed" in text
                   for role in ("prefill", "decode")), "no worker logged its crash"
        assert any(f"semi-PD {role} exited (code {WORKER_CRASH_EXIT_CODE})" in text
                   for role in ("prefill", "decode")), "the scheduler did not name the crash"
    finally:
        server.stop(grace_s=10)
