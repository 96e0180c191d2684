"""Run a server module with the diagnostic stack sampler on its processes' main threads.

``python -m benchmark.sampled_server sglang.launch_server --model-path ...`` behaves like
``python -m sglang.launch_server --model-path ...``; when ``SGLANG_SEMIPD_STACK_SAMPLES`` names
a directory, the main thread of this process (for both stock SGLang and semi-PD: the HTTP
server and TokenizerManager) is sampled into ``<dir>/http-<pid>.json``
(:mod:`sglang_semipd.stack_sampler`, with a per-second timeline), and so is the main thread of
every process it starts with :mod:`multiprocessing`, into ``<dir>/child-<target>-<pid>.json``
(``<target>`` the name of the function the process runs: stock SGLang's scheduler and
detokenizer, ``run_scheduler_process`` and ``run_detokenizer_process``, have no hook of their
own). A semi-PD process that starts its own sampler renames that file to its role
(:func:`~sglang_semipd.stack_sampler.maybe_start`). Child processes started with ``spawn``
import the server module itself, not this wrapper. ``benchmark.compare`` uses it for every
server while stack sampling is on.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing.process
import runpy
import sys

from sglang_semipd.stack_sampler import maybe_start, sampled_call


def _sample_children() -> None:
    """From now on every process this one starts runs its target under
    :func:`~sglang_semipd.stack_sampler.sampled_call` as ``child-<target name>`` (wraps
    ``multiprocessing.process.BaseProcess.start``: the stdlib's, not SGLang's)."""
    start = multiprocessing.process.BaseProcess.start

    @functools.wraps(start)
    def sampled_start(self: multiprocessing.process.BaseProcess) -> None:
        target = getattr(self, "_target", None)
        if target is not None and not getattr(self, "_semipd_sampled", False):
            inner = getattr(target, "func", target)  # a functools.partial: its function
            name = getattr(inner, "__name__", type(inner).__name__)
            self._target = functools.partial(sampled_call, target, f"child-{name}")
            self._semipd_sampled = True
        start(self)

    multiprocessing.process.BaseProcess.start = sampled_start  # type: ignore[method-assign]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python -m benchmark.sampled_server <module> [server flags]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    sampler = maybe_start("http")
    if sampler is not None:  # the last few seconds too, on a normal exit (else: every 5 s)
        atexit.register(sampler.dump)
        _sample_children()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
