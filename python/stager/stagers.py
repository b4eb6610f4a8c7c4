"""Stagers: PyTorch's ``AsyncStager`` protocol on top of the Rust pool and copy engine.

``DefaultStager`` and ``BlockingAsyncStager`` are drop-ins for their namesakes in
``torch.distributed.checkpoint.staging``: same constructors, same ``stage()`` results, same
``should_synchronize_after_execute``. The order of operations in one stage:

1. ``plan_state_dict`` walks the tree once (Python);
2. the pool hands out one host buffer for every storage (budget checked here, before any copy);
3. one call into the copy engine copies every CPU storage, on worker threads, without the GIL;
4. the staged tensors are built over the buffer while the copies run, and handed out once the
   copies are done. Dropping them returns the buffer to the pool for the next stage.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.staging import AsyncStager

from . import _native, sharing
from ._native import StagerError
from .device import capture_order, start_device_copies
from .options import StagingOptions
from .plan import StatePlan, plan_state_dict

__all__ = ["BlockingAsyncStager", "DefaultStager", "StagingEngine"]

sharing.install()

_engines: dict[tuple[int, bool], _native.CopyEngine] = {}
_engines_lock = threading.Lock()

#: Scheduling priority drop of background (async) copy workers: they use the cores the training
#: thread leaves idle rather than taking them from it, and run at full speed on idle cores.
BACKGROUND_NICENESS = 10


def copy_engine(num_threads: int, background: bool = False) -> _native.CopyEngine:
    """The process-wide copy engine with ``num_threads`` workers (threads are shared by stagers);
    ``background`` engines run at lower priority, for stages that overlap training."""
    with _engines_lock:
        engine = _engines.get((num_threads, background))
        if engine is None:
            niceness = BACKGROUND_NICENESS if background else 0
            engine = _engines[(num_threads, background)] = _native.CopyEngine(num_threads, niceness)
        return engine


class StagedCopy:
    """A stage in flight: the plan, its host buffer and the copy job filling it."""

    __slots__ = ("plan", "buffer", "job", "device_copies")

    def __init__(self, plan: StatePlan, buffer: Any, job: Any, device_copies: list) -> None:
        self.plan = plan
        self.buffer = buffer
        self.job = job
        self.device_copies = device_copies

    def wait(self) -> None:
        """Blocks (without the GIL) until every byte is in the host buffer."""
        self.job.wait()
        self.wait_device_copies()

    def wait_device_copies(self) -> None:
        """Blocks until the accelerator's copies (only) have landed."""
        for event in self.device_copies:
            event.synchronize()


_shared_pools: dict[bool, _native.HostPool] = {}


def process_pool(pinned: bool) -> _native.HostPool:
    """A process-wide pool of private memory, for stagers that own no memory across calls
    (``BlockingAsyncStager``): a new stager reuses what an earlier one's results left behind,
    as the C allocator would for PyTorch's, instead of faulting in fresh pages."""
    with _engines_lock:
        pool = _shared_pools.get(pinned)
        if pool is None:
            pool = _shared_pools[pinned] = _native.HostPool(shared=False, pinned=pinned)
        return pool


class StagingEngine:
    """A host pool plus the shared copy engine: what every stager stages with.

    With ``pool`` given it stages into that (process-wide) pool, which ``close()`` leaves alone.
    """

    def __init__(self, options: StagingOptions, pool: _native.HostPool | None = None) -> None:
        self.options = options
        self._owns_pool = pool is None
        self.pool = pool if pool is not None else _native.HostPool(
            shared=options.use_shared_memory,
            budget_bytes=options.memory_budget_bytes,
            pinned=options.use_pinned_memory,  # no-op without CUDA
        )
        self.copier = copy_engine(options.threads, background=options.use_async_staging)

    def start(self, state_dict: Any, order: dict | None = None) -> StagedCopy:
        """Plans ``state_dict``, takes a buffer and starts every copy; returns at once.
        Device copies run after ``order`` (``device.capture_order()``), else after this thread's
        current streams."""
        return self.start_plan(plan_state_dict(state_dict), order)

    def start_plan(self, plan: StatePlan, order: dict | None = None) -> StagedCopy:
        """Like :meth:`start`, for a state_dict already planned (the writer plans first)."""
        buffer = self.pool.acquire(plan.total_nbytes)
        if buffer.shared_fd is not None:
            sharing.register_buffer(buffer)
        job = self.copier.submit_table(buffer, plan.table)
        device_copies = start_device_copies(plan, buffer, self.options.use_non_blocking_copy, order)
        return StagedCopy(plan, buffer, job, device_copies)

    def stage(self, state_dict: Any, order: dict | None = None) -> Any:
        """Stages ``state_dict`` and returns the staged copy once every byte has landed."""
        staged = self.start(state_dict, order)
        result = staged.plan.materialize(staged.buffer)  # overlaps the copies
        staged.wait()
        return result

    def reserve(self, nbytes: int) -> None:
        self.pool.reserve(int(nbytes), self.options.threads)

    def close(self) -> None:
        self.pool.finish_reservations()
        if self._owns_pool:
            self.pool.trim()


class DefaultStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging.DefaultStager``.

    ``stage(state_dict)`` returns a ``Future`` of the staged copy when
    ``config.use_async_staging`` is set (the default), else the staged copy itself. The copy is
    made by stager's Rust engine: a pooled host buffer (page-locked once when CUDA is present,
    shared memory when asked), filled by worker threads that don't hold the GIL, so the caller's
    Python thread keeps running at full speed during an async stage.

    Unlike PyTorch's, the default options work on a machine without CUDA (GPU-only options become
    no-ops), and a later ``stage()`` never overwrites a result handed out earlier.

    Thread Safety:
        ``stage()`` may be called from any thread; async stages run one at a time, in order.
    """

    _synchronize_after_execute: bool = True

    def __init__(self, config: StagingOptions = StagingOptions()) -> None:
        if not isinstance(config, StagingOptions):
            config = _convert_options(config)
        self._config = config
        self._engine = StagingEngine(config)
        self._staging_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager") if config.use_async_staging else None
        )
        # Weak: holding the last Future would hold its staged dict, and with it a pool buffer
        # that the next stage could otherwise reuse once the caller is done with the result.
        self._staging_future: weakref.ref[Future] | None = None
        self._closed = False

    @property
    def options(self) -> StagingOptions:
        return self._config

    def stage(self, state_dict: Any, **kwargs: Any) -> Any:
        """Stages ``state_dict``: a ``Future`` in async mode, else the staged copy."""
        if self._closed:
            raise StagerError("DefaultStager.stage() called after close()")
        if self._staging_executor is None:
            return self._engine.stage(state_dict)
        # The GPU copies must follow what the caller has queued *now*, not when the stage starts.
        future = self._staging_executor.submit(self._engine.stage, state_dict, capture_order())
        self._staging_future = weakref.ref(future)
        return future

    def reserve(self, nbytes: int) -> None:
        """Maps and pre-faults ``nbytes`` of host memory in the background, so the first stage of
        that size runs at repeat-call speed. The next ``stage()`` waits for it to finish."""
        self._engine.reserve(nbytes)

    def synchronize_staging(self) -> None:
        """Waits for the last async stage to finish; a no-op in sync mode."""
        future = self._staging_future() if self._staging_future is not None else None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Waits for a stage in flight and releases the pool's free memory. Results handed out
        earlier stay valid."""
        if self._closed:
            return
        self._closed = True
        if self._staging_executor is not None:
            self._staging_executor.shutdown(wait=True)
        self._engine.close()

    def pool_stats(self) -> dict:
        """Counters of the stager's host pool (allocations, reuses, bytes held)."""
        return self._engine.pool.stats()

    def __enter__(self) -> "DefaultStager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BlockingAsyncStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging.BlockingAsyncStager``: ``stage()`` blocks
    until the host copy is complete and returns it.

    Host memory of dropped results is kept, in a process-wide pool, for the next stage of any
    ``BlockingAsyncStager`` (what PyTorch's ``cache_staged_state_dict=True`` is for) but, unlike
    PyTorch's cache, a result still in use is never overwritten. ``cache_staged_state_dict=True``
    also page-locks that memory when CUDA is present.
    ``type_check`` is accepted for compatibility; structure and dtypes are always preserved.
    """

    _synchronize_after_execute: bool = False

    def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False) -> None:
        self.cache_staged_state_dict = cache_staged_state_dict
        self.type_check = type_check
        # Pinned only with the cache, like PyTorch: pinning a buffer used once costs more than
        # it saves.
        options = StagingOptions(
            use_pinned_memory=cache_staged_state_dict, use_shared_memory=False, use_async_staging=False
        )
        self._engine = StagingEngine(options, pool=process_pool(pinned=cache_staged_state_dict))

    def stage(self, state_dict: Any) -> Any:
        """Returns a copy of ``state_dict`` on the CPU."""
        return self._engine.stage(state_dict)

    def synchronize_staging(self) -> None:
        """No-op: staging is blocking."""

    def close(self) -> None:
        self._engine.close()


def _convert_options(config: Any) -> StagingOptions:
    """Accepts PyTorch's own StagingOptions (or anything with its four fields)."""
    try:
        return StagingOptions(
            config.use_pinned_memory,
            config.use_shared_memory,
            config.use_async_staging,
            config.use_non_blocking_copy,
            getattr(config, "num_threads", None),
            getattr(config, "memory_budget_bytes", None),
        )
    except AttributeError as err:
        raise StagerError(f"config must be a StagingOptions, got {type(config).__name__}") from err
