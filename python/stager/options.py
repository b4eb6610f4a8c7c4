"""Staging options: PyTorch's ``StagingOptions`` fields, in PyTorch's order, plus stager's own."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _native
from ._native import StagerError

__all__ = ["StagingOptions", "default_num_threads"]


def default_num_threads() -> int:
    """All cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    """An optional int option in ``minimum..maximum``, else a StagerError naming it."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise StagerError(f"StagingOptions.{name} must be an int from {minimum} to {maximum} or None, got {value!r}")


@dataclass
class StagingOptions:
    """How a stager copies a state_dict to host memory.

    The first four fields are ``torch.distributed.checkpoint.staging.StagingOptions``'s, in its
    order and with its defaults. On a machine without CUDA the GPU-only ones
    (``use_pinned_memory``, ``use_non_blocking_copy``) are accepted and do nothing.

    Attributes:
        use_pinned_memory: page-lock the host pool once per buffer (not per checkpoint) so
            device-to-host copies run at the link's speed. No-op without CUDA.
        use_shared_memory: back the host pool with shared memory (one ``memfd`` per pool buffer,
            never one file descriptor per tensor).
        use_async_staging: ``stage()`` returns a ``concurrent.futures.Future`` at once and the
            copy runs in the background without holding the GIL.
        use_non_blocking_copy: device-to-host copies don't block the calling thread; the stager
            waits for them before the result is handed out. No-op without CUDA.
        num_threads: copy threads; ``None`` means every core this process may use.
        memory_budget_bytes: upper bound on the host memory the stager's pool holds. A state_dict
            that cannot fit is streamed in waves through at most this much memory when the stage
            feeds stager's ``FileSystemWriter`` under ``dcp.async_save`` (THREAD checkpointer) or
            ``stager.save(..., stager=)`` (:mod:`stager.streaming`); a stage whose whole result is
            handed out raises ``StagerError`` before anything is copied. ``None``: unbounded.
        skip_unchanged: don't copy storages that are unchanged since this stager's previous stage
            (same storage object, address, size and version counters): their staged tensors
            share the previous result's bytes, so staged results must be treated as read-only.
            See :mod:`stager.incremental`.
    """

    use_pinned_memory: bool = True
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool = True
    num_threads: int | None = None
    memory_budget_bytes: int | None = None
    skip_unchanged: bool = False

    def __post_init__(self) -> None:
        for name in ("use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy",
                     "skip_unchanged"):
            if not isinstance(getattr(self, name), bool):
                raise StagerError(f"StagingOptions.{name} must be a bool, got {getattr(self, name)!r}")
        _check_int("num_threads", self.num_threads, 1, _native.MAX_COPY_THREADS)
        _check_int("memory_budget_bytes", self.memory_budget_bytes, 0, _native.MAX_BYTES)

    @property
    def threads(self) -> int:
        """The number of copy threads these options ask for."""
        return self.num_threads if self.num_threads is not None else default_num_threads()
