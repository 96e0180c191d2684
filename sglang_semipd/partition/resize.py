"""The resize protocol between the scheduler and the two workers (pure logic, no CUDA).

The scheduler decides a new split (index into the planned splits) and sends ``Resize(seq,
split)`` to both workers. A worker applies a resize only **between iterations**: a command that
arrives while a forward pass runs waits for the iteration to end. It then switches streams (or,
in ``mps`` mode, swaps in the standby worker) and acknowledges with ``ResizeAck(seq, split,
iteration)``: the number of the first iteration that runs on the new split.

Ordering: sequence numbers increase; a worker ignores a command older than the newest it has
applied or queued (a later command supersedes an earlier unapplied one). The scheduler's
:class:`ResizeTracker` considers a resize *done* when both workers acknowledged its ``seq``
(or a later one), and refuses to start another while one is in flight unless forced (then the
newer supersedes it).
"""

from __future__ import annotations

from typing import Optional

from sglang_semipd.protocol import Resize, ResizeAck

__all__ = ["Resize", "ResizeAck", "ResizeTracker", "WorkerResizeState"]


class WorkerResizeState:
    """A worker's side: queue commands, apply them at iteration boundaries."""

    def __init__(self, role: str, split: int) -> None:
        self.role = role
        self.split = split
        self.applied_seq = 0
        self.pending: Optional[Resize] = None
        self.iteration = 0
        self.in_iteration = False

    def receive(self, cmd: Resize) -> Optional[ResizeAck]:
        """Take a command; if no iteration is running it applies now (and acks)."""
        newest = max(self.applied_seq, self.pending.seq if self.pending else 0)
        if cmd.seq <= newest:
            return None  # stale or duplicate
        self.pending = cmd
        return None if self.in_iteration else self._apply()

    def begin_iteration(self) -> int:
        """Mark the start of a forward pass; returns its iteration number."""
        if self.in_iteration:
            raise RuntimeError("iteration already running")
        self.in_iteration = True
        return self.iteration

    def end_iteration(self) -> Optional[ResizeAck]:
        """Mark its end; a command that arrived meanwhile is applied now."""
        if not self.in_iteration:
            raise RuntimeError("no iteration running")
        self.in_iteration = False
        self.iteration += 1
        return self._apply() if self.pending else None

    def _apply(self) -> ResizeAck:
        cmd, self.pending = self.pending, None
        self.split, self.applied_seq = cmd.split, cmd.seq
        return ResizeAck(self.role, cmd.seq, cmd.split, self.iteration)


class ResizeTracker:
    """The scheduler's side: one resize in flight at a time, done when both workers ack."""

    ROLES = ("prefill", "decode")

    def __init__(self, split: int) -> None:
        self.split = split  # the split both workers are known to run
        self.seq = 0
        self.in_flight: Optional[Resize] = None
        self.acks: dict[str, ResizeAck] = {}

    def start(self, split: int, force: bool = False, now: float = 0.0) -> Optional[Resize]:
        """A command for ``split`` (stamped ``sent_at=now``), or None when nothing needs to
        change / one is in flight."""
        if self.in_flight is not None and not force:
            return None
        target = self.in_flight.split if self.in_flight else self.split
        if split == target:
            return None
        self.seq += 1
        self.in_flight = Resize(self.seq, split, now)
        return self.in_flight

    def on_ack(self, ack: ResizeAck) -> bool:
        """Record an acknowledgement; True when the in-flight resize is complete."""
        if ack.role not in self.ROLES:
            raise ValueError(f"unknown role {ack.role!r}")
        if ack.seq > self.seq:
            raise ValueError(f"ack for seq {ack.seq} that was never sent (latest {self.seq})")
        prev = self.acks.get(ack.role)
        if prev is None or ack.seq > prev.seq:
            self.acks[ack.role] = ack
        if self.in_flight is None:
            return False
        if all(r in self.acks and self.acks[r].seq >= self.in_flight.seq for r in self.ROLES):
            self.split, self.in_flight = self.in_flight.split, None
            return True
        return False

    def took_effect_at(self) -> dict[str, int]:
        """Iteration at which each worker last switched."""
        return {r: a.iteration for r, a in self.acks.items()}
