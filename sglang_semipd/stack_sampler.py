"""A sampling profiler for one process's main thread (diagnostics; off unless
``SGLANG_SEMIPD_STACK_SAMPLES`` names a directory).

Where does a worker's time between two forward passes go? A thread looks at the main thread's
Python stack every ``interval_s`` (``sys._current_frames``) and adds up, per function
(``file:line function`` of its definition), the time where it is on top of the stack
(``self``) and where it is anywhere on it (``inclusive``), plus the most frequent innermost
call paths. Each sample stands for the time since the previous one: while the main thread
holds the GIL the sampler only gets it at the interpreter's switch interval (5 ms), so counting
samples would under-weight exactly the busy Python code one looks for. Every ``dump_every_s``
it rewrites ``<dir>/<name>.json`` (atomically), so a process that is killed still leaves its
last dump.

Timeline: per wall-clock second (``int(time.time())``, to line up with server logs) the dump
also keeps the most frequent innermost call paths (3 frames) of the last ``TIMELINE_KEEP``
seconds, so a stall of a few seconds shows when it happened and where the thread was. Each
second also has the sampled thread's CPU time in it (Linux: ``/proc/self/task/<tid>/stat``,
in clock ticks of 10 ms; None elsewhere and for the second in progress): the stack alone
cannot tell a thread that waits inside a C call (an event loop's ``epoll``, a lock, a socket;
uvloop's whole loop shows as asyncio's ``run``) from one that computes there.

Phases: the sampled thread may set :attr:`StackSampler.phase` (a short string, or None) at
any time; every sample also counts, under ``phases[<phase>]``, toward the phase that was set
when it was taken. A worker marks the time between two forward passes while requests wait
(``GAP_WAITING``), so one digest says where exactly that time goes.

Overhead: each sample takes the GIL for a few tens of microseconds; at the default 2 ms
interval that is a few percent of the main thread. A sample can only be taken when the main
thread lets go of the GIL, so time inside a C call that holds it is credited to the Python
frame that made the call, which is what one wants to know here. Pure Python (no torch).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

SAMPLES_ENV = "SGLANG_SEMIPD_STACK_SAMPLES"
PATH_DEPTH = 6  # innermost frames kept per call path
MAX_WEIGHT_S = 0.05  # the most time one sample stands for
TIMELINE_KEEP = 900  # seconds of per-second timeline kept in a dump
TIMELINE_TOP = 3  # call paths kept per second


def _where(frame: FrameType) -> str:
    code = frame.f_code
    parts = code.co_filename.replace("\\", "/").split("/")
    short = "/".join(parts[-2:])
    return f"{short}:{code.co_firstlineno} {code.co_name}"


class _Counts:
    """Where the sampled time went: per function on top of the stack (``self``), anywhere
    on it (``inclusive``) and per innermost call path."""

    def __init__(self) -> None:
        self.samples = 0
        self.total_s = 0.0  # time the samples stand for
        self.self_counts: collections.Counter[str] = collections.Counter()
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()

    def add(self, stack: list[str], weight_s: float) -> None:
        self.samples += 1
        self.total_s += weight_s
        self.self_counts[stack[0]] += weight_s
        for name in set(stack):
            self.inclusive[name] += weight_s
        self.paths[" <- ".join(stack[:PATH_DEPTH])] += weight_s

    def digest(self, top: int) -> dict[str, Any]:
        """Shares of this count's sampled time, the largest first."""
        n = self.total_s or 1.0

        def share(counter: collections.Counter[str], k: int) -> list[list[Any]]:
            return [[name, round(c / n, 4)] for name, c in counter.most_common(k)]

        return {"samples": self.samples, "sampled_s": round(self.total_s, 3),
                "self": share(self.self_counts, top),
                "inclusive": share(self.inclusive, 2 * top),
                "paths": share(self.paths, top)}


GAP_WAITING = "gap_waiting"  # a worker between two forward passes while requests wait


