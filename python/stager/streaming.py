"""Stages larger than the memory budget, streamed by the writer that drains them.

With ``memory_budget_bytes`` set, a state_dict that does not fit the budget is still saved when
its staged copy feeds a writer that drains it (``dcp.async_save`` with stager's
``DefaultStager`` and :class:`stager.FileSystemWriter`, THREAD checkpointer). The stage then
copies nothing up front: it hands the writer a :class:`StreamedStage` (``accept_stage``) and dcp's
upload the state_dict itself, and the writer's Rust I/O threads copy each source's bytes in
waves, through one pool buffer of at most the budget cut into one chunk per thread: a chunk is
refilled as soon as its write to the file has returned. Sources that the file can take straight
from memory (``O_DIRECT`` at their alignment, or buffered I/O) are written without a copy.

``staging_completion`` resolves when the writer has read the last byte of every source
(``consumed``, one request per written item, completed by the Rust writer once an item's bytes
are written or copied out and checksummed): training may change the tensors from then on, while
the file is still being synced and committed. ``upload_completion`` resolves once the file is
durable and the checkpoint committed, as for any save: a kill at any point leaves the previous
checkpoint loadable. A failed write fails the stage with the writer's error.

The pool's ``peak_bytes`` (``DefaultStager.pool_stats()``) is the host memory of the checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import _native
from ._native import StagerError
from .plan import StatePlan

__all__ = ["MAX_BOUNCE_BYTES", "StreamedStage"]

#: The most bounce memory a streamed write uses: one 8 MiB chunk per thread of the writer's
#: busiest run (twice its 4 in-flight requests); more would sit idle.
MAX_BOUNCE_BYTES = 64 << 20
#: The least: one block, the unit of a direct write.
MIN_BOUNCE_BYTES = 4096
#: The pool's mapping unit for buffers from this size on (rust/pool.rs).
HUGE_PAGE = 2 << 20


class StreamedStage:
    """A state_dict larger than the budget, to be written by the writer that accepted it.

    The writer ``claim()``s it when ``write_data`` starts (getting the ``consumed`` completion
    and the bounce buffer), passes both to the Rust writer, and ``fail()``s it on an error that
    comes before the Rust call. The stage waits in :meth:`wait`.
    """

    def __init__(self, state_dict: Any, plan: StatePlan, pool: Any, budget: int) -> None:
        self.state_dict = state_dict
        self.plan = plan
        self.budget = budget
        self._pool = pool
        self._sources = {
            leaf.untyped_storage().data_ptr()
            for leaf in plan.leaves
            if leaf.device.type == "cpu" and leaf.untyped_storage().nbytes()
        }
        self._claimed = threading.Event()
        #: Set once the writer holds no memory of this stage any more (its write returned, or it
        #: never started): the next streamed stage of the same pool waits for it, so it finds
        #: the budget free.
        self.released = threading.Event()
        self.consumed: Any = None
        self._failure: str | None = None

    def holds(self, tensor: Any) -> bool:
        """Whether ``tensor`` views one of this state_dict's storages."""
        storage = tensor.untyped_storage()
        return storage.device.type == "cpu" and storage.nbytes() > 0 and storage.data_ptr() in self._sources

    def claim(self, items: int) -> tuple[Any, Any]:
        """Called by the writer as it starts: ``(consumed, bounce)``, a completion of one request
        per item and the pool buffer bounced bytes go through (the rest of the budget, at most
        :data:`MAX_BOUNCE_BYTES`). Raises StagerError when not even one block fits the budget."""
        stats = self._pool.stats()
        room = self.budget - (stats["allocated_bytes"] - stats["free_bytes"])
        size = min(room, MAX_BOUNCE_BYTES, max(self.plan.total_nbytes, MIN_BOUNCE_BYTES))
        # The pool maps whole huge pages from 2 MiB on: round down so the mapping fits too.
        size -= size % (HUGE_PAGE if size >= HUGE_PAGE else MIN_BOUNCE_BYTES)
        consumed = _native.Completion(items)
        try:
            if size < MIN_BOUNCE_BYTES:
                raise StagerError(
                    f"cannot stream {self.plan.total_nbytes} bytes within memory_budget_bytes={self.budget}: "
                    f"{max(room, 0)} bytes are free, a streamed write needs at least {MIN_BOUNCE_BYTES}"
                )
            bounce = self._pool.acquire(size)
        except BaseException as err:
            self.fail(str(err))
            self.released.set()
            raise
        self.consumed = consumed
        self._claimed.set()
        return consumed, bounce

    def fail(self, message: str) -> None:
        """Ends the stage with ``message`` (the writer could not write it)."""
        if self.consumed is not None:
            self.consumed.fail(message)
        else:
            self._failure = message
            self._claimed.set()

    def wait(self, reader_gone: Callable[[], bool], poll: float = 0.2) -> None:
        """Blocks until the writer has read every source; raises StagerError when the write
        failed, or when the reader of the early result ended without writing (dcp's upload
        failed before ``write_data``)."""
        while not self._claimed.wait(poll):
            if reader_gone():
                self.released.set()
                raise StagerError("dcp's upload ended before it wrote the streamed state_dict")
        if self.consumed is None:
            self.released.set()
            raise StagerError(f"the streamed save failed: {self._failure}")
        self.consumed.wait()
        failure = self.consumed.failure
        if failure is not None:
            raise StagerError(f"the streamed save failed: {failure}")

    def skip(self) -> None:
        """The writer writes none of this state_dict (dcp left this rank no items)."""
        self.consumed = _native.Completion(0)
        self._claimed.set()
        self.released.set()
