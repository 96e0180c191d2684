"""RemoteReqToTokenPool: SGLang's ``ReqToTokenPool`` whose free rows live in the memory manager.

The ``req_to_token`` table itself is shared (a CUDA-IPC view of the manager's tensor, see
:mod:`sglang_semipd.memory.pool_attach`); which rows are free is allocation state, so it has
one owner, the memory manager: ``alloc`` asks it for rows (one ``AllocReqRows`` round trip per
batch of new requests), ``free`` gives a row back (``FreeReqRows``). ``available_size`` is the
manager's free-row count at the last ``Stats`` (refreshed when older than ``stats_max_age_s``).
With ``free_gate`` set (the decode worker under SGLang's overlap scheduler) a freed row waits
for its gate (:mod:`sglang_semipd.memory.gated`: the forward in flight may still write it) and
goes back in one ``FreeReqRows`` with the others at :meth:`flush_rows`.

A worker's pool object is built by SGLang's own constructor (so the table is replayed from the
manager's record) and then adopted with :func:`adopt_req_pool`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, List, Optional

from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from sglang_semipd import protocol as P
from sglang_semipd.memory.client import KVStateClient
from sglang_semipd.memory.gated import GatedReleases, GateSource

logger = logging.getLogger(__name__)


class RemoteReqToTokenPool(ReqToTokenPool):
    """See the module docstring; never constructed directly (use :func:`adopt_req_pool`)."""

    client: KVStateClient
    stats_max_age_s: float
    _free_rows_seen: int
    _stats_at: float
    free_gate: Optional[GateSource]
    _gated_rows: GatedReleases[int]

    def available_size(self) -> int:
        if time.monotonic() - self._stats_at > self.stats_max_age_s:
            self.refresh_stats()
        return self._free_rows_seen

    def refresh_stats(self) -> P.InvariantReport:
        report = self.client.stats()
        self._free_rows_seen, self._stats_at = report.req_rows_free, time.monotonic()
        return report

    def alloc(self, reqs: List[Any]) -> Optional[List[int]]:
        new = [r for r in reqs if r.req_pool_idx is None]
        assert all(r.inflight_middle_chunks > 0 or r.kv_committed_len > 0
                   for r in reqs if r.req_pool_idx is not None), \
            "reusing request must be chunked or have committed KV"
        if new:
            try:
                rows = self.client.alloc_req_rows(len(new))
            except P.KVStateError as exc:
                if exc.code != P.ErrorCode.OUT_OF_MEMORY:
                    raise
                self._free_rows_seen = 0
                return None
            self._free_rows_seen = max(self._free_rows_seen - len(rows), 0)
            for r, row in zip(new, rows):
                r.req_pool_idx = row
                self.req_generation[row] += 1
        return [r.req_pool_idx for r in reqs]

    def free(self, req: Any) -> None:
        assert req.req_pool_idx is not None, "request must have req_pool_idx"
        row = int(req.req_pool_idx)
        gate = self.free_gate() if self.free_gate is not None else None
        if gate is None:
            self.client.free_req_rows([row])
        else:
            self._gated_rows.add(row, gate)
        self._free_rows_seen += 1
        req.req_pool_idx = None

    def flush_rows(self, wait: bool = False) -> int:
        """Give back the freed rows whose gate is done (``wait``: all of them, after their
        gates), in one call; returns how many."""
        rows = self._gated_rows.drain() if wait else self._gated_rows.ready()
        if rows:
            self.client.free_req_rows(rows)
        return len(rows)

    def clear(self) -> None:
        """Give back every row this worker holds (SGLang calls it on flush_cache)."""
        self.flush_rows(wait=True)
        held = self.refresh_stats().req_rows_held.get(self.client.client_id, 0)
        if held:
            logger.warning("clear(): worker %d still holds %d req rows; they stay allocated "
                           "until released through the memory manager", self.client.client_id,
                           held)
        self.req_generation.zero_()


def adopt_req_pool(pool: ReqToTokenPool, client: KVStateClient,
                   stats_max_age_s: float = 0.5) -> RemoteReqToTokenPool:
    """Turn SGLang's just-built ``pool`` (same table, same sizes) into a remote-row pool."""
    if type(pool) is not ReqToTokenPool:
        raise TypeError(f"only plain ReqToTokenPool can be shared, got {type(pool).__name__}")
    pool.__class__ = RemoteReqToTokenPool
    pool.client = client
    pool.stats_max_age_s = stats_max_age_s
    pool.free_slots = []  # never used: rows come from the memory manager
    pool._stats_at = 0.0
    pool._free_rows_seen = 0
    pool.free_gate = None
    pool._gated_rows = GatedReleases()
    pool.refresh_stats()
    return pool  # type: ignore[return-value]
