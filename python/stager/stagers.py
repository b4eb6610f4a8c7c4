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

import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.staging import AsyncStager

from . import _native, dcp_hooks, engine, sharing
from ._native import StagerError
from .device import capture_order, start_device_copies
from .incremental import UnchangedStorages
from .options import StagingOptions
from .plan import PlanCache, StatePlan, plan_state_dict
from .streaming import StreamedStage

__all__ = ["BlockingAsyncStager", "DefaultStager", "StagedCopy", "StagingEngine", "StagingFuture"]


class StagedCopy:
    """A stage in flight: the plan, its host buffer, and the completion of its copies (request i
    is storage i, whoever copies it: the copy engine, the CUDA copier or a torch fallback)."""

    __slots__ = ("plan", "buffer", "completion")

    def __init__(self, plan: StatePlan, buffer: Any, completion: Any) -> None:
        self.plan = plan
        self.buffer = buffer
        self.completion = completion

    def wait(self) -> None:
        """Blocks (without the GIL, interruptibly) until every byte is in the host buffer."""
        self.completion.wait()

    def holds(self, tensor: Any) -> bool:
        """Whether ``tensor``'s bytes lie in this stage's buffer."""
        storage = tensor.untyped_storage()
        if storage.device.type != "cpu" or not storage.nbytes():
            return False
        return 0 <= storage.data_ptr() - self.buffer.address < self.buffer.nbytes

    def request_of(self, tensor: Any) -> int | None:
        """The request of :attr:`completion` that fills ``tensor``'s bytes when they lie in this
        stage's buffer and that copy has not completed yet; None otherwise (nothing to wait for)."""
        storage = tensor.untyped_storage()
        if storage.device.type != "cpu" or not storage.nbytes():
            return None
        offset = storage.data_ptr() - self.buffer.address
        if not 0 <= offset < self.buffer.nbytes:
            return None
        request = self.plan.table.storage_at(offset)
        if request is None or self.completion.done(request):
            return None
        return request


