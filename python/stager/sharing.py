"""Handing staged results to another process without copying them or opening a file per tensor.

With ``use_shared_memory=True`` a stage lands in one ``memfd`` buffer. When such a result is sent
to another process through ``multiprocessing`` (``dcp.async_save`` with
``AsyncCheckpointerType.PROCESS`` does that), PyTorch's own pickling would move every storage into
a new shared-memory segment, one file descriptor each: 20,000 tensors fail with EMFILE. This
module teaches ``multiprocessing``'s pickler that tensors living in a stager buffer travel as
(buffer, offset, view): the buffer's descriptor is passed once per message, the receiver maps it
once, and every tensor is rebuilt over that mapping with its storage sharing intact. Tensors that
are not in a stager buffer go through PyTorch's reduction unchanged.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
import weakref
from multiprocessing.reduction import DupFd, ForkingPickler
from typing import Any

import torch
import torch.multiprocessing.reductions as torch_reductions

__all__ = ["install", "register_buffer"]

_lock = threading.Lock()
_starts: list[int] = []  # sorted start addresses of live shared buffers
_buffers: dict[int, tuple[weakref.ref, int, _BufferHandle]] = {}  # start -> (buffer, length, handle)


class _BufferHandle:
    """Stands for one shared pool buffer inside a pickle; pickled once per message (memo)."""

    __slots__ = ("fd", "length", "__weakref__")

    def __init__(self, fd: int, length: int) -> None:
        self.fd = fd
        self.length = length

    def __reduce__(self) -> tuple:
        return (_map_buffer, (DupFd(self.fd), self.length))


class _MappedBuffer:
    """The receiver's mapping of a sender's buffer, and the storages rebuilt over it so far."""

    __slots__ = ("mapping", "storages")

    def __init__(self, mapping: mmap.mmap) -> None:
        self.mapping = mapping
        self.storages: dict[tuple[int, int], torch.UntypedStorage] = {}

    def storage(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        key = (offset, nbytes)
        storage = self.storages.get(key)
        if storage is None:
            if nbytes:
                storage = torch.frombuffer(self.mapping, dtype=torch.uint8, count=nbytes, offset=offset).untyped_storage()
            else:
                storage = torch.UntypedStorage(0)
            self.storages[key] = storage
        return storage


def _map_buffer(dup: Any, length: int) -> _MappedBuffer:
    fd = dup.detach()
    try:
        return _MappedBuffer(mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    finally:
        os.close(fd)


def _rebuild_tensor(mapped: _MappedBuffer, offset: int, nbytes: int, dtype: torch.dtype, size: tuple,
                    stride: tuple, storage_offset: int, conj: bool) -> torch.Tensor:
    tensor = torch.empty(0, dtype=dtype).set_(mapped.storage(offset, nbytes), storage_offset, size, stride)
    return tensor.conj() if conj else tensor


def register_buffer(buffer: Any) -> None:
    """Makes tensors over ``buffer`` (a shared ``stager._native.HostBuffer``) pickle by reference."""
    fd = buffer.shared_fd
    if fd is None:
        return
    start = buffer.address
    with _lock:
        _forget_dead()
        if start in _buffers and _buffers[start][0]() is buffer:
            return
        if start not in _buffers:
            bisect.insort(_starts, start)
        _buffers[start] = (weakref.ref(buffer), buffer.capacity, _BufferHandle(fd, buffer.capacity))


def _forget_dead() -> None:
    dead = [start for start, (ref, _, _) in _buffers.items() if ref() is None]
    for start in dead:
        del _buffers[start]
        _starts.remove(start)


def _find_buffer(address: int, nbytes: int) -> tuple[int, _BufferHandle] | None:
    with _lock:
        index = bisect.bisect_right(_starts, address) - 1
        if index < 0:
            return None
        start = _starts[index]
        ref, length, handle = _buffers[start]
        if ref() is None or address + nbytes > start + length:
            return None
        return start, handle


def _reduce_tensor(tensor: torch.Tensor) -> tuple:
    if type(tensor) is torch.Tensor and tensor.is_cpu and tensor.layout is torch.strided and not tensor.requires_grad:
        storage = tensor.untyped_storage()
        found = _find_buffer(storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None
        if found is not None:
            start, handle = found
            return (
                _rebuild_tensor,
                (handle, storage.data_ptr() - start, storage.nbytes(), tensor.dtype, tuple(tensor.shape),
                 tensor.stride(), tensor.storage_offset(), tensor.is_conj()),
            )
    return torch_reductions.reduce_tensor(tensor)


_installed = False


def install() -> None:
    """Registers the reduction with multiprocessing's pickler (idempotent)."""
    global _installed
    if not _installed:
        ForkingPickler.register(torch.Tensor, _reduce_tensor)
        _installed = True
