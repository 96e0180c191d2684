"""Parent/child plumbing for tests that run worker bodies in spawned processes."""

from __future__ import annotations

import time
from typing import Any, Callable


def run_reporting(body: Callable[..., None], *args: Any) -> None:
    """Run ``body(*args)`` in a child whose last argument is a Pipe end; an exception is sent
    to the parent as ``{"error": repr}`` (then re-raised) instead of leaving it waiting."""
    try:
        body(*args)
    except BaseException as exc:
        args[-1].send({"error": repr(exc)})
        raise


def recv_reply(conn: Any, timeout: float = 180.0) -> dict:
    """The child's next message; fails the test on silence or on a reported error."""
    if not conn.poll(timeout):
        raise AssertionError(f"worker did not answer within {timeout:.0f}s")
    msg = conn.recv()
    if isinstance(msg, dict) and "error" in msg:
        raise AssertionError(f"worker failed: {msg['error']}")
    return msg


def wait_for_kv_server(client: Any, proc: Any, timeout_s: float = 120.0) -> None:
    """Say ``Hello`` through ``client`` until the KV-state server in ``proc`` answers (it
    imports SGLang first: 10-20 s on a small machine); fail at once if ``proc`` died."""
    from sglang_semipd.memory.client import KVStateTimeout

    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.is_alive():
            raise AssertionError(f"server process died (exit code {proc.exitcode})")
        try:
            client.hello(timeout_s=1.0)
            return
        except KVStateTimeout:
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not come up in {timeout_s:.0f}s") from None