class StackSampler(threading.Thread):
    """Samples ``thread_id``'s stack (default: the thread that creates the sampler) until
    :meth:`stop`; ``snapshot`` gives the counts so far (all samples, and per :attr:`phase`),
    ``dump`` writes them to ``path``."""

    def __init__(self, path: Optional[Path], interval_s: float = 0.002,
                 dump_every_s: float = 5.0, thread_id: Optional[int] = None,
                 top: int = 80, native_id: Optional[int] = None) -> None:
        super().__init__(name="semipd-stack-sampler", daemon=True)
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        self.path = path
        self.interval_s = interval_s
        self.dump_every_s = dump_every_s
        self.thread_id = threading.get_ident() if thread_id is None else thread_id
        # the kernel's id of the sampled thread, for its CPU time (unknown for another thread
        # unless given)
        self.sampled_native_id = threading.get_native_id() if thread_id is None else native_id
        self.top = top
        self.all = _Counts()
        self.by_phase: dict[str, _Counts] = {}
        self.phase: Optional[str] = None  # set by the sampled thread (module docstring)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._dump_lock = threading.Lock()  # a dump and a rename never interleave
        self.started_at = time.monotonic()
        self.timeline: dict[int, collections.Counter[str]] = {}  # wall second -> paths
        self.cpu_by_second: dict[int, float] = {}  # wall second -> the thread's CPU seconds
        self._cpu_second: Optional[int] = None  # the second of the last CPU-time reading
        self._cpu_at = 0.0  # the thread's CPU time then

    def sample_once(self, weight_s: float = 1.0) -> bool:
        """Take one sample standing for ``weight_s`` seconds; False when the thread is gone."""
        phase = self.phase  # read first: a phase change during the walk counts next time
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return False
        stack: list[str] = []
        while frame is not None:
            stack.append(_where(frame))
            frame = frame.f_back
        with self._lock:
            self.all.add(stack, weight_s)
            if phase is not None:
                self.by_phase.setdefault(phase, _Counts()).add(stack, weight_s)
            second = int(time.time())
            bucket = self.timeline.get(second)
            if bucket is None:
                bucket = self.timeline[second] = collections.Counter()
                self._count_cpu(second)
                for old in [k for k in self.timeline if k <= second - TIMELINE_KEEP]:
                    del self.timeline[old]
                for old in [k for k in self.cpu_by_second if k <= second - TIMELINE_KEEP]:
                    del self.cpu_by_second[old]
            bucket[" <- ".join(stack[:3])] += weight_s
        return True

    def _count_cpu(self, second: int) -> None:
        """At the first sample of ``second``: the sampled thread's CPU time since the last
        reading, spread evenly over the seconds in between (a sampler kept from the GIL for
        a few seconds still says how busy the thread was in them)."""
        cpu = thread_cpu_s(self.sampled_native_id)
        if cpu is None:
            return
        last, self._cpu_second = self._cpu_second, second
        used, self._cpu_at = cpu - self._cpu_at, cpu
        if last is None or second <= last:
            return
        for s in range(last, second):
            self.cpu_by_second[s] = used / (second - last)

    def snapshot(self) -> dict[str, Any]:
        """Time so far, the largest first (shares of the sampled time). ``timeline`` rows:
        ``[second, seconds sampled in it, [[call path, seconds], ...], CPU seconds or None]``."""
        with self._lock:
            out = self.all.digest(self.top)
            out.update(interval_s=self.interval_s, pid=os.getpid(),
                       wall_s=round(time.monotonic() - self.started_at, 3),
                       phases={name: c.digest(self.top) for name, c in self.by_phase.items()},
                       timeline=[[second, round(sum(c.values()), 3),
                                  [[path, round(w, 3)] for path, w in c.most_common(TIMELINE_TOP)],
                                  _rounded(self.cpu_by_second.get(second))]
                                 for second, c in sorted(self.timeline.items())])
            return out

    def dump(self) -> None:
        with self._dump_lock:
            if self.path is None:
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.snapshot(), indent=1) + "\n")
            os.replace(tmp, self.path)

    def rename(self, path: Path) -> None:
        """Dump to ``path`` from now on; a dump already written under the old name goes."""
        with self._dump_lock:
            old, self.path = self.path, path
            if old is not None and old != path:
                old.unlink(missing_ok=True)

    def run(self) -> None:
        last = time.monotonic()
        next_dump = last + self.dump_every_s
        while not self._stop_event.wait(self.interval_s):
            now = time.monotonic()
            # capped: a stopped process (SIGSTOP, a debugger) must not swamp the counts
            if not self.sample_once(min(now - last, MAX_WEIGHT_S)):
                break
            last = now
            if now >= next_dump:
                next_dump += self.dump_every_s
                try:
                    self.dump()
                except OSError as exc:
                    logger.warning("stack samples not written to %s: %r", self.path, exc)
        try:
            self.dump()
        except OSError:
            pass

    def stop(self) -> None:
        self._stop_event.set()


def thread_cpu_s(native_id: Optional[int]) -> Optional[float]:
    """CPU seconds (user + system) that the thread with kernel id ``native_id`` of this
    process has used; None where ``/proc`` does not say (not Linux, thread gone, no id)."""
    if native_id is None:
        return None
    try:
        stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _rounded(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 3)


_RUNNING: dict[int, StackSampler] = {}  # sampled thread -> the sampler started for it here


def maybe_start(name: str) -> Optional[StackSampler]:
    """Start a sampler of the calling thread when ``SGLANG_SEMIPD_STACK_SAMPLES`` names a
    directory (``<dir>/<name>-<pid>.json``); otherwise do nothing. A thread has at most one:
    where one already samples it (``benchmark.sampled_server`` samples every process a server
    starts), that one is renamed to ``name`` and returned."""
    where = os.environ.get(SAMPLES_ENV)
    if not where:
        return None
    out = Path(where)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{os.getpid()}.json"
    running = _RUNNING.get(threading.get_ident())
    if running is not None and running.is_alive():
        running.rename(path)
        logger.info("this process's main thread is sampled into %s from now on", path)
        return running
    sampler = StackSampler(path)
    sampler.start()
    _RUNNING[sampler.thread_id] = sampler
    logger.info("sampling this process's main thread into %s", sampler.path)
    return sampler


def sampled_call(target: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    """``target(*args, **kwargs)`` with the calling thread sampled as ``name``
    (:func:`maybe_start`), dumped once more when it returns or raises: a child process's
    target, wrapped by ``benchmark.sampled_server`` (importable by name, so it pickles)."""
    sampler = maybe_start(name)
    try:
        return target(*args, **kwargs)
    finally:
        if sampler is not None:
            sampler.dump()
