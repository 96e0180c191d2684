"""One CUDA stream per planned SM split, for one worker (the thin GPU half of partitioning).

``--sm-partition green``: for every split the worker splits the device's SM resource with
``cuDevSmResourceSplitByCount`` (one group of ``split.prefill_sms``, through flashinfer's
``green_ctx`` helpers over cuda-python) and builds a green context and a stream on its side of
it: the prefill worker on the *first group*, the decode worker on the *remainder*. The driver
splits deterministically from the same SMs in every process, so the two workers' sets are
complementary (ARCHITECTURE.md section 3: 64 + 68 SMs ran at the solo full-GPU rate; both
asking for the first 66 shared them). Switching between the pre-built streams is a Python
assignment between iterations.

With ``burst`` (``--burst-unconfined``, green only) one more split follows the planned ones
(:func:`~sglang_semipd.partition.splits.with_burst_split`): the prefill worker's stream for it
is an ordinary one (all SMs), the decode worker's is the *same stream object* as its most
prefill-heavy split's, so it shares that split's decode CUDA graphs.

``none`` and ``mps``: one ordinary stream for every split (no SM confinement in-process; under
``mps`` the process's share is ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``, set at spawn).

CUDA graphs replay on the stream they are launched on but keep the SM set of the stream they
were *captured* on, so decode graphs are captured per split on that split's stream
(:func:`capture_stream` + the ``graph_capture`` patch in :mod:`sglang_semipd.patches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Optional, Sequence

from sglang_semipd.partition.splits import SMSplit, check_grant, plan_splits, with_burst_split

logger = logging.getLogger(__name__)

# The stream the next CUDA-graph capture (decode, or prefill with --prefill-graphs) must run
# on (None: SGLang's own choice).
_capture_stream: Optional[Any] = None


@contextlib.contextmanager
def capture_stream(stream: Optional[Any]) -> Iterator[None]:
    """Within the block, SGLang's CUDA-graph captures (decode, prefill) run on ``stream``."""
    global _capture_stream
    previous, _capture_stream = _capture_stream, stream
    try:
        yield
    finally:
        _capture_stream = previous


def current_capture_stream() -> Optional[Any]:
    return _capture_stream


@dataclasses.dataclass
class SplitStreams:
    """A worker's streams, one per planned split (``streams[i]`` belongs to ``splits[i]``);
    ``sm_counts[i]`` is what the driver actually granted this side (``None``: unconfined)."""

    role: str
    mode: str
    splits: tuple[SMSplit, ...]
    streams: list[Any]
    sm_counts: list[Optional[int]]

    def describe(self) -> str:
        parts = [s.describe() + (f"->{n}" if n is not None else "")
                 for s, n in zip(self.splits, self.sm_counts)]
        return f"{self.role} {self.mode}: " + ", ".join(parts)


def total_sms(device_index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def build_split_streams(role: str, mode: str, shares: Sequence[float], device_index: int,
                        burst: bool = False) -> SplitStreams:
    """Plan the splits for this GPU and build ``role``'s stream for each, plus the burst
    split's with ``burst`` (see module doc)."""
    import torch

    if role not in ("prefill", "decode"):
        raise ValueError(f"unknown worker role {role!r}")
    if burst and mode != "green":
        raise ValueError(f"the burst split needs --sm-partition green, not {mode}")
    splits = plan_splits(shares, total_sms(device_index))
    if mode != "green":
        stream = torch.cuda.Stream(device_index)
        return SplitStreams(role, mode, splits, [stream] * len(splits), [None] * len(splits))
    from flashinfer import green_ctx as gc

    dev = torch.device("cuda", device_index)
    cu_dev = gc.get_cudevice(dev)
    resource = gc.get_device_resource(cu_dev)
    streams, counts = [], []
    for split in splits:
        groups, remaining = gc.split_resource(resource, 1, split.prefill_sms)
        mine = groups[0] if role == "prefill" else remaining
        granted = int(mine.sm.smCount)
        wanted = split.prefill_sms if role == "prefill" else split.decode_sms
        if granted != wanted:
            logger.warning("%s split %d/%d: the driver granted %d SMs, planned %d", role,
                           split.prefill_sms, split.decode_sms, granted, wanted)
        check_grant(role, split, granted)
        streams.append(gc.create_green_ctx_streams(cu_dev, [mine])[0])
        counts.append(granted)
    if burst:
        splits = with_burst_split(splits)
        if role == "prefill":
            streams.append(torch.cuda.Stream(device_index))
            counts.append(None)
        else:
            streams.append(streams[-1])
            counts.append(counts[-1])
    out = SplitStreams(role, mode, splits, streams, counts)
    logger.info("green-context streams built: %s", out.describe())
    return out
