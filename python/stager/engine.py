"""The process-wide parts of the engine: copy engines and host pools.

Every stager, writer and transport in a process shares these:

* :func:`copy_engine` gives the copy engine with a given number of worker threads (threads are
  shared by every stager; background engines run at ``BACKGROUND_NICENESS``, 0 unless
  ``STAGER_COPY_NICENESS`` says otherwise);
* :func:`process_pool` gives a process-wide pool of host memory, for users that own no memory
  across calls (``BlockingAsyncStager``, ``load``, the transport's receive buffers): a new user
  reuses what an earlier one's results left behind instead of faulting in fresh pages;
* at import, the ``multiprocessing`` pickler learns to send tensors in shared-memory buffers by
  reference (:mod:`stager.sharing`).

After ``os.fork()`` the child starts with empty registries: the parent's worker threads do not
exist in the child, so the next stage there makes new engines, and the Rust engine refuses (with a
``StagerError``) to queue work on an engine inherited from the parent.
"""

from __future__ import annotations

import os
import threading

from . import _native, sharing

__all__ = [
    "BACKGROUND_NICENESS",
    "copy_engine",
    "empty_buffer",
    "process_pool",
]

#: Scheduling priority drop of background (async) copy workers (``STAGER_COPY_NICENESS``
#: overrides it). It was 10, so that the workers would only use cores the training thread leaves
#: idle; but a node's cores are rarely idle (dataloader workers), and at nice 10 the workers get
#: about a tenth of a core beside each busy nice-0 process. Measured on 2026-12-07 (2-core Xeon VM,
#: 256 MiB state_dict, two busy-loop processes at nice 0 beside it, noisy shared machine; first
#: call, three runs each): nice 10 took 0.77 / 0.82 / 3.3 s, nice 5 0.22 / 0.36 s, nice 0
#: 0.10 / 0.15 / 2.0 s; repeat calls (median) 0.13 s at nice 10 against 0.036 s at nice 0. The
#: caller's Python loop lost about as large a share of its speed during the stage at either
#: priority (59-63 % at nice 10, 61-90 % at nice 0, on that loaded machine), so the shorter stage
#: at nice 0 also costs the caller less time in all. Callers that wait for staging (torchtitan
#: waits before every optimizer step) need it done: the workers run at the caller's priority.
BACKGROUND_NICENESS = 0

#: Environment variable that sets the niceness of background copy workers (0-19).
NICENESS_ENV = "STAGER_COPY_NICENESS"


def _background_niceness() -> int:
    value = os.environ.get(NICENESS_ENV, "").strip()
    if not value:
        return BACKGROUND_NICENESS
    try:
        niceness = int(value)
    except ValueError:
        niceness = -1
    if not 0 <= niceness <= 19:
        raise _native.StagerError(f"{NICENESS_ENV}={value!r}: expected a niceness from 0 to 19")
    return niceness

_lock = threading.Lock()
_engines: dict[tuple[int, bool], _native.CopyEngine] = {}
_pools: dict[bool, _native.HostPool] = {}


def copy_engine(num_threads: int, background: bool = False) -> _native.CopyEngine:
    """The process-wide copy engine with ``num_threads`` workers; ``background`` engines (stages
    that overlap training) run at ``BACKGROUND_NICENESS``."""
    with _lock:
        engine = _engines.get((num_threads, background))
        if engine is None:
            niceness = _background_niceness() if background else 0
            engine = _engines[(num_threads, background)] = _native.CopyEngine(num_threads, niceness)
        return engine


def empty_buffer() -> _native.HostBuffer:
    """A zero-byte host buffer for stages with nothing to copy (one page, mapped once per process)."""
    global _empty
    with _lock:
        if _empty is None:
            _empty = _native.HostPool().acquire(0)
        return _empty


_empty: _native.HostBuffer | None = None


def process_pool(pinned: bool = False) -> _native.HostPool:
    """The process-wide pool of private (optionally page-locked) host memory."""
    with _lock:
        pool = _pools.get(pinned)
        if pool is None:
            pool = _pools[pinned] = _native.HostPool(shared=False, pinned=pinned)
        return pool


# ---- fork -------------------------------------------------------------------------------------


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's engines (their threads stayed in the parent) and
    pools (their free memory is the parent's), so the child makes its own on first use."""
    global _lock, _empty
    _lock = threading.Lock()
    _empty = None
    _engines.clear()
    _pools.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
sharing.install()
