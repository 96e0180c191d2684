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

A server can also die without unwinding (SGLang's crash path SIGKILLs its own process tree).
So :meth:`PrivateMPS.start` also leaves a detached *reaper* (``python -m sglang_semipd.mps
--reap PID ROOT``, double-forked out of the process tree): when PID is gone it quits the
daemon and removes ROOT; it exits on its own once ROOT is removed by a normal ``stop``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

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
        try:
            return self._start_owned()
        except BaseException:
            shutil.rmtree(self._root, ignore_errors=True)  # nothing of ours stays behind
            raise

    def _start_owned(self) -> "PrivateMPS":
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
        spawn_reaper(os.getpid(), self._root, exe)
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


def spawn_reaper(pid: int, root: str, binary: str) -> None:
    """Start the detached reaper for ``pid`` (see the module docstring); returns at once."""
    subprocess.run([sys.executable, "-m", "sglang_semipd.mps", "--reap", str(pid), root,
                    "--binary", binary], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (an exited but unreaped process, a zombie, counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(pid: int, root: str, binary: str, poll_s: float = 0.5) -> bool:
    """Wait until ``pid`` exits or ``root`` disappears; in the first case quit the daemon
    whose pipe is in ``root`` and remove ``root``. Returns True if it had to clean up."""
    pipe = os.path.join(root, "pipe")
    while _alive(pid):
        if not os.path.isdir(root):
            return False
        time.sleep(poll_s)
    if not os.path.isdir(root):
        return False
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe,
               CUDA_MPS_LOG_DIRECTORY=os.path.join(root, "log"))
    try:
        subprocess.run([binary], input="quit\n", text=True, env=env, timeout=60,
                       capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="reaper of a private MPS daemon (internal)")
    ap.add_argument("--reap", nargs=2, metavar=("PID", "ROOT"), required=True)
    ap.add_argument("--binary", default=MPS_CONTROL_BINARY)
    ap.add_argument("--foreground", action="store_true", help="do not detach (tests)")
    a = ap.parse_args(argv)
    if not a.foreground:
        if os.fork():  # the caller waits for this parent only: the child leaves its tree
            os._exit(0)
        os.setsid()
    reap(int(a.reap[0]), a.reap[1], a.binary)
    os._exit(0)


if __name__ == "__main__":
    main()