class StagingEngine:
    """A host pool plus the shared copy engine: what every stager stages with.

    With ``pool`` given it stages into that (process-wide) pool, which ``close()`` leaves alone.
    """

    def __init__(self, options: StagingOptions, pool: _native.HostPool | None = None) -> None:
        self.options = options
        self._owns_pool = pool is None
        self._pool = pool if pool is not None else self._new_pool()
        self._pid = os.getpid()
        #: With ``skip_unchanged``: what the previous stage staged (see stager.incremental).
        self.unchanged = UnchangedStorages() if options.skip_unchanged else None
        #: The previous stage's tensor descriptions, reused while they hold (stager.plan.PlanCache).
        self.plan_cache = PlanCache()
        # With skip_unchanged: the last incremental result's staged tensors (table order), whose
        # unchanged ones the next stage of the same cached plan aliases instead of rebuilding.
        self._previous_staged: list | None = None
        # Incremental stages run one at a time: each reads what the previous one recorded, and a
        # stage on another thread must not reuse bytes this one is still copying. A forked child
        # gets a lock of its own (one held by a parent's thread at the fork is never released).
        self._incremental_lock = threading.Lock()
        self._lock_pid = os.getpid()
        # The last streamed stage (stager.streaming); the next one waits for its memory.
        self._stream: StreamedStage | None = None

    def _new_pool(self) -> _native.HostPool:
        return _native.HostPool(
            shared=self.options.use_shared_memory,
            budget_bytes=self.options.memory_budget_bytes,
            pinned=self.options.use_pinned_memory,  # no-op without CUDA
        )

    @property
    def pool(self) -> _native.HostPool:
        if self._pid != os.getpid() and self._owns_pool:
            # A forked child: the pool's free memory is the parent's (see rust/pool.rs); keep
            # the inherited results valid but stage into memory of this process.
            self._pool, self._pid = self._new_pool(), os.getpid()
        return self._pool

    @property
    def copier(self) -> _native.CopyEngine:
        """The process-wide copy engine for these options (a new one after fork)."""
        return engine.copy_engine(self.options.threads, background=self.options.use_async_staging)

    def start(self, state_dict: Any, order: dict | None = None) -> StagedCopy:
        """Plans ``state_dict``, takes a buffer and starts every copy; returns at once.
        Device copies run after ``order`` (``device.capture_order()``), else after this thread's
        current streams."""
        return self.start_plan(plan_state_dict(state_dict), order)

    def start_plan(self, plan: StatePlan, order: dict | None = None) -> StagedCopy:
        """Like :meth:`start`, for a state_dict already planned (the writer plans first)."""
        table = plan.table
        # Nothing to copy (everything reused, or no bytes): no new memory at all.
        buffer = self.pool.acquire(plan.total_nbytes) if plan.total_nbytes else engine.empty_buffer()
        if buffer.shared_fd is not None:
            sharing.register_buffer(buffer)
        completion = _native.Completion(len(table.storage_nbytes))
        self.copier.submit_table(buffer, table, completion)
        start_device_copies(plan, buffer, completion, self.options.use_non_blocking_copy, order)
        return StagedCopy(plan, buffer, completion)

    def stage(self, state_dict: Any, order: dict | None = None, early: StagingFuture | None = None,
              writer: Any = None) -> Any:
        """Stages ``state_dict`` and returns the staged copy once every byte has landed. With
        ``early``, the staged dict is offered to it as soon as it is built (copies still running),
        after ``writer.accept_stage`` was told which stage it is (so the writer waits per storage).
        A state_dict that does not fit ``memory_budget_bytes`` is streamed by that writer
        (:mod:`stager.streaming`); without one, it raises StagerError before copying."""
        unchanged = self.unchanged
        self.pool.reset_peak()
        if unchanged is None:
            plan = plan_state_dict(state_dict, cache=self.plan_cache)
            budget = self._stream_budget(plan) if early is not None else None
            if early is not None and budget is not None:
                previous = self._stream
                if previous is not None:
                    previous.released.wait()  # its writer gives the budget back when it returns
                stream = self._stream = StreamedStage(state_dict, plan, self.pool, budget)
                writer.accept_stage(stream)
                early.offer_early(state_dict)
                stream.wait(early.reader_gone)
                return state_dict
            staged = self.start_plan(plan, order)
            result = staged.plan.materialize(staged.buffer)  # overlaps the copies
        else:
            if self._lock_pid != os.getpid():
                self._incremental_lock, self._lock_pid = threading.Lock(), os.getpid()
            with self._incremental_lock:
                plan = plan_state_dict(state_dict, track_versions=True, cache=self.plan_cache)
                reused = unchanged.reuse(plan)
                staged = self.start_plan(plan, order)
                tensors: list[Any] = []
                previous_staged = self._previous_staged if self.plan_cache.last_hit else None
                self._previous_staged = None
                result = plan.materialize(staged.buffer, reused, tensors, previous_staged)
                if early is not None:
                    writer.accept_stage(staged)
                    early.offer_early(result)
                staged.wait()
                # Only now: the next stage may reuse these bytes, so they must all be in place.
                unchanged.remember(plan, tensors)
                self._previous_staged = tensors
            return result
        if early is not None:
            writer.accept_stage(staged)
            early.offer_early(result)
        staged.wait()
        return result

    def _stream_budget(self, plan: StatePlan) -> int | None:
        """The memory budget when ``plan`` is streamed (it does not fit what the budget leaves
        free, and its tensors are all plain CPU ones that the writer can read itself), else None."""
        budget = self.options.memory_budget_bytes
        if budget is None or plan.device_storages or plan.opaque:
            return None
        stats = self.pool.stats()
        return budget if plan.total_nbytes > budget - (stats["allocated_bytes"] - stats["free_bytes"]) else None

    def reserve(self, nbytes: int) -> None:
        self.pool.reserve(nbytes, self.options.threads)

    def close(self) -> None:
        self.pool.finish_reservations()
        if self.unchanged is not None:
            self.unchanged.forget()
        self.plan_cache.clear()
        self._previous_staged = None
        if self._owns_pool:
            self.pool.trim()


