"""RemoteTokenAllocator: SGLang's token->KV slot allocator, with the state in
the memory manager (:mod:`sglang_semipd.memory.service`) instead of this process.

The scheduler sees an ordinary ``BaseTokenToKVPoolAllocator``; underneath:

* **Allocation.**  ``alloc(n)`` with ``n <= small_alloc_max`` (decode-sized) is
  served from a local :class:`~sglang_semipd.memory.client.SlotLease`; when the lease
  runs short its remainder is used up and one ``Lease`` round trip opens the next
  block of ``lease_block`` tokens.  A decode step therefore costs at most one
  round trip (usually zero).  Larger requests are one ``Alloc`` round trip.
  Results are whole pages (``n`` is rounded *up* to the page size), int64 on
  ``device``; ``None`` when the memory manager is out of memory (SGLang's contract).
  ``alloc_extend`` / ``alloc_decode`` (paged scheduling, ``page_size > 1``) take
  only the new pages this way and fill the rest from ``last_loc``.
* **Frees are buffered.**  ``free`` / ``free_segment(s)`` only record the freed
  pages locally (one index per page).  They reach the memory manager -- and become
  visible to the other worker -- in a single ``Free`` call at ``free_group_end``,
  at an explicit :meth:`flush`, when more than ``free_flush_tokens`` tokens are
  buffered outside a free group, or right before a server allocation that the
  last known free count could not cover.  Until then they count in this process's
  :meth:`available_size` but not in the server's free count.
* **Gated frees.**  With ``free_gate`` set (the decode worker under SGLang's overlap
  scheduler), each free waits, before it is buffered as above, for the gate that source
  returned when the free was made (an event after the latest forward launched, which may
  still write those slots: :mod:`sglang_semipd.memory.gated`). :meth:`release_ready`
  passes on the ones whose gate is done; :meth:`flush` and :meth:`clear` wait for all.
* **Sizes are estimates.**  :meth:`available_size` = server free count of the last
  ``Stats`` (refreshed when older than ``stats_max_age_s``, or by
  :meth:`refresh_stats`) corrected by this process's own allocs/frees since, plus
  the local lease and the buffered frees.  The other worker's traffic shows up
  only at the next refresh -- which comes after ``tight_stats_max_age_s`` instead
  once the last known free count is below ``tight_free_tokens``: a nearly full pool
  is where a stale count makes the scheduler admit what the pool no longer has.
* **Waiting for room (``oom_wait_s``).**  Two processes allocate from one pool, so an
  allocation the estimate allowed can still be refused (the other worker took the
  slots in between).  With ``oom_wait_s > 0`` a refused allocation is retried, with
  a growing pause, until it succeeds or ``oom_wait_s`` has passed; only then is it
  ``None`` (SGLang then raises).  The prefill worker waits (the decode worker frees
  slots as its requests finish, retract or are cached); the decode worker does not
  (``0``, the default): it never waits on the prefill worker, whose slots all pass
  to decode, and SGLang's decode path retracts instead.
* Exhausted leases are closed lazily (one ``ReturnLease`` each), in batches of
  ``lease_close_batch`` at a flush, and all at :meth:`flush` / :meth:`close`.

Unsupported (raise ``NotImplementedError``): ``get_cpu_copy``, ``load_cpu_copy``
(HiCache), ``resize``, ``backup_state`` / ``restore_state``, ``merge_and_sort_free``.
``free_pages`` / ``release_pages`` are ``None`` (SGLang's leak census skips them).

Not thread-safe (like the client it wraps).
"""

from __future__ import annotations

import logging
import time
from array import array
from typing import Any, Optional

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator

from sglang_semipd import protocol as P
from sglang_semipd.memory.client import KVStateClient, SlotLease, as_index_array, as_tensor
from sglang_semipd.memory.gated import GatedReleases, GateSource

logger = logging.getLogger(__name__)

_EMPTY = array("q")
REFUSAL_LOG_S = 10.0  # refusals are summarised in the log at most this often


