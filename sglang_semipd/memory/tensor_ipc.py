"""Share one tensor between processes without copying it: CUDA IPC on the GPU, shared memory
files on the CPU (so the same code is tested on the CPU).

A :class:`~sglang_semipd.protocol.TensorHandle` is a plain typed record (a ``msgspec.Struct``),
never a pickle: it carries the storage's IPC identity plus the view's shape, stride, storage
offset and dtype, so the importer rebuilds exactly the exporter's view (strides preserved).

Contract:
* :func:`export_tensor` on a CUDA tensor uses torch's own ``reduce_tensor`` (torch keeps the
  producer-side reference counting); on a CPU tensor the storage must already live in shared
  memory (``share_memory_()``), otherwise it raises.
* :func:`open_tensor` returns a view into the exporter's memory: no allocation of the data.
  Opening the same storage twice in one process reuses one mapping (torch's cache).
* The exporter must keep the tensor alive while any importer uses it (the memory manager
  holds every exported tensor until it exits). :class:`OpenedTensors` keeps what a process
  opened and drops it all at once in :meth:`OpenedTensors.close`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_semipd.protocol import TensorHandle

logger = logging.getLogger(__name__)


def _torch_dtype(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def export_tensor(t: Any) -> TensorHandle:
    """Describe ``t`` so another process can open the same memory."""
    common = dict(shape=tuple(t.shape), stride=tuple(t.stride()),
                  storage_offset=t.storage_offset(), dtype=str(t.dtype).removeprefix("torch."))
    if t.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        _rebuild, args = reduce_tensor(t.detach())
        (_cls, _size, _stride, _offset, _storage_cls, _dtype, device, handle, size_bytes,
         offset_bytes, _requires_grad, ref_handle, ref_offset, event_handle, event_sync) = args
        return TensorHandle(**common, device="cuda", device_index=int(device),
                            storage_handle=bytes(handle), storage_size_bytes=int(size_bytes),
                            storage_offset_bytes=int(offset_bytes),
                            ref_counter_handle=bytes(ref_handle or b""),
                            ref_counter_offset=int(ref_offset or 0),
                            event_handle=bytes(event_handle or b""),
                            event_sync_required=bool(event_sync))
    if t.device.type != "cpu":
        raise ValueError(f"cannot share a tensor on {t.device}")
    storage = t.untyped_storage()
    if not storage.is_shared():
        raise ValueError("CPU tensor is not in shared memory: call share_memory_() first")
    manager, handle, size = storage._share_filename_cpu_()
    return TensorHandle(**common, device="cpu", storage_handle=bytes(handle),
                        storage_size_bytes=int(size), manager_handle=bytes(manager))


def open_tensor(h: TensorHandle) -> Any:
    """Map the memory ``h`` describes into this process; returns the view (no data copy)."""
    import torch

    dtype = _torch_dtype(h.dtype)
    if h.device == "cuda":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        t = rebuild_cuda_tensor(
            torch.Tensor, torch.Size(h.shape), h.stride, h.storage_offset,
            torch.storage.TypedStorage, dtype, h.device_index, h.storage_handle,
            h.storage_size_bytes, h.storage_offset_bytes, False,
            h.ref_counter_handle or None, h.ref_counter_offset, h.event_handle or None,
            h.event_sync_required)
    elif h.device == "cpu":
        storage = torch.UntypedStorage._new_shared_filename_cpu(
            h.manager_handle, h.storage_handle, h.storage_size_bytes)
        t = torch.empty((0,), dtype=dtype).set_(storage, h.storage_offset, h.shape, h.stride)
    else:
        raise ValueError(f"unknown device {h.device!r}")
    if tuple(t.shape) != tuple(h.shape) or tuple(t.stride()) != tuple(h.stride):
        raise RuntimeError(f"opened view {tuple(t.shape)}/{t.stride()} does not match handle")
    return t


class OpenedTensors:
    """The tensors one process opened from handles; ``close()`` drops them all."""

    def __init__(self) -> None:
        self._tensors: list[Any] = []
        self.closed = False

    def open(self, h: TensorHandle) -> Any:
        if self.closed:
            raise RuntimeError("OpenedTensors already closed")
        t = open_tensor(h)
        self._tensors.append(t)
        return t

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._tensors)

    def close(self, collect: Optional[bool] = None) -> None:
        """Forget every opened tensor (callers must drop their own references too)."""
        self._tensors.clear()
        self.closed = True
        import torch

        if collect is None:
            collect = torch.cuda.is_available() and torch.cuda.is_initialized()
        if collect:
            torch.cuda.ipc_collect()
