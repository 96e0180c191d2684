"""Shared pieces of the benchmark scripts: GPU naming, bench_serving runs, result files."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def gpu_name() -> str:
    """The CUDA device's marketing name, e.g. 'NVIDIA H100 80GB HBM3'."""
    import torch

    return torch.cuda.get_device_name()


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA H200' -> 'h200'."""
    for token in name.replace("-", " ").split():
        t = token.lower()
        if t[:1] in "habl" and any(c.isdigit() for c in t) and t not in ("80gb", "141gb"):
            return t
    return name.lower().replace(" ", "_")


def run_bench_serving(port: int, args: Sequence[str], output_file: Path,
                      log_path: Path, timeout_s: float) -> tuple[dict[str, Any], str]:
    """Run SGLang's ``bench_serving`` CLI against ``port``; return (last result, command).

    It runs in this process (``sglang.benchmark.serving.cli_main`` with these arguments,
    its output into ``log_path``): a process per run paid its imports each time (~10 s on
    the 2-core CPU machine; on the H100 host each run took ~20 s beyond its own duration,
    imports included). Past ``timeout_s`` the run is interrupted in the
    main thread (a KeyboardInterrupt, which asyncio lets through) and ``TimeoutError`` is
    raised, as ``subprocess.run(timeout=...)`` raised for a process. The interrupt is a real
    SIGINT sent to the main thread (so it also cuts a blocking socket read or sleep), under
    Python's default SIGINT handler for the run's duration, and it is repeated every second
    until the run ends: one that lands in code with a bare ``except`` (an import probing an
    optional package, under load) would otherwise be lost, and the run would go on to
    bench_serving's own 60 s readiness limit. Call it from the main thread."""
    from sglang.benchmark import serving

    argv = ["--backend", "sglang", "--port", str(port), "--output-file", str(output_file), *args]
    output_file.unlink(missing_ok=True)
    fired = threading.Event()
    done = threading.Event()

    def interrupt() -> None:
        if done.wait(timeout_s):
            return
        fired.set()
        while True:
            signal.pthread_kill(main_thread, signal.SIGINT)
            if done.wait(1.0):
                return

    main_thread = threading.main_thread().ident
    timer = threading.Thread(target=interrupt, name="bench-timeout", daemon=True)
    saved_argv = sys.argv
    saved_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        sys.argv = ["sglang.bench_serving", *argv]
        timer.start()
        try:
            serving.cli_main()
        except KeyboardInterrupt:
            done.set()
            if not fired.is_set():
                raise  # a real Ctrl-C
            raise TimeoutError(f"bench_serving ran past {timeout_s:g} s (see {log_path})") \
                from None
        finally:
            done.set()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a repeat sent before `done` was seen
            timer.join()
            signal.signal(signal.SIGINT, saved_handler)
            sys.argv = saved_argv
    lines = [ln for ln in output_file.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]), shlex.join(["python", "-m", "sglang.bench_serving", *argv])


def write_result(path: Path, record: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", path)
    return path


def print_table(rows: Sequence[tuple[str, Any]], title: str) -> None:
    """A two-column table on stdout (benchmark scripts are CLIs: printing is their job)."""
    width = max(len(k) for k, _ in rows)
    print(f"== {title}")
    for key, value in rows:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def pin_split(url: str, share: float, timeout_s: float = 30.0) -> list[int]:
    """Pin the split nearest ``share`` (static policy); returns [prefill, decode] SMs once the
    prefill worker runs on it."""
    from sglang_semipd.testing.server import http_json

    out = http_json(url + "/set_internal_state", {"server_args": {
        "semipd_slo_policy": 0, "semipd_prefill_sm_share": share}})
    if out != [True]:  # SGLang answers one flag per worker that took it
        raise RuntimeError(f"server refused to pin share {share}: {out}")
    deadline = time.monotonic() + timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        state = http_json(url + "/server_info")["internal_states"][0]["semipd"]
        split = state["splits"][state["split"]]
        if abs(split[0] / sum(split) - share) <= min(
                abs(p / (p + d) - share) for p, d in state["splits"]) + 1e-9:
            return split
        time.sleep(0.2)
    raise RuntimeError(f"split not applied within {timeout_s} s: {state}")


def release_to_slo(url: str) -> None:
    """Hand the split back to the SLO controller: a fresh SLO policy starts on the split in
    force (``semipd_slo_policy: 1``)."""
    from sglang_semipd.testing.server import http_json

    out = http_json(url + "/set_internal_state", {"server_args": {"semipd_slo_policy": 1}})
    if out != [True]:
        raise RuntimeError(f"server refused the SLO policy: {out}")


NVIDIA_SMI_MEMORY = ("nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits")


class PeakGpuMemory:
    """While open, polls the GPU memory in use (``cmd`` prints MiB per GPU, one per line:
    ``nvidia-smi``'s, summed over the GPUs) every ``interval_s`` in a thread and keeps the
    peak; ``peak_mib`` stays None if the command never answered (no GPU, no nvidia-smi)."""

    def __init__(self, interval_s: float = 0.5, cmd: Sequence[str] = NVIDIA_SMI_MEMORY) -> None:
        self.interval_s, self.cmd = interval_s, list(cmd)
        self.peak_mib: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-gpu-memory", daemon=True)

    def __enter__(self) -> "PeakGpuMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        self.poll()  # one last look

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        try:
            out = subprocess.run(self.cmd, capture_output=True, text=True, timeout=10, check=True)
            used = sum(int(line) for line in out.stdout.split() if line.strip())
        except (OSError, subprocess.SubprocessError, ValueError):
            return
        self.samples += 1
        self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
