"""Device-to-host copies: storages that live on an accelerator, copied into the host buffer.

CUDA storages go through the Rust ``DeviceCopier`` (``rust/cuda.rs``): copies on streams the
engine owns, made to wait for an event recorded on the caller's current stream, so kernels already
queued there finish before their output is copied; each storage's request of the stage's
``Completion`` completes when its copy has landed. Storages of other accelerators (and CUDA
storages where the native driver can't be used, e.g. ROCm builds of PyTorch) are copied by torch,
blocking, and their requests completed here.

The order of operations in one stage:

1. ``capture_order()`` in the caller's thread, at ``stage()`` time: one mark per CUDA device in
   use, on that thread's current stream (a few microseconds; nothing waits);
2. ``start_device_copies(plan, buffer, completion, non_blocking, order)`` wherever the stage runs:
   queues every CUDA storage's copy behind its device's mark and returns at once;
3. ``completion.wait()`` before anyone reads the buffer.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from . import _native
from .plan import StatePlan

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


def start_device_copies(plan: StatePlan, buffer: Any, completion: Any, non_blocking: bool,
                        order: dict[int, Any] | None = None) -> None:
    """Starts copying every non-CPU storage of ``plan`` into ``buffer``, completing request i of
    ``completion`` when storage i has landed.

    CUDA copies run after ``order``'s mark for their device (see :func:`capture_order`); a device
    without one is ordered after this thread's current stream, now. With ``non_blocking=False``
    the copies are complete when this returns.
    """
    table = plan.table
    if not table.has_device_storages:
        return
    native = table.cuda_copies if native_cuda_available() else []
    if native:
        copier = device_copier()
        order = order or {}
        marks = []
        for device in sorted({copy[1] for copy in native}):
            mark = order.get(device)
            if mark is None:
                mark = copier.mark(device, torch.cuda.current_stream(device).cuda_stream)
            marks.append(mark)
        # The table holds the storages: the copier keeps it (and the buffer) alive until they land.
        copier.submit(buffer, completion, native, marks, table)
    copied_natively = {copy[0] for copy in native}
    others = [i for i, device in enumerate(table.storage_devices) if device is not None and i not in copied_natively]
    if others:  # other accelerators, or CUDA without the native driver: torch copies, blocking
        nbytes = table.storage_nbytes
        for index in others:  # overlaps the CUDA copies queued above
            if nbytes[index]:
                storage = plan.storages[index]
                target = torch.frombuffer(buffer, dtype=torch.uint8, count=storage.nbytes, offset=storage.offset)
                source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage.storage)
                target.copy_(source, non_blocking=False)
            completion.mark_complete(index)
    if native and not non_blocking:
        completion.wait()
