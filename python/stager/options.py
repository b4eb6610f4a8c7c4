"""Staging options: PyTorch's ``StagingOptions`` fields, in PyTorch's order, plus stager's own."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._native import StagerError

__all__ = ["StagingOptions", "default_num_threads"]


def default_num_threads() -> int:
    """All cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
        memory_budget_bytes: upper bound on the host memory the stager's pool holds; a stage
            that cannot fit raises ``StagerError`` before anything is copied. ``None``: unbounded.
    """

    use_pinned_memory: bool = True
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool = True
    num_threads: int | None = None
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy"):
            if not isinstance(getattr(self, name), bool):
                raise StagerError(f"StagingOptions.{name} must be a bool, got {getattr(self, name)!r}")
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or isinstance(self.num_threads, bool) or self.num_threads < 1
        ):
            raise StagerError(f"StagingOptions.num_threads must be a positive int or None, got {self.num_threads!r}")
        if self.memory_budget_bytes is not None and (
            not isinstance(self.memory_budget_bytes, int)
            or isinstance(self.memory_budget_bytes, bool)
            or self.memory_budget_bytes < 0
        ):
            raise StagerError(
                f"StagingOptions.memory_budget_bytes must be a non-negative int or None, got {self.memory_budget_bytes!r}"
            )

    @property
    def threads(self) -> int:
        """The number of copy threads these options ask for."""
        return self.num_threads if self.num_threads is not None else default_num_threads()
