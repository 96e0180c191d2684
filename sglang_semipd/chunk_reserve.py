"""Waiting prompts ahead of a long prompt's next chunk (``--prefill-chunk-reserve``).

SGLang continues a prompt that is prefilled in chunks before it looks at the waiting queue
(``Scheduler._get_new_batch_prefill_raw`` calls ``PrefillAdder.add_chunked_req`` first), and
that chunk takes the whole ``--chunked-prefill-size`` budget while the prompt lasts: every
prompt that arrives behind a long one waits for all of its chunks. A semi-PD prefill worker
runs on its share of the SMs, next to the decode worker, so its chunks are slow: in session
14's H100 trace (8B shape, ShareGPT at 16 req/s) 2,048-token chunks took 120-155 ms on 72 of
132 SMs. Eight long prompts (about 1,000-2,000 tokens each) arrived back to back there; they
and the ten short requests behind them had a TTFT of 0.3-0.85 s, which was the run's TTFT
tail (P90 275 ms, median 40 ms).

With a reserve, the prefill worker holds part of each chunk's budget back from the chunked
prompt, for the waiting prompts that fit in it whole: they move to the front of the waiting
queue (ahead of longer prompts queued before them) and join the chunk's batch instead of
waiting for the last chunk. The chunked prompt keeps at least ``1 - fraction`` of the budget,
so it still advances every round, and the longer waiting prompts keep their arrival order
among themselves: the first of them starts when the chunked prompt is done. (Session 15's
first H200 run of the reserve, without this reorder, changed nothing: in that burst the head
of the queue was always one of the long prompts, which never fit the reserve, so the short
prompts behind them still waited.) The reorder holds under SGLang's default
``fcfs`` policy; other policies sort the queue again, and then a reserve may go unused.

The round's contract (the two ``PrefillAdder`` patches of :mod:`sglang_semipd.patches`):

* :func:`holding` sets the reserve for one ``get_new_batch_prefill`` call; outside it (and
  in every process but the prefill worker) the patches do what SGLang does.
* ``add_chunked_req`` gives the chunked request its budget minus the reserve (it keeps at
  least one page);
* while that request is still unfinished after its chunk, a waiting prompt that does not
  fit whole in what is left of the budget is refused (``AddReqResult.OTHER``, which ends
  SGLang's admission loop): SGLang tracks one chunked request, and would otherwise start a
  second one in the leftover budget.

Pure bookkeeping: no torch, no SGLang.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

MAX_FRACTION = 0.9  # the chunked prompt keeps at least a tenth of the budget

_reserve = 0  # tokens held back in the current get_new_batch_prefill call (0: SGLang's order)


def ceil_pages(tokens: int, page_size: int) -> int:
    """``tokens`` rounded up to whole pages (as ``PrefillAdder.ceil_paged_tokens``)."""
    return -(-tokens // page_size) * page_size


def plan_reserve(budget: int, chunk_left: int, waiting: Sequence[int], page_size: int,
                 fraction: float) -> tuple[int, list[int]]:
    """``(tokens, chosen)``: the tokens of this round's chunk ``budget`` to hold back from
    a chunked prompt with ``chunk_left`` tokens still to prefill, and the indices (in queue
    order) of the ``waiting`` prompts they are for. ``waiting`` holds each waiting prompt's
    tokens to prefill (an upper bound: cached prefixes are not known yet).

    Every waiting prompt that fits whole in what is left of ``fraction * budget`` is
    chosen, in queue order, skipping the ones that do not fit: those move ahead of the
    longer prompts queued before them (which still go in arrival order once the chunked
    prompt is done). ``(0, [])`` when none fits, when ``fraction`` is 0, or when the chunked
    prompt and the waiting prompts before the first one that does not fit all fit in the
    budget anyway (SGLang's own order serves them)."""
    if not 0.0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"fraction {fraction} outside [0, {MAX_FRACTION}]")
    if page_size <= 0:
        raise ValueError(f"page_size {page_size} must be positive")
    cap = int(budget * fraction) // page_size * page_size
    if cap <= 0 or chunk_left <= 0:
        return 0, []
    held, chosen = 0, []
    for i, n in enumerate(waiting):
        need = ceil_pages(max(n, 1), page_size)
        if held + need <= cap:
            held += need
            chosen.append(i)
    in_order = chosen == list(range(len(chosen)))  # a prefix of the queue: no overtaking
    if not chosen or (in_order and ceil_pages(chunk_left, page_size) + held <= budget):
        return 0, []
    return held, chosen


def overtaking_order(n: int, chosen: Sequence[int]) -> list[int]:
    """Queue order with ``chosen`` (ascending indices of ``range(n)``) moved to the front,
    both parts keeping their order."""
    picked = set(chosen)
    return list(chosen) + [i for i in range(n) if i not in picked]


@contextlib.contextmanager
def holding(tokens: int) -> Iterator[None]:
    """Hold ``tokens`` back from the chunked request for the duration of the block (one
    ``get_new_batch_prefill`` call of the prefill worker)."""
    global _reserve
    if tokens < 0:
        raise ValueError(f"a reserve cannot be negative: {tokens}")
    previous, _reserve = _reserve, tokens
    try:
        yield
    finally:
        _reserve = previous


def current() -> int:
    """The reserve of the ``get_new_batch_prefill`` call in progress (0 outside one)."""
    return _reserve


def chunk_budget(rem_chunk_tokens: int, page_size: int) -> int:
    """What of the adder's ``rem_chunk_tokens`` to hold back now: :func:`current`, less
    whatever would leave the chunked request under one page."""
    return max(0, min(_reserve, rem_chunk_tokens - page_size))
