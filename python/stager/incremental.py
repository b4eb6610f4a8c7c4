"""Incremental staging: copy only the storages that changed since this stager's previous stage.

PyTorch already says what changed: every in-place write bumps the written tensor's version counter
(``tensor._version``: optimizer steps, ``copy_``, ``add_`` under ``no_grad``), and assigning
``.data`` or calling ``set_()`` swaps the storage instead. :class:`UnchangedStorages` remembers,
per source storage of the previous stage, the storage itself (a weak reference to its StorageImpl:
"the same object"), its address and size, every tensor object viewing it (weak references) with
its version counter, and the staged storage that holds its bytes. At the next stage a storage that
is the same object at the same address with the same size, viewed by tensors with the same
versions none of which replaced a recorded tensor object that is still alive, is *reused*: it takes no room in the new buffer, gets no copy (host or device),
and its staged tensors view the previous result's bytes. Anything else is copied as usual: a new,
moved or resized storage, a bumped version, another tensor object in place of a recorded one that
still lives (``nn.Parameter(p.data)`` has a fresh version counter, which after as many updates
reads the same number), an inference tensor (no version counter). Fresh aliases of the same
tensors (``model.state_dict()`` detaches anew each call, sharing the parameters' counters) are
reused; so a re-wrapped parameter whose old object is gone and whose new counter reached the old
value is missed like the writes below (a version counter's identity is not visible to Python).

A stage is remembered only once its copies are complete (and a stager runs one incremental stage
at a time), so a later stage never reuses bytes still being copied.

Staged results of such a stager therefore share the bytes of unchanged storages with earlier
results: treat them as read-only. The tracker holds the staged storages it may reuse, so those
bytes stay alive (and their pool memory in use) as long as this stager or any result uses them;
with nothing changed, a stage allocates nothing.

Replication (``ReplicationStager(skip_unchanged=True)``, :mod:`stager.replication`) uses the same
tracker on the sending side, recording each storage's *index* in the step it sent instead of a
staged storage: :meth:`UnchangedStorages.unchanged` then maps every unchanged storage of the next
step to the index its bytes have in the copy the holder already has, and only the others travel.

A write the version counter cannot see is missed: through ``.data`` (of the tensor or of a view:
another counter over the same storage); through a NumPy array (``t.numpy()``) or a DLPack capsule
over the tensor; through the storage (``t.untyped_storage().copy_(...)``); through the vector that
``torch.nn.utils.vector_to_parameters`` made the parameters view (it assigns ``.data``, so the
parameters keep counters of their own); by a forked child or another process writing shared
memory; by a C extension. Set ``STAGER_CHECK_UNCHANGED=1`` to compare, for every reused host storage,
the crc32c of its source bytes now with the bytes staged before; a mismatch raises
``StagerError`` naming the storage instead of handing out stale bytes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import _native
from ._native import StagerError
from .plan import StatePlan

__all__ = ["CHECK_ENV", "UnchangedStorages"]

#: Environment variable that turns on the debug check of reused storages.
CHECK_ENV = "STAGER_CHECK_UNCHANGED"


class UnchangedStorages:
    """One stager's memory of its previous stage (see the module docs): the records live in Rust
    (``stager._native.UnchangedRecords``), and the reuse decision over every storage is one call.

    Thread Safety:
        One stage at a time (the stagers serialize their stages).
    """

    def __init__(self) -> None:
        self._records = _native.UnchangedRecords()

    @property
    def storage_count(self) -> int:
        """Number of storages of the remembered stage (what a holder's copy of it has)."""
        return self._records.storage_count

    @property
    def copied_nbytes(self) -> int:
        """Bytes the last decision left to copy, for benchmarks and tests."""
        return self._records.copied_nbytes

    @property
    def reused_nbytes(self) -> int:
        """Bytes the last decision reused, for benchmarks and tests."""
        return self._records.reused_nbytes

    def reuse(self, plan: StatePlan) -> dict[int, torch.UntypedStorage]:
        """Storage index → the staged storage already holding its bytes, for every storage of
        ``plan`` (described with ``track_versions``) that did not change; marks them reused in
        ``plan.table``."""
        reused = self.unchanged(plan)
        if reused and os.environ.get(CHECK_ENV, "") not in ("", "0"):
            _check_unchanged(plan.table, reused)
        if reused:
            plan.table = plan.table.reusing(list(reused))
        return reused

    def unchanged(self, plan: StatePlan) -> dict[int, Any]:
        """Storage index → what :meth:`remember` recorded for it (the staged storage, or its index
        in the remembered stage), for every storage of ``plan`` (described with
        ``track_versions``) that is the same object at the same address with the same size and
        versions as then, none of whose recorded tensors was replaced by another while alive.
        Changes nothing but the byte counters."""
        return self._records.unchanged(plan.table)

    def remember(self, plan: StatePlan, staged_tensors: list[Any] | None = None) -> None:
        """Records the storages of ``plan`` for the next stage, and for each where its bytes are
        now: the staged storage (from ``staged_tensors``, table order) or, without them, its own
        index in ``plan`` (the index a holder of this stage's copy knows it by); forgets
        everything else."""
        self._records.remember(plan.table, staged_tensors)
        # The plan is spent: its source tensors must not outlive it through whoever still holds
        # the plan (a sender's message), or a fresh alias of the same tensor at the next stage
        # would look like a replacement of a live one and be copied again.
        plan.leaves = []

    def forget(self) -> None:
        """Drops every record (and the staged bytes they keep alive)."""
        self._records.forget()


def _check_unchanged(table: Any, reused: dict[int, torch.UntypedStorage]) -> None:
    """The debug check: the source bytes of every reused host storage still equal the bytes
    staged before."""
    sources, devices = table.storage_objects, table.storage_devices
    for index, staged in reused.items():
        if devices[index] is not None:
            continue  # device storages would need a copy to compare: not checked
        now, before = _native.storage_crc32c(sources[index]), _native.storage_crc32c(staged)
        if now != before:
            raise StagerError(
                f"skip_unchanged: storage {index} ({table.storage_nbytes[index]} bytes) changed without a "
                f"version-counter bump (crc32c {before:08x} staged before, {now:08x} now): a write through "
                "`.data`, a NumPy view or a C extension? Copy such tensors with a fresh storage, or stage "
                "without skip_unchanged."
            )