class StagingFuture(Future):
    """The ``Future`` an async :class:`DefaultStager` returns: done (and ``staging_completion``
    fired) only once every byte is in host memory, like PyTorch's.

    A stage made for a writer that drains it (``dcp.async_save`` on the THREAD checkpointer with
    :class:`stager.FileSystemWriter`, found by :func:`stager.dcp_hooks.draining_writer`) is
    *bound*: the writer was handed the stage itself (``accept_stage``), so it can wait for each
    storage's copy before writing it, and :meth:`result` then returns the staged dict as soon as
    it is built, so that dcp's upload plans and starts writing while the copies run. An unbound
    future's :meth:`result` waits for the stage, as usual; :meth:`wait_staged` always does.
    """

    def __init__(self, bound: bool = False) -> None:
        super().__init__()
        self.bound = bound
        self._early_ready = threading.Event()
        self._early: Any = None
        self._reader: threading.Thread | None = None

    def reader_gone(self) -> bool:
        """Whether the thread that took the early result has ended (its save is over)."""
        reader = self._reader
        return reader is not None and not reader.is_alive()

    def offer_early(self, result: Any) -> None:
        self._early = result
        self._early_ready.set()

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self._early_ready.set()
        self._early = None

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self._early_ready.set()
        self._early = None

    def result(self, timeout: float | None = None) -> Any:
        if self.bound and not self.done():
            self._reader = threading.current_thread()
            self._early_ready.wait(timeout)
            early = self._early
            if early is not None:
                return early
        return super().result(timeout)

    def wait_staged(self, timeout: float | None = None) -> Any:
        """The staged dict once every byte has landed (whether or not the future is bound)."""
        return super().result(timeout)


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
        self._pid = os.getpid()
        self._staging_executor = self._new_executor()
        # Weak: holding the last Future would hold its staged dict, and with it a pool buffer
        # that the next stage could otherwise reuse once the caller is done with the result.
        self._staging_future: weakref.ref[StagingFuture] | None = None
        self._closed = False

    @property
    def options(self) -> StagingOptions:
        return self._config

    def _new_executor(self) -> ThreadPoolExecutor | None:
        if not self._config.use_async_staging:
            return None
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="stager")

    def stage(self, state_dict: Any, **kwargs: Any) -> Any:
        """Stages ``state_dict``: a ``Future`` in async mode, else the staged copy."""
        if self._closed:
            raise StagerError("DefaultStager.stage() called after close()")
        if self._pid != os.getpid():
            # A forked child: the executor's thread stayed in the parent (a stage submitted to
            # it would never run), so this stager gets threads of its own here.
            self._pid = os.getpid()
            self._staging_executor = self._new_executor()
            self._staging_future = None
        if self._staging_executor is None:
            return self._engine.stage(state_dict)
        # The GPU copies must follow what the caller has queued *now*, not when the stage starts.
        order = capture_order()
        writer = dcp_hooks.draining_writer()
        future = StagingFuture(bound=writer is not None)

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                early = future if writer is not None else None
                future.set_result(self._engine.stage(state_dict, order, early=early, writer=writer))
            except BaseException as err:
                future.set_exception(err)

        self._staging_executor.submit(run)
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
            future.wait_staged()

    def close(self) -> None:
        """Waits for a stage in flight and releases the pool's free memory. Results handed out
        earlier stay valid."""
        if self._closed:
            return
        self._closed = True
        if self._staging_executor is not None and self._pid == os.getpid():
            self._staging_executor.shutdown(wait=True)
        self._engine.close()

    def pool_stats(self) -> dict:
        """Counters of the stager's host pool (allocations, reuses, bytes held)."""
        return self._engine.pool.stats()

    def __enter__(self) -> DefaultStager:
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
    ``skip_unchanged`` (stager only) copies only what changed since this stager's previous stage,
    as :class:`StagingOptions` says.
    """

    _synchronize_after_execute: bool = False

    def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False, *,
                 skip_unchanged: bool = False) -> None:
        self.cache_staged_state_dict = cache_staged_state_dict
        self.type_check = type_check
        # Pinned only with the cache, like PyTorch: pinning a buffer used once costs more than
        # it saves.
        options = StagingOptions(
            use_pinned_memory=cache_staged_state_dict, use_shared_memory=False, use_async_staging=False,
            skip_unchanged=skip_unchanged,
        )
        self._engine = StagingEngine(options, pool=engine.process_pool(pinned=cache_staged_state_dict))

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
            getattr(config, "skip_unchanged", False),
        )
    except AttributeError as err:
        raise StagerError(f"config must be a StagingOptions, got {type(config).__name__}") from err
