"""Input checks SGLang 0.5.17 leaves to the GPU (pure: no torch).

A prompt token id outside ``[0, vocab_size)`` reaches the embedding lookup unchecked in stock
SGLang and trips a device-side assert that takes the whole scheduler down (seen on the H100:
``indexSelectSmallIndex ... Assertion srcIndex < srcSelectDimSize failed``). Under MPS a fatal
fault in one client takes every client of the daemon with it, so in semi-PD it would take both
workers. :func:`out_of_vocab_error` finds such an id first; the worker patch in
:mod:`sglang_semipd.patches` turns it into SGLang's own bad-request abort (HTTP 400).
"""

from __future__ import annotations

from typing import Optional, Sequence


def out_of_vocab_error(input_ids: Sequence[int], vocab_size: Optional[int]) -> Optional[str]:
    """The error message for the first token id outside ``[0, vocab_size)``, else None
    (also None when the vocabulary size is unknown)."""
    if not vocab_size or not len(input_ids):
        return None
    if 0 <= min(input_ids) and max(input_ids) < vocab_size:
        return None
    pos, bad = next((i, t) for i, t in enumerate(input_ids) if not 0 <= t < vocab_size)
    return (f"Input token id {bad} at position {pos} is outside the model's vocabulary "
            f"[0, {vocab_size}).")
