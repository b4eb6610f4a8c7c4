"""Replication: each rank's state_dict held, in memory and on disk, by a partner rank.

:class:`ReplicationStager` is a drop-in for PyTorch's ``_ReplicationStager``: ``stage(sd)`` swaps
``sd`` with a partner over the process group and returns the partner's state_dict (the input itself
when no process group is initialized). It differs in what PyTorch leaves out:

* every world size ≥ 2: ``topology="pairs"`` exchanges with ``(rank + world // 2) % world`` for
  even sizes; odd sizes (or ``topology="ring"``) send to ``(rank + 1) % n`` and receive from
  ``(rank - 1) % n``;
* the exchange is full duplex and bucketed (:class:`stager.transport.PGTransport`);
* the received replica is persisted as ``rank_{rank}_replica_partner_{partner}.<ext>`` in
  ``storage_dir`` with stager's durable writer (``persist_format="stager"``: a checksummed,
  safetensors-compatible ``.stager`` file that :func:`stager.load` reads, see
  :mod:`stager.files`), each storage written as soon as it has been received, or with ``torch.save`` (``persist_format="torch"``, PyTorch's ``.pt``);
  either way atomically and durably (temp file ending ``.tmp`` → fsync → rename → directory
  fsync) before ``stage()`` returns, replacing the previous replica; ``persist_format=None``
  keeps it in memory only;
* success is acknowledged end to end: ``stage()`` returns once this rank persisted its source's
  replica *and* its destination confirmed it persisted this rank's;
* a partner that dies or stalls raises :class:`~stager.StagerError` naming it within the timeout;
  the temp file is removed and the previous replica stays intact.

:func:`find_replicas` lists the replicas in a directory and :func:`recover` loads the newest replica
of a given rank, so a restarted rank can restore from what its partner persisted.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import AsyncStager

from . import _native, files, tree
from ._native import StagerError
from .transport import PGTransport, _as_timedelta

__all__ = ["Replica", "ReplicationStager", "find_replicas", "recover"]

#: File extension per ``persist_format``.
EXTENSIONS = {"stager": ".stager", "torch": ".pt"}
_NAME = re.compile(r"^rank_(\d+)_replica_partner_(\d+)\.(stager|pt)$")


@dataclass(frozen=True)
class Replica:
    """A replica file: ``rank`` holds it, it is the state_dict of ``partner``."""

    rank: int
    partner: int
    path: str
    nbytes: int
    mtime: float
    format: str


def replica_path(storage_dir: str, rank: int, partner: int, persist_format: str) -> str:
    return os.path.join(storage_dir, f"rank_{rank}_replica_partner_{partner}{EXTENSIONS[persist_format]}")


def find_replicas(storage_dir: str | os.PathLike) -> list[Replica]:
    """Every replica file in ``storage_dir``, newest first (temp files are ignored)."""
    storage_dir = os.fspath(storage_dir)
    found = []
    try:
        entries = list(os.scandir(storage_dir))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StagerError(f"cannot list replicas in {storage_dir!r}: {err}") from err
    for entry in entries:
        match = _NAME.match(entry.name)
        if not match or not entry.is_file():
            continue
        stat = entry.stat()
        fmt = "stager" if match.group(3) == "stager" else "torch"
        found.append((stat.st_mtime_ns, entry.name,
                      Replica(int(match.group(1)), int(match.group(2)), entry.path, stat.st_size,
                              stat.st_mtime, fmt)))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [replica for _, _, replica in found]


def recover(storage_dir: str | os.PathLike, rank: int) -> Any:
    """The state_dict of ``rank`` from the newest replica of it in ``storage_dir``."""
    candidates = [r for r in find_replicas(storage_dir) if r.partner == rank]
    if not candidates:
        raise StagerError(f"no replica of rank {rank} in {os.fspath(storage_dir)!r}")
    return load_replica(candidates[0].path)


def load_replica(path: str) -> Any:
    """Loads one replica file (either format)."""
    if path.endswith(".pt"):
        try:
            with open(path, "rb") as f:  # a file object: never routed to another reader
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:
            raise StagerError(f"cannot load replica {path!r} with torch.load(weights_only=True): {err}") from err
    return files.load(path)


# ---- persistence ------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final: str) -> str:
    return f"{final}.{os.getpid()}.{threading.get_ident() % 100000}.tmp"


class _StreamingReplica:
    """Writes a received replica with stager's durable writer *while its bytes arrive*.

    The writer (``_native.write_file``, the one behind :func:`stager.save`) writes storage i once
    request i of a completion completes; here the requests are completed as the segments holding
    each storage are received, so the disk works during the exchange. The
    writer produces ``<final>.<pid>.recv.tmp`` (its own temp file, fsync, rename, directory
    fsync); :meth:`commit` renames that over the final name and fsyncs the directory again.
    :meth:`abort` releases the writer (it finishes writing what is in the buffer) and removes the
    file, so neither a partial nor a stale replica is left and the previous one stays."""

    _ABORT_WAIT_S = 5.0

    def __init__(self, path: str, incoming: Any) -> None:
        plan, meta = incoming.plan, incoming.meta
        self.path = path
        self.incoming_path = f"{path}.{os.getpid()}.recv.tmp"
        names = tree.tensor_names(meta, len(plan.table))
        metadata = files.header_metadata(meta)
        nbytes = plan.table.storage_nbytes
        self.buffer = incoming.buffer  # the writer reads it until it returns
        self.job = _native.Completion(len(nbytes))
        for index, size in enumerate(nbytes):
            if not size:
                self.job.mark_complete(index)
        self.error: BaseException | None = None
        buffer = incoming.buffer if isinstance(incoming.buffer, _native.HostBuffer) else None

        def write() -> None:
            try:
                _native.write_file(self.incoming_path, plan.table, names, metadata, buffer, self.job)
            except BaseException as err:  # reported by commit()
                self.error = err

        self.thread = threading.Thread(target=write, name="stager-replica-writer", daemon=True)
        self.thread.start()

    def received(self, incoming: Any, index: int) -> None:
        """Segment ``index`` has landed: release the storages it completes to the writer."""
        segment = incoming.segments[index]
        if segment.direct:
            storage = incoming.plan.storages[segment.first]
            if segment.end == storage.offset + storage.nbytes:
                self.job.mark_complete(segment.first)
        else:
            for storage_index in range(segment.first, segment.last):
                self.job.mark_complete(storage_index)

    def commit(self) -> None:
        self.thread.join()
        if self.error is not None:
            self._remove()
            if isinstance(self.error, StagerError):
                raise self.error
            raise StagerError(f"cannot persist replica {self.path!r}: {self.error}") from self.error
        try:
            os.rename(self.incoming_path, self.path)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as err:
            self._remove()
            raise StagerError(f"cannot persist replica {self.path!r}: {err}") from err

    def abort(self) -> None:
        self.job.fail("the replica was not received completely")  # the writer stops and cleans up
        self.thread.join(self._ABORT_WAIT_S)
        if not self.thread.is_alive():
            self._remove()
            return

        def finish() -> None:  # a large remainder: don't make the caller wait for the disk
            self.thread.join()
            self._remove()

        threading.Thread(target=finish, name="stager-replica-abort", daemon=True).start()

    def _remove(self) -> None:
        try:
            os.unlink(self.incoming_path)
        except FileNotFoundError:
            pass


def durable_torch_save(state_dict: Any, path: str) -> None:
    """``torch.save`` into a temp file → fsync → rename → directory fsync (PyTorch's ``.pt``)."""
    temp = _temp_path(path)
    try:
        with open(temp, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as err:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise StagerError(f"cannot persist replica {path!r}: {err}") from err
        raise


# ---- the stager ---------------------------------------------------------------------------------


class ReplicationStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging._ReplicationStager``.

    ``stage(state_dict)`` sends ``state_dict`` to this rank's partner, receives the partner's,
    persists it (see ``persist_format``) and returns it; without an initialized process group it
    returns ``state_dict`` itself. The order of operations: plan → post every receive and send
    (full duplex) → write each received storage to a temp file as it lands → fsync → rename →
    directory fsync → acknowledge to the source → wait for the destination's acknowledgement → return. So a
    successful ``stage()`` means both: this rank holds its source's replica durably, and its
    destination holds this rank's. ``should_synchronize_after_execute`` is False, like PyTorch's.

    Args:
        pg: process group (default: the default group at stage time).
        timeout: bound on every wait; a partner that doesn't make progress within it raises
            :class:`~stager.StagerError` naming it.
        device: device of the wire tensors (CPU for gloo).
        storage_dir: where replicas are persisted (default: a new temp directory, like PyTorch).
        topology: ``"pairs"`` (PyTorch's partner; a ring for odd world sizes) or ``"ring"``.
        persist_format: ``"stager"`` (``.stager``, :func:`stager.save`'s format, written while
            the bytes arrive), ``"torch"``
            (``.pt`` via ``torch.save``) or None (not persisted).

    Thread Safety:
        One ``stage()`` at a time; every rank of the group must call it the same number of times.
    """

    _synchronize_after_execute: bool = False

    def __init__(self, pg: Any = None, timeout: timedelta = timedelta(minutes=30), device: Any = "cpu",
                 storage_dir: str | None = None, *, topology: str = "pairs",
                 persist_format: str | None = "stager") -> None:
        if topology not in ("pairs", "ring"):
            raise StagerError(f"topology must be 'pairs' or 'ring', got {topology!r}")
        if persist_format is not None and persist_format not in EXTENSIONS:
            raise StagerError(f"persist_format must be 'stager', 'torch' or None, got {persist_format!r}")
        self._pg = pg
        self._timeout = _as_timedelta(timeout)
        self._device = torch.device(device)
        self._topology = topology
        self._persist_format = persist_format
        if storage_dir is None:
            storage_dir = tempfile.mkdtemp(prefix="replication_stager_")
        self._storage_dir = os.fspath(storage_dir)
        os.makedirs(self._storage_dir, exist_ok=True)
        self._transport: PGTransport | None = None

    @property
    def storage_dir(self) -> str:
        return self._storage_dir

    def peers(self, rank: int, world_size: int) -> tuple[int, int]:
        """``(destination, source)`` of ``rank``: where its state_dict goes, whose it receives."""
        if self._topology == "pairs" and world_size % 2 == 0:
            partner = (rank + world_size // 2) % world_size
            return partner, partner
        return (rank + 1) % world_size, (rank - 1) % world_size

    def stage(self, state_dict: Any) -> Any:
        """Replicates ``state_dict`` to the partner and returns the partner's state_dict."""
        if not dist.is_initialized():
            return state_dict
        pg = self._pg if self._pg is not None else dist.distributed_c10d._get_default_group()
        rank, world_size = pg.rank(), pg.size()
        if world_size < 2:
            return state_dict  # nobody to replicate to
        if self._transport is None or self._transport._pg is not pg:
            self._transport = PGTransport(pg, self._timeout, self._device)
        dst, src = self.peers(rank, world_size)
        fmt = self._persist_format
        path = replica_path(self._storage_dir, rank, src, fmt) if fmt else None

        transport = self._transport
        streaming = fmt == "stager"
        writer: list[_StreamingReplica] = []

        def on_metadata(incoming: Any) -> None:
            if not incoming.targets:  # (always: no in-place receive here)
                writer.append(_StreamingReplica(path, incoming))

        def on_segment(incoming: Any, index: int) -> None:
            if writer:
                writer[0].received(incoming, index)

        def persist(received: Any) -> None:
            # Runs once every byte has arrived, before the source is told it is safe.
            if writer:
                writer.pop().commit()
            elif fmt == "stager":
                files.save(received, path)
            elif fmt == "torch":
                durable_torch_save(received, path)

        try:
            return transport.exchange(dst, state_dict, src, confirm=persist,
                                      on_metadata=on_metadata if streaming else None,
                                      on_segment=on_segment if streaming else None)
        except BaseException:
            for w in writer:
                w.abort()
            raise

    def synchronize_staging(self) -> None:
        """No-op: staging is blocking."""

    def close(self) -> None:
        """Nothing to release; persisted replicas are left for discovery."""
