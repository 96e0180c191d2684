"""Start a server command in its own process group, wait for ``/health``, stop it cleanly.

Used by the GPU tests and the benchmark scripts for stock ``sglang.launch_server`` and for
``sglang_semipd.launch_server`` alike, so both are measured the same way.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


def http_json(url: str, payload: Optional[dict[str, Any]] = None,
              timeout: float = 120.0) -> Any:
    """GET (no payload) or POST JSON to ``url``; returns the decoded JSON body."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def sse_events(lines: Iterable[bytes]) -> Iterator[Any]:
    """The JSON of each ``data:`` line of a server-sent-event stream (an open streaming HTTP
    response iterates its lines), up to and without ``data: [DONE]``."""
    for raw in lines:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            return
        if line.startswith("data:"):
            yield json.loads(line[5:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Any, timeout_s: float = 5.0, poll_s: float = 0.02) -> None:
    """Poll ``pred()`` until it is true; AssertionError after ``timeout_s`` (for tests)."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(poll_s)


class ServerProcess:
    """``with ServerProcess(cmd, port, log) as s: http_json(s.url + "/generate", ...)``."""

    def __init__(self, cmd: Sequence[str], port: int, log_path: Path | str,
                 start_timeout: float = 600.0, env: Optional[dict[str, str]] = None) -> None:
        self.cmd = list(cmd)
        self.port = port
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.env = env
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.startup_s: Optional[float] = None
        self.stop_s: Optional[float] = None  # SIGTERM to exit, of the last stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        if self.healthy():  # else the health checks below would pass on someone else's server
            raise ServerStartError(f"port {self.port} already serves (a server left over "
                                   "from an earlier run?)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env)
        log.close()
        while time.monotonic() - t0 < self.start_timeout:
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with {self.proc.returncode} during "
                                       f"start-up; see {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                self.startup_s = time.monotonic() - t0
                logger.info("server up after %.1fs: %s", self.startup_s, " ".join(self.cmd))
                return self
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(f"server not healthy after {self.start_timeout:.0f}s; "
                               f"see {self.log_path}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> Optional[int]:
        """SIGTERM the server's main process (as a service manager would: SGLang shuts its
        children down itself), SIGKILL the whole process group after ``grace_s``; returns the
        exit code. (A SIGTERM to every process at once makes SGLang's watchdog see its
        detokenizer die first and wait a minute for CUDA core dumps.)"""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        t0 = time.monotonic()
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            self._note_stop(f"{sig.name} to the server at {time.time():.3f} (unix time), "
                            f"{time.monotonic() - t0:.1f} s after the first signal")
            try:
                if sig == signal.SIGTERM:
                    os.kill(pgid, sig)
                else:
                    os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        code = self.proc.returncode
        self.stop_s = time.monotonic() - t0
        self._note_stop(f"exited with {code}, {self.stop_s:.1f} s after SIGTERM")
        try:  # stragglers in the group (children that outlived the parent)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None
        return code

    @property
    def stop_log_path(self) -> Path:
        """Where :meth:`stop` notes its signals and the exit (beside the server's log: the
        server writes that one at its own offset, so a line appended there could be lost)."""
        return self.log_path.with_name(self.log_path.name + ".stop")

    def _note_stop(self, line: str) -> None:
        with open(self.stop_log_path, "a") as f:
            f.write(line + "\n")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Server flags of the GPU tests' retraction load (tiny model): a 4,096-slot pool far smaller
# than 48 concurrent requests of ~200 + 200 tokens need, and SGLang's deterministic inference,
# so that outputs do not depend on batch composition; RETRACT_LOG is SGLang 0.5.17's warning
# when the decode step does not fit (update_running_batch).
SMALL_POOL_FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch",
                    "--grammar-backend", "none", "--mem-fraction-static", "0.8",
                    "--max-total-tokens", "4096", "--cuda-graph-max-bs-decode", "64",
                    "--enable-deterministic-inference")
RETRACT_LOG = "KV cache pool is full. Retract requests."


def python_module_cmd(module: str, *args: str) -> list[str]:
    """``[sys.executable, -m, module, *args]``."""
    return [sys.executable, "-m", module, *args]


def random_prompts(seed: int, lengths: Iterable[int]) -> list[list[int]]:
    """One prompt of random token ids in [100, 40000) per length, drawn in order from
    ``random.Random(seed)``: the same prompts on every host and run."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]


def greedy_generate(url: str, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """``/generate`` of ``ids``: greedy, exactly ``max_new_tokens`` tokens (EOS ignored)."""
    return http_json(url + "/generate", {"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}, timeout=600)


def greedy_generate_all(url: str, prompts: Sequence[list[int]], max_new_tokens: int
                        ) -> list[dict[str, Any]]:
    """:func:`greedy_generate` of every prompt at once (one thread each), answers in order."""
    with ThreadPoolExecutor(max(1, len(prompts))) as pool:
        return list(pool.map(lambda p: greedy_generate(url, p, max_new_tokens), prompts))


def stock_greedy_outputs(model: str, port: int, flags: Sequence[str], log_path: str,
                         prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Stock SGLang's greedy output ids (the launcher's ``--no-semi-pd``) of each prompt,
    each sent alone: the reference a semi-PD server's outputs are held to."""
    cmd = python_module_cmd("sglang_semipd.launch_server", "--no-semi-pd", "--model-path",
                            model, "--port", str(port), *flags)
    with ServerProcess(cmd, port, log_path) as s:
        return [greedy_generate(s.url, p, max_new_tokens)["output_ids"] for p in prompts]


def flush_cache(url: str, timeout: float = 120.0) -> str:
    """POST ``/flush_cache`` (SGLang's); returns the server's answer text."""
    req = urllib.request.Request(url + "/flush_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode(errors="replace")


def semipd_pool_report(url: str, flush: bool = True) -> dict[str, Any]:
    """The memory manager's invariant report of a semi-PD server's shared pool
    (``/server_info`` -> ``internal_states[0].semipd.pool``), after a ``/flush_cache`` so the
    radix tree's unlocked entries are freed first."""
    if flush:
        flush_cache(url)
    return http_json(url + "/server_info")["internal_states"][0]["semipd"]["pool"]


def pool_leaks(report: dict[str, Any]) -> dict[str, int]:
    """What an idle server should not hold: slots held by a worker beyond its open lease,
    radix lock refs, request rows."""
    return {"leaked_slots": sum(report["client_held"].values()) - report["leased"],
            "lock_refs_left": report["lock_refs"],
            "req_rows_left": sum(report["req_rows_held"].values())}
