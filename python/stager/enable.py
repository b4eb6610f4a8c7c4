"""``stager.enable()``: PyTorch's checkpoint names resolve to stager's for the whole process.

After :func:`enable`, code written against PyTorch alone uses stager without a change:

- ``torch.distributed.checkpoint.staging.DefaultStager``, ``StagingOptions`` and
  ``BlockingAsyncStager`` are stager's classes (and so is the ``DefaultStager`` that
  ``dcp.async_save`` builds when it is given no ``async_stager``);
- ``dcp.save``, ``dcp.async_save`` and ``dcp.load`` given a local ``checkpoint_id`` and no
  ``storage_writer``/``storage_reader`` write with :class:`stager.FileSystemWriter` and read with
  :class:`stager.FileSystemReader` (dcp picks its default storage from the classes named in
  ``torch.distributed.checkpoint._storage_utils``; those names are the ones swapped). With
  ``async_checkpointer_type=PROCESS`` the writer is made here and sent to dcp's daemon, a fresh
  interpreter where ``enable()`` never ran. Paths with a ``scheme://`` keep PyTorch's fsspec storage.

``torch.distributed.checkpoint.FileSystemWriter``/``FileSystemReader`` named explicitly stay
PyTorch's: a caller that builds one asked for it.

A module that ran ``from torch.distributed.checkpoint.staging import DefaultStager`` before
``enable()`` holds PyTorch's class in its own namespace. Call ``enable()`` before importing such
code; the modules in :data:`KNOWN_IMPORTERS` (torchtitan's checkpointer) are rebound either way.

:func:`disable` puts back every name :func:`enable` changed, and gives the known importers
PyTorch's classes again. Both are idempotent and thread-safe. ``with stager.enable(): ...``
restores, on exit, the state found on entry.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType, TracebackType
from typing import Any

from .filesystem import FileSystemReader, FileSystemWriter
from .options import StagingOptions
from .stagers import BlockingAsyncStager, DefaultStager

__all__ = ["KNOWN_IMPORTERS", "Enabled", "disable", "enable", "is_enabled"]

_STAGING = "torch.distributed.checkpoint.staging"
_SAVER = "torch.distributed.checkpoint.state_dict_saver"
_STORAGE_UTILS = "torch.distributed.checkpoint._storage_utils"
_PROCESS_EXECUTOR = "torch.distributed.checkpoint._async_process_executor"

#: stager's replacement for each of PyTorch's staging names.
_STAGING_NAMES: dict[str, type] = {
    "DefaultStager": DefaultStager,
    "StagingOptions": StagingOptions,
    "BlockingAsyncStager": BlockingAsyncStager,
}

#: Modules known to bind PyTorch's staging names at import time; rebound when already imported.
KNOWN_IMPORTERS: tuple[str, ...] = (
    _SAVER,  # dcp.async_save's own default DefaultStager(StagingOptions(...))
    "torchtitan.components.checkpointer.dcp",  # torchtitan 0.3's CheckpointManager
    "torchtitan.components.checkpoint",  # torchtitan before 0.3
)

_MISSING = object()
_lock = threading.Lock()
# (module, attribute, PyTorch's value, stager's value) for every name enable() set; None: disabled.
_swapped: list[tuple[Any, str, Any, Any]] | None = None


def _default_process_writer(original: Any) -> Any:
    """Wraps dcp's PROCESS executor so a local checkpoint_id gets stager's writer, made here."""

    def execute_save(self: Any, staging_future_or_state_dict: Any, *args: Any,
                     checkpoint_id: str | os.PathLike | None = None, storage_writer: Any = None,
                     **kwargs: Any) -> Any:
        if storage_writer is None and checkpoint_id and FileSystemWriter.validate_checkpoint_id(checkpoint_id):
            storage_writer = FileSystemWriter(checkpoint_id)
        return original(self, staging_future_or_state_dict, *args, checkpoint_id=checkpoint_id,
                        storage_writer=storage_writer, **kwargs)

    execute_save.__wrapped__ = original  # type: ignore[attr-defined]
    execute_save.__doc__ = original.__doc__
    return execute_save


def _planned_swaps() -> list[tuple[Any, str, Any]]:
    """(target, attribute, stager's value) for each name to swap, given the modules loaded now."""
    staging = importlib.import_module(_STAGING)
    storage_utils = importlib.import_module(_STORAGE_UTILS)
    importlib.import_module(_SAVER)
    swaps: list[tuple[Any, str, Any]] = [(staging, name, ours) for name, ours in _STAGING_NAMES.items()]
    swaps += [(storage_utils, "FileSystemWriter", FileSystemWriter),
              (storage_utils, "FileSystemReader", FileSystemReader)]
    try:  # the PROCESS checkpointer (PyTorch 2.7 and later)
        process_executor = importlib.import_module(_PROCESS_EXECUTOR)
    except ImportError:
        process_executor = None
    if process_executor is not None:
        executor = process_executor._ProcessBasedAsyncCheckpointExecutor
        swaps.append((executor, "execute_save", _default_process_writer(executor.__dict__["execute_save"])))
    for name in KNOWN_IMPORTERS:
        module: ModuleType | None = sys.modules.get(name)
        if module is None:
            continue
        for attribute, ours in _STAGING_NAMES.items():
            # Only a name bound to PyTorch's own class: a module's own subclass is left alone.
            if hasattr(staging, attribute) and getattr(module, attribute, None) is getattr(staging, attribute):
                swaps.append((module, attribute, ours))
    return swaps


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _swapped is not None


class Enabled:
    """Returned by :func:`enable`; as a context manager, restores on exit the state found on entry."""

    def __init__(self, was_enabled: bool) -> None:
        self._was_enabled = was_enabled

    def __enter__(self) -> Enabled:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if not self._was_enabled:
            disable()


def enable() -> Enabled:
    """Makes PyTorch's ``DefaultStager``, ``StagingOptions``, ``BlockingAsyncStager`` and dcp's
    default file-system writer/reader for local paths resolve to stager's, process-wide.

    Idempotent: a second call changes nothing. Call it before importing code that binds
    ``DefaultStager`` by name (see :data:`KNOWN_IMPORTERS` for the modules rebound anyway).
    """
    global _swapped
    with _lock:
        if _swapped is not None:
            return Enabled(was_enabled=True)
        swapped = []
        for target, attribute, ours in _planned_swaps():
            # A name this PyTorch lacks (DefaultStager before 2.9) is removed again by disable().
            theirs = vars(target).get(attribute, _MISSING)
            setattr(target, attribute, ours)
            swapped.append((target, attribute, theirs, ours))
        _swapped = swapped
        return Enabled(was_enabled=False)


def disable() -> None:
    """Puts back every name :func:`enable` changed; a no-op when not enabled.

    A known importer (:data:`KNOWN_IMPORTERS`) imported while enabled, which therefore bound
    stager's classes, gets PyTorch's classes too.
    """
    global _swapped
    with _lock:
        if _swapped is None:
            return
        for target, attribute, theirs, ours in reversed(_swapped):
            if vars(target).get(attribute, _MISSING) is not ours:
                continue  # a name someone else rebound since is theirs to keep
            if theirs is _MISSING:
                delattr(target, attribute)
            else:
                setattr(target, attribute, theirs)
        _swapped = None
        staging = sys.modules[_STAGING]
        for name in KNOWN_IMPORTERS:
            module = sys.modules.get(name)
            if module is None:
                continue
            for attribute, ours in _STAGING_NAMES.items():
                if getattr(module, attribute, None) is ours and hasattr(staging, attribute):
                    setattr(module, attribute, getattr(staging, attribute))
