"""Log lines of the semi-PD processes in SGLang's own format, so that they read like the
server's next to them on its stderr."""

from __future__ import annotations

import logging


def configure_logging(level: str, prefix: str = "") -> None:
    """The root logger at ``level``, a level name in any case as SGLang's ``--log-level``
    gives it (``info``; an unknown name gives INFO), writing ``[time prefix] message``."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"[%(asctime)s{' ' + prefix if prefix else ''}] %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", force=True)
