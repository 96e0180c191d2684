"""A private CUDA MPS control daemon for one semi-PD server (ARCHITECTURE.md section 3).

Two worker processes only run concurrently on one GPU under MPS (measured: without it they
time-slice). The launcher starts its own daemon with its own pipe and log directories, so it
never touches a system-wide daemon or another server's, and stops it on exit:

    with PrivateMPS() as mps:          # or PrivateMPS(pipe_dir=...) to use a running one
        env = mps.child_env()          # CUDA_MPS_PIPE_DIRECTORY / _LOG_DIRECTORY
        ... start GPU processes with env ...

Rules: the daemon must be up before any child creates a CUDA context, and every client must
have exited before ``quit`` (MPS waits for its clients). ``stop`` is idempotent and safe to
call from a signal handler's cleanup path.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from typing import Optional

from sglang_semipd.config import MPS_CONTROL_BINARY

logger = logging.getLogger(__name__)


class MPSError(RuntimeError):
    """The MPS control daemon could not be started or reached."""


class PrivateMPS:
    """Start (or adopt, with ``pipe_dir``) an MPS control daemon; see the module docstring."""

    def __init__(self, pipe_dir: Optional[str] = None, binary: str = MPS_CONTROL_BINARY,
                 start_timeout_s: float = 10.0) -> None:
        self.owned = pipe_dir is None
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self._root = tempfile.mkdtemp(prefix="semipd-mps-") if self.owned else None
        self.pipe_dir = pipe_dir or os.path.join(self._root, "pipe")
        self.log_dir = os.path.join(self._root, "log") if self._root else None
        self.started = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=self.pipe_dir)
        if self.log_dir:
            env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        return env

    def child_env(self) -> dict[str, str]:
        """Environment entries every GPU child process needs to reach this daemon."""
        out = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir}
        if self.log_dir:
            out["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        return out

    def control(self, command: str, timeout_s: float = 10.0) -> str:
        """Send one command to the control daemon (e.g. ``get_server_list``)."""
        exe = shutil.which(self.binary) or self.binary
        out = subprocess.run([exe], input=command + "\n", capture_output=True, text=True,
                             env=self._env(), timeout=timeout_s)
        if out.returncode != 0:
            raise MPSError(f"{self.binary} {command!r} failed ({out.returncode}): "
                           f"{out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def start(self) -> "PrivateMPS":
        if not self.owned:
            if not os.path.exists(os.path.join(self.pipe_dir, "control")):
                raise MPSError(f"--mps-pipe-dir {self.pipe_dir}: no MPS control pipe there")
            return self
        exe = shutil.which(self.binary)
        if exe is None:
            raise MPSError(f"{self.binary} not found on PATH: semi-PD needs CUDA MPS")
        os.makedirs(self.pipe_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        out = subprocess.run([exe, "-d"], capture_output=True, text=True, env=self._env(),
                             timeout=self.start_timeout_s)
        if out.returncode != 0:
            raise MPSError(f"starting {self.binary} -d failed ({out.returncode}): "
                           f"{out.stderr.strip()}")
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(os.path.join(self.pipe_dir, "control")):
            if time.monotonic() > deadline:
                raise MPSError(f"MPS control pipe did not appear in {self.pipe_dir}")
            time.sleep(0.05)
        self.started = True
        logger.info("private MPS control daemon up (pipe %s)", self.pipe_dir)
        return self

    def stop(self) -> None:
        """Quit our daemon (no-op for an adopted one) and remove its directories."""
        if not self.owned or not self.started:
            return
        self.started = False
        try:
            self.control("quit", timeout_s=30.0)
        except (MPSError, subprocess.TimeoutExpired) as exc:
            logger.warning("MPS daemon quit failed: %s", exc)
        shutil.rmtree(self._root, ignore_errors=True)
        logger.info("private MPS control daemon stopped")

    def __enter__(self) -> "PrivateMPS":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
