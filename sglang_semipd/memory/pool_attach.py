"""Build SGLang's memory pools once (memory manager) and attach to them elsewhere (workers).

Whatever pool family SGLang picks for a model (MHA, MLA, paged, quantised, ...), its
constructors allocate their storage with torch factory calls (``zeros``, ``empty``, ``full``,
``arange``...), always in the same order for the same sizes. So:

* the **memory manager** builds the pools under :class:`RecordAllocations`: every factory call
  on the pool device is recorded (shape, dtype) and, if the finished pool keeps the tensor under
  a *storage attribute* (:data:`SHARED_ATTRS`: the KV buffers and ``req_to_token``), exported as
  a :class:`~sglang_semipd.memory.tensor_ipc.TensorHandle`. Everything else (free lists,
  scratch buffers, pointer tables) is process-local and stays so;
* a **worker** runs the very same constructors under :class:`ReplayAllocations`: the i-th
  factory call must match the i-th record (else :class:`AttachMismatch`); shared ones return the
  opened view instead of allocating, local ones allocate as usual. In-place initialisation of a
  shared tensor (``zero_``, ``fill_``, ``copy_``) is skipped, so attaching never clobbers live
  KV. Derived tables such as SGLang's ``k_data_ptrs`` are then rebuilt by the constructor
  itself from the opened views, i.e. with this process's addresses.

Invariant: after a replay, every shared storage of the pool is a view of the manager's memory
(:func:`shared_bytes` counts it) and the worker allocated no copy of it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from torch.utils._python_dispatch import TorchDispatchMode

from sglang_semipd.memory.tensor_ipc import OpenedTensors, export_tensor
from sglang_semipd.protocol import AllocationRecord, PoolManifest

logger = logging.getLogger(__name__)

# Attributes of SGLang pool objects that hold the shared state (KV data and the req->token
# table). Scratch and workspace buffers (e.g. dq_k_buffer, dummy_loc) are deliberately absent.
SHARED_ATTRS = frozenset({
    "req_to_token", "k_buffer", "v_buffer", "kv_buffer", "k_scale_buffer", "v_scale_buffer",
    "index_k_with_scale_buffer", "_raw",
})
_FACTORIES = frozenset({"empty", "empty_strided", "zeros", "ones", "full", "arange",
                        "empty_like", "zeros_like", "ones_like", "full_like", "new_empty",
                        "new_zeros", "new_full", "new_ones", "rand", "randn"})
_INIT_WRITES = frozenset({"zero_", "fill_", "copy_", "normal_", "uniform_"})


class AttachMismatch(RuntimeError):
    """A worker's pool construction diverged from the memory manager's record."""


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _is_factory(func: Any) -> bool:
    return func.overloadpacket.__name__ in _FACTORIES


def _device_of(out: Any) -> str:
    return out.device.type if hasattr(out, "device") else ""


def _call_device(args: tuple, kwargs: dict) -> str:
    """Device type a factory call allocates on, without running it."""
    device = kwargs.get("device")
    if device is None:  # *_like / new_* follow their input; plain factories the default
        for a in args:
            if hasattr(a, "device"):
                return a.device.type
        import torch

        return torch.get_default_device().type
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


class RecordAllocations(TorchDispatchMode):
    """Record every factory allocation on ``device`` made while active (manager side)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.tensors: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        if _is_factory(func) and _device_of(out) == self.device:
            if self.device == "cpu":
                out.share_memory_()  # CPU stand-in for device memory: make it shareable
            self.tensors.append(out)
        return out

    def manifest(self, pools: Iterable[Any]) -> PoolManifest:
        """Export the recorded tensors that ``pools`` keep as shared storage."""
        shared_ptrs = {t.untyped_storage().data_ptr() for t in iter_shared_tensors(pools)}
        records = []
        for i, t in enumerate(self.tensors):
            share = t.untyped_storage().data_ptr() in shared_ptrs
            records.append(AllocationRecord(index=i, shape=tuple(t.shape),
                                            dtype=_dtype_name(t.dtype),
                                            handle=export_tensor(t) if share else None))
        return PoolManifest(device=self.device, records=tuple(records))


class ReplayAllocations(TorchDispatchMode):
    """Answer the manager's recorded factory calls with opened views (worker side)."""

    def __init__(self, manifest: PoolManifest, opened: OpenedTensors) -> None:
        super().__init__()
        self.manifest = manifest
        self.opened = opened
        self.next = 0
        self._shared_ptrs: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _INIT_WRITES and args and self._is_shared(args[0]):
            return args[0]  # never re-initialise memory another process may be using
        if not _is_factory(func) or _call_device(args, kwargs) != self.manifest.device:
            return func(*args, **kwargs)
        rec = self._take()
        if rec.handle is None:
            out = func(*args, **kwargs)
            self._check(rec, out)
            return out
        self._check(rec, self._requested(func, args, kwargs))
        out = self.opened.open(rec.handle)
        self._shared_ptrs.add(out.untyped_storage().data_ptr())
        return out

    @staticmethod
    def _requested(func: Any, args: tuple, kwargs: dict) -> Any:
        """What the call asks for, computed on the meta device (no memory is allocated)."""
        import torch

        if "device" in kwargs:
            return func(*args, **dict(kwargs, device=torch.device("meta")))
        return func(*args, **kwargs)  # *_like / new_*: shape follows an existing tensor

    def _take(self) -> AllocationRecord:
        if self.next >= len(self.manifest.records):
            raise AttachMismatch(f"worker made more than the manager's "
                                 f"{len(self.manifest.records)} pool allocations")
        rec = self.manifest.records[self.next]
        self.next += 1
        return rec

    def _check(self, rec: AllocationRecord, out: Any) -> None:
        if tuple(out.shape) != rec.shape or _dtype_name(out.dtype) != rec.dtype:
            raise AttachMismatch(f"allocation #{rec.index}: manager made {rec.shape} "
                                 f"{rec.dtype}, worker asked for {tuple(out.shape)} "
                                 f"{_dtype_name(out.dtype)}: pool settings differ")

    def _is_shared(self, t: Any) -> bool:
        return hasattr(t, "untyped_storage") and t.untyped_storage().data_ptr() in self._shared_ptrs

    def finish(self) -> None:
        """Raise unless every recorded allocation was replayed."""
        if self.next != len(self.manifest.records):
            raise AttachMismatch(f"worker replayed {self.next} of "
                                 f"{len(self.manifest.records)} pool allocations")


def iter_shared_tensors(pools: Iterable[Any]) -> Iterator[Any]:
    """The storage tensors (by :data:`SHARED_ATTRS`) of each pool object, lists included."""
    for pool in pools:
        if pool is None:
            continue
        for name in SHARED_ATTRS:
            value = getattr(pool, name, None)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if hasattr(item, "untyped_storage"):
                    yield item


def shared_bytes(pools: Iterable[Any]) -> int:
    """Bytes of distinct storages behind the pools' shared attributes."""
    seen: dict[int, int] = {}
    for t in iter_shared_tensors(pools):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
