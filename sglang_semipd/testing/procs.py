"""Parent/child plumbing for tests that run worker bodies in spawned processes."""

from __future__ import annotations

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
