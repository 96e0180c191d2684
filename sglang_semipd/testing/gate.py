"""A stand-in for the CUDA event that gates a release (``memory.gated``): done when a test
says so, or when waited for."""

from __future__ import annotations


class ManualGate:
    """``query()`` is ``done``; ``synchronize()`` counts the wait and completes the gate."""

    def __init__(self) -> None:
        self.done = False
        self.waits = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True
