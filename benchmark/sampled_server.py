"""Run a server module with the diagnostic stack sampler on its main process's main thread.

``python -m benchmark.sampled_server sglang.launch_server --model-path ...`` behaves like
``python -m sglang.launch_server --model-path ...``; when ``SGLANG_SEMIPD_STACK_SAMPLES`` names
a directory, the main thread of this process (for both stock SGLang and semi-PD: the HTTP
server and TokenizerManager) is sampled into ``<dir>/http-<pid>.json``
(:mod:`sglang_semipd.stack_sampler`, with a per-second timeline). Child processes started
with ``spawn`` import the server module itself, not this wrapper. ``benchmark.compare`` uses
it for every server while stack sampling is on.
"""

from __future__ import annotations

import atexit
import runpy
import sys

from sglang_semipd.stack_sampler import maybe_start


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python -m benchmark.sampled_server <module> [server flags]")
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    sampler = maybe_start("http")
    if sampler is not None:  # the last few seconds too, on a normal exit (else: every 5 s)
        atexit.register(sampler.dump)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
