"""``python -m sglang_semipd.launch_server``: SGLang's server, the semi-PD way.

Takes every ``sglang.launch_server`` flag (parsed by SGLang's own ``ServerArgs.add_cli_args``)
plus the semi-PD group of :mod:`sglang_semipd.config`. Without ``--model-path`` it serves the
embedded default model (SmolLM2-135M-Instruct, converted once into a cache directory).

Lifecycle: parse -> validate the semi-PD flags against the SGLang ones (exit 2 with one clear
line on a bad combination) -> resolve the model -> build ``ServerArgs`` -> run. With
``--no-semi-pd`` the run is stock SGLang's ``run_server``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Optional, Sequence

from sglang_semipd.config import SemiPDConfig, SemiPDConfigError, add_semipd_args
from sglang_semipd.logs import configure_logging

logger = logging.getLogger(__name__)

PROG = "python -m sglang_semipd.launch_server"
def build_parser() -> argparse.ArgumentParser:
    """SGLang's parser with ``--model-path`` made optional and the semi-PD group added."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SGLang server with semi-PD serving: prefill and decode workers on the "
                    "same GPU(s), each on its own share of the SMs, sharing one KV pool and "
                    "one copy of the weights. Without --model-path it serves the embedded "
                    "default model (SmolLM2-135M-Instruct).")
    ServerArgs.add_cli_args(parser)
    for action in parser._actions:  # the parser is ours; SGLang's code is untouched
        if action.dest == "model_path":
            action.required = False
            action.help = (action.help or "") + " Default: the embedded SmolLM2-135M-Instruct."
    add_semipd_args(parser)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, SemiPDConfig]:
    """Parse and validate; exits with status 2 and one clear line on bad input."""
    parser = build_parser()
    argv = list(argv)
    if "--config" in argv:
        from sglang.srt.server_args_config_parser import ConfigArgumentMerger

        argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    ns = parser.parse_args(argv)
    try:
        cfg = SemiPDConfig.from_namespace(ns)
    except SemiPDConfigError as exc:
        parser.error(str(exc))
    return ns, cfg


def resolve_model(ns: argparse.Namespace) -> None:
    """Fill in the embedded default model when no ``--model-path`` was given."""
    if ns.model_path:
        return
    from sglang_semipd.default_model import ensure_default_model

    ns.model_path = str(ensure_default_model())
    logger.info("no --model-path: serving the embedded default model at %s", ns.model_path)


def build_server_args(ns: argparse.Namespace):
    """SGLang's ``ServerArgs`` from the namespace (``from_cli_args`` ignores our flags)."""
    from sglang.srt.server_args import ServerArgs

    return ServerArgs.from_cli_args(ns)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(ns.log_level)
    from sglang.srt.plugins import load_plugins

    load_plugins()
    resolve_model(ns)
    server_args = build_server_args(ns)
    from sglang.srt.utils import kill_process_tree

    try:
        if cfg.enabled:
            run_semipd_server(server_args, cfg)
        else:
            from sglang.launch_server import run_server

            run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


def run_semipd_server(server_args, cfg: SemiPDConfig) -> None:
    """SGLang's HTTP server, TokenizerManager and DetokenizerManager, with the semi-PD
    scheduler process (:mod:`sglang_semipd.scheduler`) in place of SGLang's, under a
    private MPS control daemon that is stopped when the server exits."""
    from sglang.srt.entrypoints.http_server import launch_server

    from sglang_semipd.mps import PrivateMPS
    from sglang_semipd.scheduler import run_semipd_scheduler_process

    with PrivateMPS(cfg.mps_pipe_dir) as mps:
        os.environ.update(mps.child_env())  # inherited by every GPU process we start
        try:
            launch_server(server_args, run_scheduler_process_func=functools.partial(
                run_semipd_scheduler_process, semipd=cfg))
        finally:
            from sglang.srt.utils import kill_process_tree

            kill_process_tree(os.getpid(), include_parent=False)  # MPS clients first


if __name__ == "__main__":
    sys.exit(main())
