"""The one place stager depends on dcp internals: which storage writer a stage is for.

``dcp.async_save`` calls ``async_stager.stage(state_dict)`` and then hands the stage's ``Future``
to its upload executor together with ``storage_writer``; nothing in dcp's public API tells the
stager which writer will drain its result. Stager's own writer (:class:`stager.FileSystemWriter`)
can write a staged dict whose copies are still running (it waits per storage, in Rust), and can
stream a state_dict larger than the memory budget; to do either it must be given the stage
explicitly, at ``stage()`` time.

:func:`draining_writer` finds that writer: it looks, from ``stage()``, for the ``async_save``
frame of ``torch.distributed.checkpoint.state_dict_saver`` on this thread and reads its
``storage_writer`` and ``async_checkpointer_type`` locals. Only the THREAD checkpointer counts
(the PROCESS one pickles the writer into another process, where a stage of this one cannot be
waited on). ``tests/test_dcp_hooks.py`` fails when a torch release renames what this relies on.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

__all__ = ["DCP_SAVER_MODULE", "draining_writer"]

#: The module whose ``async_save`` calls ``stage()``.
DCP_SAVER_MODULE = "torch.distributed.checkpoint.state_dict_saver"
#: The locals of ``async_save`` read here.
WRITER_LOCAL = "storage_writer"
CHECKPOINTER_LOCAL = "async_checkpointer_type"
# dcp wraps its inner call in a logging decorator: a handful of frames lie between.
_MAX_DEPTH = 12


def draining_writer() -> Any | None:
    """The storage writer of the ``dcp.async_save`` (THREAD checkpointer) that is calling
    ``stage()`` on this thread, when that writer accepts a stage in flight (has
    ``accept_stage``); None for every other caller."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "async_save" and frame.f_globals.get("__name__") == DCP_SAVER_MODULE:
            writer = frame.f_locals.get(WRITER_LOCAL)
            kind = frame.f_locals.get(CHECKPOINTER_LOCAL)
            if getattr(kind, "name", None) != "THREAD" or not callable(getattr(writer, "accept_stage", None)):
                return None
            return writer
        frame = frame.f_back
    return None
