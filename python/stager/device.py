"""Device-to-host copies: storages that live on an accelerator, copied into the host buffer.

CUDA storages go through the Rust ``DeviceCopier`` (``rust/cuda.rs``): copies on streams the
engine owns, made to wait for an event recorded on the caller's current stream, so kernels already
queued there finish before their output is copied; completion is reported per storage. Storages of
other accelerators (and CUDA storages where the native driver can't be used, e.g. ROCm builds of
PyTorch) are copied by torch, blocking.

The order of operations in one stage:

1. ``capture_order()`` in the caller's thread, at ``stage()`` time: one mark per CUDA device in
   use, on that thread's current stream (a few microseconds; nothing waits);
2. ``start_device_copies(plan, buffer, non_blocking, order)`` wherever the stage runs: queues every
   CUDA storage's copy behind its device's mark and returns at once;
3. ``.synchronize()`` on what it returned, before anyone reads the buffer.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import _native
from .plan import StatePlan, StoragePlan

__all__ = ["capture_order", "device_copier", "native_cuda_available", "start_device_copies"]

_copier: Any = None
_copier_lock = threading.Lock()
_native_cuda: bool | None = None


def native_cuda_available() -> bool:
    """Whether CUDA storages can be copied by stager's Rust engine here (a CUDA driver with a
    device, and a CUDA build of PyTorch). False on CPU-only machines; never raises."""
    global _native_cuda
    if _native_cuda is None:
        _native_cuda = getattr(torch.version, "hip", None) is None and bool(_native.cuda_available())
    return _native_cuda


def device_copier() -> Any:
    """The process-wide ``DeviceCopier`` (its streams are shared by every stager)."""
    global _copier
    with _copier_lock:
        if _copier is None:
            _copier = _native.DeviceCopier()
        return _copier


def capture_order() -> dict[int, Any]:
    """Marks the current point of this thread's current stream on every CUDA device in use.

    Call it where and when the copy must be ordered: in the training thread, at ``stage()``.
    Returns ``{device index: mark}``; empty without CUDA or before PyTorch has used CUDA (then no
    CUDA tensor can exist). Never waits for the GPU.
    """
    if not torch.cuda.is_initialized() or not native_cuda_available():
        return {}
    copier = device_copier()
    return {
        device: copier.mark(device, torch.cuda.current_stream(device).cuda_stream)
        for device in _native.cuda_active_devices()
    }


def start_device_copies(plan: StatePlan, buffer: Any, non_blocking: bool, order: dict[int, Any] | None = None) -> list:
    """Starts copying every non-CPU storage of ``plan`` into ``buffer``; returns objects with a
    ``synchronize()`` method to wait on (empty when the copies are already complete).

    CUDA copies run after ``order``'s mark for their device (see :func:`capture_order`); a device
    without one is ordered after this thread's current stream, now. With ``non_blocking=False``
    the copies are complete when this returns.
    """
    native: list[StoragePlan] = []
    fallback: list[StoragePlan] = []
    for storage in plan.device_storages:
        if not storage.nbytes:
            continue
        if storage.device.type == "cuda" and native_cuda_available():
            native.append(storage)
        else:
            fallback.append(storage)
    waits = []
    if native:
        job = _submit_cuda(native, buffer, order or {})
        if not non_blocking:
            job.wait()
        waits.append(job)
    for storage in fallback:  # overlaps the CUDA copies queued above
        target = torch.frombuffer(buffer, dtype=torch.uint8, count=storage.nbytes, offset=storage.offset)
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage.storage)
        target.copy_(source, non_blocking=False)
    return waits


def _submit_cuda(storages: list[StoragePlan], buffer: Any, order: dict[int, Any]) -> Any:
    copier = device_copier()
    devices = [_index(s.device) for s in storages]
    marks = []
    for device in sorted(set(devices)):
        mark = order.get(device)
        if mark is None:
            mark = copier.mark(device, torch.cuda.current_stream(device).cuda_stream)
        marks.append(mark)
    return copier.submit(
        buffer,
        devices,
        [s.address for s in storages],
        [s.offset for s in storages],
        [s.nbytes for s in storages],
        marks,
        [s.storage for s in storages],  # kept alive by the job until every copy has landed
    )


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
