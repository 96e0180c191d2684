"""Waiting prompts ahead of a long prompt's next chunk (``--prefill-chunk-reserve``).

SGLang continues a prompt that is prefilled in chunks before it looks at the waiting queue
(``Scheduler._get_new_batch_prefill_raw`` calls ``PrefillAdder.add_chunked_req`` first), and
that chunk takes the whole ``--chunked-prefill-size`` budget while the prompt lasts: every
prompt that arrives behind a long one waits for all of its chunks. A semi-PD prefill worker
runs on its share of the SMs, next to the decode worker, so its chunks are slow: in session
14's H100 trace (8B shape, ShareGPT at 16 req/s) 2,048-token chunks took 120-155 ms on 72 of
132 SMs, and the ~17 requests that arrived behind one long prompt had a TTFT of 0.3-0.85 s
(the run's P90 was 275 ms, its median 40 ms).

With a reserve, the prefill worker holds part of each chunk's budget back from the chunked
prompt, for the waiting prompts (in queue order) that fit in it whole: they join the chunk's
batch instead of waiting for the last chunk. The chunked prompt keeps at least
``1 - fraction`` of the budget, so it still advances every round.

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
                 fraction: float) -> int:
    """Tokens of this round's chunk ``budget`` to hold back from a chunked prompt with
    ``chunk_left`` tokens still to prefill, for the ``waiting`` prompts' lengths (queue
    order; tokens to prefill, an upper bound: their cached prefixes are not known yet).

    The waiting prompts are taken in order while their whole lengths fit in
    ``fraction * budget``; 0 when none fits, when ``fraction`` is 0, or when the chunked
    prompt and those prompts all fit in the budget anyway (SGLang's order serves them)."""
    if not 0.0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"fraction {fraction} outside [0, {MAX_FRACTION}]")
    if page_size <= 0:
        raise ValueError(f"page_size {page_size} must be positive")
    cap = int(budget * fraction) // page_size * page_size
    if cap <= 0 or chunk_left <= 0:
        return 0
    held = 0
    for n in waiting:
        need = ceil_pages(max(n, 1), page_size)
        if held + need > cap:
            break
        held += need
    if held == 0 or ceil_pages(chunk_left, page_size) + held <= budget:
        return 0
    return held


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