class RemoteTokenAllocator(BaseTokenToKVPoolAllocator):
    """Token/page allocator whose slots are owned through ``client`` (see module doc).

    ``client`` must be the same :class:`KVStateClient` the worker's
    :class:`~sglang_semipd.memory.remote_radix_cache.RemoteRadixCache` uses: the
    memory manager only lets a client insert slots it owns."""

    def __init__(self, client: KVStateClient, *, device: Any = "cpu",
                 dtype: Optional[torch.dtype] = None, kvcache: Any = None,
                 lease_block: int = 256, small_alloc_max: Optional[int] = None,
                 free_flush_tokens: int = 4096, lease_close_batch: int = 8,
                 stats_max_age_s: Optional[float] = 0.5,
                 tight_stats_max_age_s: float = 0.005,
                 tight_free_tokens: Optional[int] = None, oom_wait_s: float = 0.0,
                 secure_ahead: int = 4) -> None:
        if not client.client_id:
            raise ValueError("client must be registered (hello) before use")
        ps = max(client.page_size, 1)
        if dtype is None:  # SGLang's allocator.dtype is the KV cache's dtype
            dtype = getattr(kvcache, "dtype", torch.bfloat16)
        super().__init__(client.capacity, ps, dtype, device, kvcache, False)
        self.client = client
        self.free_pages = self.release_pages = None  # no local free lists
        self.lease_block = -(-max(lease_block, 1) // ps) * ps
        self.small_alloc_max = self.lease_block // 2 if small_alloc_max is None \
            else small_alloc_max
        self.free_flush_tokens = free_flush_tokens
        self.lease_close_batch = lease_close_batch
        self.stats_max_age_s = stats_max_age_s
        self.tight_stats_max_age_s = tight_stats_max_age_s
        self.tight_free_tokens = max(4 * self.lease_block, client.capacity // 8) \
            if tight_free_tokens is None else tight_free_tokens
        self.oom_wait_s = oom_wait_s
        self.secure_ahead = max(1, secure_ahead)
        self.oom_waits = 0  # refused allocations that were waited for (and how long, below)
        self.oom_wait_total_s = 0.0
        self.refusals = 0  # allocations the memory manager refused (pool full)
        self._refusals_logged, self._refusals_logged_t = 0, -REFUSAL_LOG_S
        self._lease: Optional[SlotLease] = None
        self._exhausted: list[SlotLease] = []
        self._pending: list[torch.Tensor] = []  # one token index per freed page
        self._pending_tokens = 0
        self.free_gate: Optional[GateSource] = None  # see "Gated frees" in the module doc
        self._gated: GatedReleases[torch.Tensor] = GatedReleases(
            lambda reps: reps.numel() * self.page_size)
        self._stats: Optional[P.InvariantReport] = None
        self._stats_t = 0.0
        self.stats_generation = 0  # bumped at every refresh (caches reset their deltas)
        self._free_delta = 0  # own effect on the server free count since the refresh
        self.refresh_stats()

    # ------------------------------------------------------------ stats
    def refresh_stats(self) -> P.InvariantReport:
        """One ``Stats`` round trip; resets the local corrections."""
        self._stats = self.client.stats()
        self._stats_t = time.monotonic()
        self._free_delta = 0
        self.stats_generation += 1
        return self._stats

    def server_stats(self, max_age_s: Optional[float] = None) -> P.InvariantReport:
        """The last ``Stats`` report, refreshed first when older than ``max_age_s``
        (default ``stats_max_age_s``; ``None`` never refreshes)."""
        age = self.stats_max_age_s if max_age_s is None else max_age_s
        if age is not None and max_age_s is None and self._stats is not None \
                and self._stats.free + self._free_delta < self.tight_free_tokens:
            age = min(age, self.tight_stats_max_age_s)
        if age is not None and time.monotonic() - self._stats_t > age:
            return self.refresh_stats()
        assert self._stats is not None
        return self._stats

    def note_server_free(self, tokens: int) -> None:
        """Account ``tokens`` made free on the server by this process (e.g. evict)."""
        self._free_delta += tokens

    def server_free_estimate(self) -> int:
        return max(0, self.server_stats().free + self._free_delta)

    def available_size(self) -> int:
        """Estimated tokens this process could allocate now (see module doc)."""
        lease = self._lease.available if self._lease is not None else 0
        return self.server_free_estimate() + lease + self.pending_free_tokens

    @property
    def leased_available(self) -> int:
        return self._lease.available if self._lease is not None else 0

    @property
    def pending_free_tokens(self) -> int:
        """Freed here, not yet sent to the memory manager (gated ones included)."""
        return self._pending_tokens + self._gated.size

    # ------------------------------------------------------------ alloc
    def _round(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def alloc(self, need_size: int) -> Optional[torch.Tensor]:
        """``need_size`` (rounded up to whole pages) fresh slots, or ``None`` (OOM)."""
        n = self._round(int(need_size))
        if n <= 0:
            return torch.empty((0,), dtype=torch.int64, device=self.device)
        idx = self._alloc_small(n) if self._from_lease(n) else self._alloc_large(n)
        return None if idx is None else as_tensor(idx, self.device)

    def _from_lease(self, n: int) -> bool:
        """Small allocations, and any the local lease already covers (see :meth:`secure`)."""
        return n <= self.small_alloc_max or n <= self.leased_available

    def secure(self, n: int, ahead: Optional[int] = None) -> bool:
        """Make sure the local lease holds ``n`` tokens (rounded up to pages), so the next
        allocations of up to ``n`` tokens need no server call and cannot be refused.

        The decode worker calls this before SGLang checks whether the next decode step fits:
        the shared pool's free count is an estimate (the prefill worker allocates too), and a
        decode allocation refused *after* that check would raise instead of retracting.
        A new lease is asked for ``ahead`` (default ``secure_ahead``) steps of ``n`` (at least
        ``lease_block``), then for ``n`` alone if the pool cannot: on the H100 a decode batch
        of a few hundred requests outgrew the 256-token block, and leasing one step at a time
        cost a round trip (and one more to return the old lease) every step.
        Returns False when the memory manager cannot lease that many now; the free-count
        estimate is then fresh, so SGLang's check sees the shortage and retracts."""
        n = self._round(int(n))
        if n <= self.leased_available:
            return True
        fresh = None
        steps = self.secure_ahead if ahead is None else max(1, ahead)
        for size in dict.fromkeys((self._round(max(self.lease_block, steps * n)), n)):
            fresh = self._try_server(size, self.client.lease, "lease", wait=False)
            if fresh is not None:
                break
        # refused: the free count is fresh now; hand the remainder back only if it and the
        # server's free slots together cover n (else keep what this worker holds)
        if fresh is None and self.leased_available \
                and self.server_free_estimate() + self.leased_available >= n:
            self.release_lease()
            fresh = self._try_server(n, self.client.lease, "lease", wait=False)
        if fresh is None:
            return False
        self._free_delta -= len(fresh.indices)
        if self._lease is not None:
            self.release_lease()
        self._lease = fresh
        return True

    def secure_up_to(self, n: int) -> int:
        """Lease as much of ``n`` tokens as the pool can give now (whole pages); returns what
        the local lease then holds.

        The decode worker calls this before SGLang admits requests it retracted for a
        re-prefill: SGLang admits against :meth:`available_size` and then allocates, and the
        prefill worker may take the server's free slots in between.  What the lease holds
        cannot be taken; when the pool cannot give all of ``n``, the free-count estimate is
        fresh afterwards, so SGLang admits no more than the lease and the pool hold."""
        n = self._round(int(n))
        if self.secure(n, ahead=1):
            return self.leased_available
        have = self.server_free_estimate() + self.leased_available  # fresh after the refusal
        m = min(n, have // self.page_size * self.page_size)
        if m > self.leased_available:
            self.secure(m, ahead=1)  # refused only if the other worker took slots: no harm
        return self.leased_available

    def _try_server(self, n: int, call: Any, what: str, wait: bool = True) -> Any:
        """Flush buffered frees if the server may be short, then ``call(n)``; on OOM, retry
        for up to ``oom_wait_s`` when ``wait`` (see module doc); None on OOM."""
        if self.pending_free_tokens and self.server_free_estimate() < n:
            self._flush_frees()
        deadline = pause = None
        while True:
            try:
                out = call(n)
            except P.KVStateError as exc:
                if exc.code != P.ErrorCode.OUT_OF_MEMORY:
                    raise
                now = time.monotonic()
                if not wait or self.oom_wait_s <= 0 or (deadline is not None and now >= deadline):
                    self._note_refusal(what, n, exc, now)
                    if deadline is not None:
                        self._note_wait(what, n, now - (deadline - self.oom_wait_s), False)
                    self.refresh_stats()
                    return None
                if deadline is None:
                    deadline, pause = now + self.oom_wait_s, 0.0005
                time.sleep(min(pause, max(deadline - now, 0.0)))
                pause = min(pause * 2, 0.02)
                self._flush_frees()
                continue
            if deadline is not None:
                self._note_wait(what, n, time.monotonic() - (deadline - self.oom_wait_s), True)
            return out

    def _note_refusal(self, what: str, n: int, exc: Exception, now: float) -> None:
        """Count a refusal; log it at debug level, and at most every ``REFUSAL_LOG_S`` a
        summary (a nearly full pool refuses the decode worker's block-sized lease at every
        step, which must not flood the log)."""
        self.refusals += 1
        logger.debug("%s(%d) refused: %s", what, n, exc)
        if now - self._refusals_logged_t >= REFUSAL_LOG_S:
            logger.info("%d allocations refused (pool full) in the last %.0f s; latest: %s(%d): %s",
                        self.refusals - self._refusals_logged, REFUSAL_LOG_S, what, n, exc)
            self._refusals_logged, self._refusals_logged_t = self.refusals, now

    def _note_wait(self, what: str, n: int, waited_s: float, granted: bool) -> None:
        self.oom_waits += 1
        self.oom_wait_total_s += waited_s
        if not granted:
            logger.warning("%s(%d) still refused after waiting %.1f ms for the other worker to "
                           "free slots", what, n, waited_s * 1e3)
        else:
            logger.log(logging.INFO if waited_s >= 1.0 else logging.DEBUG,
                       "%s(%d) granted after waiting %.1f ms for the other worker to free slots",
                       what, n, waited_s * 1e3)

    def _alloc_server(self, n: int, wait: bool = True) -> Optional[array]:
        idx = self._try_server(n, self.client.alloc, "alloc", wait=wait)
        if idx is not None:
            self._free_delta -= len(idx)
        return idx

    def _alloc_large(self, n: int) -> Optional[array]:
        """``n`` tokens the lease does not cover: one ``Alloc`` round trip; refused, the
        lease's remainder and an ``Alloc`` of the rest (slots leased ahead by :meth:`secure`
        count in :meth:`available_size` but are no longer free on the server).  A worker that
        waits for room (``oom_wait_s``) waits only for the last attempt."""
        lease = self._lease
        if lease is None or not lease.available:
            return self._alloc_server(n)
        idx = self._alloc_server(n, wait=False)
        if idx is not None:
            return idx
        part = lease.take(lease.available)
        rest = self._alloc_server(n - len(part))
        if rest is None:
            lease.give_back(part)
            return None
        out = array("q", part)
        out.extend(rest)
        return out

    def _open_lease(self, n: int) -> Optional[SlotLease]:
        """One ``Lease`` round trip for >= n tokens (a full block when possible)."""
        sizes = list(dict.fromkeys((max(self.lease_block, n), n)))
        for size in sizes:  # only the last (smallest) attempt waits for room
            lease = self._try_server(size, self.client.lease, "lease", wait=size == sizes[-1])
            if lease is not None:
                self._free_delta -= len(lease.indices)
                return lease
        return None

    def _alloc_small(self, n: int) -> Optional[array]:
        """Take ``n`` from the local lease; at most one round trip to refill it."""
        lease = self._lease
        if lease is not None and lease.available >= n:
            return lease.take(n)
        part = lease.take(lease.available) if lease is not None else _EMPTY
        fresh = self._open_lease(n - len(part))
        if fresh is None:
            if len(part):
                lease.give_back(part)
            return None
        if lease is not None:
            self._exhausted.append(lease)
        self._lease = fresh
        out = array("q", part)
        out.extend(fresh.take(n - len(part)))
        return out

    def _take_pages(self, num_pages: int) -> Optional[torch.Tensor]:
        """``num_pages`` fresh page ids (cpu int64), or ``None``."""
        if num_pages == 0:
            return torch.empty((0,), dtype=torch.int64)
        n = num_pages * self.page_size
        idx = self._alloc_small(n) if self._from_lease(n) else self._alloc_large(n)
        if idx is None:
            return None
        return as_tensor(idx, "cpu")[:: self.page_size] // self.page_size

    def alloc_extend(self, prefix_lens: torch.Tensor, prefix_lens_cpu: torch.Tensor,
                     seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor,
                     last_loc: torch.Tensor, extend_num_tokens: int,
                     num_new_pages: Optional[int] = None, **unused: Any
                     ) -> Optional[torch.Tensor]:
        """Paged prefill allocation (same output as SGLang's paged allocator):
        each request first fills its partial last page after ``last_loc``, then
        gets whole new pages.  Only the new pages cost an allocation."""
        if unused:
            raise NotImplementedError(f"alloc_extend options {sorted(unused)} (DSv4)")
        if self.page_size == 1:
            return self.alloc(extend_num_tokens)
        from sglang.srt.mem_cache.allocator.paged import alloc_extend_naive

        ps = self.page_size
        if num_new_pages is None:
            num_new_pages = int(((seq_lens_cpu + ps - 1) // ps
                                 - (prefix_lens_cpu + ps - 1) // ps).sum())
        pages = self._take_pages(num_new_pages)
        if pages is None:
            return None
        out = torch.empty((extend_num_tokens,), dtype=torch.int64)
        alloc_extend_naive(prefix_lens_cpu.to(torch.int64), seq_lens_cpu.to(torch.int64),
                           last_loc.to("cpu", torch.int64), pages, out, ps, "cpu")
        return out.to(self.device)

    def alloc_decode(self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor,
                     last_loc: torch.Tensor, **unused: Any) -> Optional[torch.Tensor]:
        """Paged decode allocation: one slot per request, a new page only where
        the new token starts one (``seq_len % page_size == 1``)."""
        if unused:
            raise NotImplementedError(f"alloc_decode options {sorted(unused)} (DSv4)")
        if self.page_size == 1:
            return self.alloc(len(seq_lens_cpu))
        need = (seq_lens_cpu % self.page_size) == 1
        pages = self._take_pages(int(need.sum()))
        if pages is None:
            return None
        out = last_loc.to("cpu", torch.int64) + 1
        out[need] = pages * self.page_size
        return out.to(self.device)

    # ------------------------------------------------------------- free
    def _buffer(self, reps: torch.Tensor) -> None:
        """Buffer page representatives (token indices, one per page)."""
        if reps.numel() == 0:
            return
        # a copy: callers pass views of req_to_token rows they overwrite next
        reps = reps.to("cpu", torch.int64, copy=True)
        gate = self.free_gate() if self.free_gate is not None else None
        if gate is not None:
            self._gated.add(reps, gate)
            return
        self._add_pending(reps)
        if self.is_not_in_free_group and self._pending_tokens >= self.free_flush_tokens:
            self._flush_frees()

    def _add_pending(self, reps: torch.Tensor) -> None:
        self._pending.append(reps)
        self._pending_tokens += reps.numel() * self.page_size

    def _ungate(self, wait: bool) -> None:
        for reps in (self._gated.drain() if wait else self._gated.ready()):
            self._add_pending(reps)

    def release_ready(self) -> int:
        """Send the frees whose gate is done (and any other buffered ones) now; returns
        tokens freed. The decode worker calls it once per iteration under overlap."""
        if not len(self._gated) and not self._pending:
            return 0
        return self._flush_frees()

    def free(self, free_index: torch.Tensor) -> None:
        """Free the pages covering ``free_index`` (buffered; see module doc)."""
        if free_index.numel() == 0:
            return
        if self.page_size == 1:
            self._buffer(free_index)
        else:
            pages = torch.unique(free_index.to("cpu", torch.int64) // self.page_size)
            self._buffer(pages * self.page_size)

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        """Free ``kv_row[start_pos:start_pos + n]`` (SGLang's page-stride form)."""
        if free_index.numel() == 0:
            return
        ps = self.page_size
        if ps == 1:
            self._buffer(free_index)
            return
        offset = start_pos % ps
        reps = free_index[::ps] if offset == 0 else \
            torch.cat((free_index[:1], free_index[ps - offset:: ps]))
        self._buffer(reps.to("cpu", torch.int64) // ps * ps)

    def free_group_begin(self) -> None:
        self.is_not_in_free_group = False

    def free_group_end(self) -> None:
        """End of a scheduler free group: the group's frees go out in one call."""
        self.is_not_in_free_group = True
        self._flush_frees()
        if len(self._exhausted) >= self.lease_close_batch:
            self._close_exhausted()

    def _flush_frees(self, wait: bool = False) -> int:
        self._ungate(wait)
        if not self._pending:
            return 0
        idx = torch.cat(self._pending)
        self._pending, self._pending_tokens = [], 0
        uniq = torch.unique(idx)
        if uniq.numel() != idx.numel():
            logger.warning("%d pages freed twice in one batch; freeing once",
                           idx.numel() - uniq.numel())
        freed = self.client.free(as_index_array(uniq))
        self._free_delta += freed
        return freed

    def _close_exhausted(self) -> None:
        for lease in self._exhausted:
            self.client.return_lease(lease.lease_id, _EMPTY)
            lease.closed = True
        self._exhausted.clear()

    def flush(self) -> int:
        """Send every buffered free now (one call) and close exhausted leases;
        returns tokens freed.  A refused batch (``KVStateError``: a bug such as
        freeing slots this client does not own) is dropped whole and re-raised;
        its slots stay with this client until ``goodbye``. Gated frees are waited for."""
        freed = self._flush_frees(wait=True)
        self._close_exhausted()
        return freed

    def release_lease(self) -> int:
        """Return the local lease's unused slots to the server; returns tokens."""
        lease, self._lease = self._lease, None
        if lease is None:
            return 0
        returned = lease.return_unused()
        self._free_delta += returned
        return returned

    def clear(self) -> None:
        """SGLang's ``clear`` (flush_cache, when idle): hands back everything this
        process holds idle (buffered frees, the lease).  It cannot clear the shared
        pool; slots still held by requests stay held."""
        self.flush()
        self.release_lease()
        self.is_not_in_free_group = True
        self.refresh_stats()

    def close(self) -> None:
        """Flush and return the lease (call before the client's goodbye)."""
        self.clear()

    # --------------------------------------------------- not available remotely
    def get_cpu_copy(self, indices: Any, mamba_indices: Any = None) -> Any:
        raise NotImplementedError("HiCache offload is not supported by the semipd allocator")

    def load_cpu_copy(self, kv_cache_cpu: Any, indices: Any, mamba_indices: Any = None
                      ) -> Any:
        raise NotImplementedError("HiCache load-back is not supported by the semipd allocator")

    def resize(self, config: Any) -> None:
        raise NotImplementedError("the shared KV pool is sized by the memory manager")

    def merge_and_sort_free(self) -> None:
        raise NotImplementedError("free lists live in the memory manager")

    def backup_state(self) -> Any:
        raise NotImplementedError("allocator state lives in the memory manager; "
                                  "it cannot be snapshotted by one worker")

    def restore_state(self, state: Any) -> None:
        raise NotImplementedError("allocator state lives in the memory manager; "
                                  "it cannot be restored by one worker")

    def debug_print(self) -> str:
        return (f"RemoteTokenAllocator(client={self.client.client_id}, "
                f"available~{self.available_size()}, lease={self.leased_available}, "
                f"pending_free={self._pending_tokens})")
