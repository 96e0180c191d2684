"""An optional JSON-lines trace of the scheduler's partition events, for benchmarks and
debugging: with ``SGLANG_SEMIPD_TRACE=/path/file.jsonl`` in the server's environment the
semi-PD scheduler appends one line per worker iteration (``kind: "iteration"``), resize
command (``"resize"``) and acknowledgement (``"resize_ack"``, with ``latency_ms`` from command
to switch). Times are ``time.monotonic()`` seconds (one clock for the host's processes)."""

from __future__ import annotations

import logging
import os
from typing import Any, IO, Optional

import msgspec

logger = logging.getLogger(__name__)

TRACE_ENV = "SGLANG_SEMIPD_TRACE"


class Trace:
    """Appends records to a file, or does nothing when built without a path."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._file: Optional[IO[bytes]] = open(path, "ab") if path else None
        self._encoder = msgspec.json.Encoder()
        if path:
            logger.info("semi-PD trace: %s", path)

    @classmethod
    def from_env(cls) -> "Trace":
        return cls(os.environ.get(TRACE_ENV) or None)

    def write(self, kind: str, record: Any, **extra: Any) -> None:
        if self._file is None:
            return
        row = msgspec.structs.asdict(record) if isinstance(record, msgspec.Struct) \
            else dict(record)
        row.pop("v", None)
        row.update(extra, kind=kind)
        self._file.write(self._encoder.encode(row) + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a trace file so far (none if it does not exist yet)."""
    import json

    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
