"""Replication: each rank's state_dict held, in memory and on disk, by a partner rank.

:class:`ReplicationStager` is a drop-in for PyTorch's ``_ReplicationStager``: ``stage(sd)`` swaps
``sd`` with a partner over the process group and returns the partner's state_dict (the input itself
when no process group is initialized). It differs in what PyTorch leaves out:

* every world size ≥ 2: ``topology="pairs"`` exchanges with ``(rank + world // 2) % world`` for
  even sizes; odd sizes (or ``topology="ring"``) send to ``(rank + 1) % n`` and receive from
  ``(rank - 1) % n``;
* the exchange is full duplex and bucketed (:class:`stager.transport.PGTransport`);
* the received replica is persisted as ``rank_{rank}_replica_partner_{partner}.<ext>`` in
  ``storage_dir`` **as its bytes arrive** (``persist_format="stager"``), or with ``torch.save``
  after the exchange (``persist_format="torch"``, PyTorch's ``.pt``); either way atomically and
  durably (temp file ending ``.tmp`` → fsync → rename → directory fsync) before ``stage()``
  returns, replacing the previous replica; ``persist_format=None`` keeps it in memory only;
* a partner that dies or stalls raises :class:`~stager.StagerError` naming it within the timeout;
  the temp file is removed and the previous replica stays intact.

:func:`find_replicas` lists the replicas in a directory and :func:`recover` loads the newest replica
of a given rank, so a restarted rank can restore from what its partner persisted.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import AsyncStager

from ._native import StagerError
from .tree import decode
from .transport import PGTransport, _as_timedelta

__all__ = ["Replica", "ReplicationStager", "find_replicas", "recover"]

#: File extension per ``persist_format``.
EXTENSIONS = {"stager": ".stager", "torch": ".pt"}
_NAME = re.compile(r"^rank_(\d+)_replica_partner_(\d+)\.(stager|pt)$")
_FORMAT_TAG = "stager-replica/1"
_SYNC_EVERY = 64 << 20  # the writer fdatasyncs this often, so the disk works while bytes arrive


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
    return _read_stager_replica(path)


# ---- the replica file ---------------------------------------------------------------------------
#
# A safetensors-compatible file: 8-byte little-endian header length, a JSON header, the data.
# Each storage is one U8 entry "storage.{i}" (packed, in order, no gaps); "__metadata__" carries
# the tree (stager.tree.encode) under "stager". The data layout is known from the metadata alone,
# so received segments are written at their final place as they arrive.


def _replica_header(meta: dict, sizes: list[int]) -> tuple[bytes, list[int]]:
    entries: dict[str, Any] = {"__metadata__": {"format": _FORMAT_TAG,
                                                "stager": json.dumps(meta, separators=(",", ":"))}}
    offsets = []
    position = 0
    for index, nbytes in enumerate(sizes):
        offsets.append(position)
        entries[f"storage.{index}"] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [position, position + nbytes]}
        position += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(len(header) + 8) % 64)
    return struct.pack("<Q", len(header)) + header, offsets


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final: str) -> str:
    return f"{final}.{os.getpid()}.{threading.get_ident() % 100000}.tmp"


class _ReplicaWriter:
    """Writes a replica file while its bytes arrive: header first, then each piece at its place
    (``pwritev`` on a thread, without the GIL), then fsync → rename → directory fsync."""

    def __init__(self, path: str, meta: dict, sizes: list[int]) -> None:
        self.path = path
        self.temp = _temp_path(path)
        header, offsets = _replica_header(meta, sizes)
        self.data_start = len(header)
        self.offsets = offsets
        self.error: BaseException | None = None
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        try:
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StagerError(f"cannot create replica file {self.temp!r}: {err}") from err
        try:
            total = self.data_start + sum(sizes)
            os.ftruncate(self.fd, total)
            _pwrite_all(self.fd, [memoryview(header)], 0)
        except OSError as err:
            self._cleanup()
            raise StagerError(f"cannot write replica file {self.temp!r}: {err}") from err
        self.thread = threading.Thread(target=self._run, name="stager-replica-writer", daemon=True)
        self.thread.start()

    def submit(self, pieces: list[tuple[int, int, memoryview]]) -> None:
        """Queues ``(storage index, byte offset inside it, bytes)`` pieces for writing."""
        self.queue.put([(self.data_start + self.offsets[i] + begin, view) for i, begin, view in pieces])

    def _run(self) -> None:
        unsynced = 0
        while True:
            pieces = self.queue.get()
            if pieces is None:
                return
            if self.error is not None:
                continue
            try:
                unsynced += _write_pieces(self.fd, pieces)
                if unsynced >= _SYNC_EVERY:
                    os.fdatasync(self.fd)
                    unsynced = 0
            except BaseException as err:  # reported by commit()
                self.error = err

    def commit(self) -> None:
        self.queue.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.temp, self.path)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as err:
            self._cleanup()
            raise StagerError(f"cannot persist replica {self.path!r}: {err}") from err
        except BaseException:
            self._cleanup()
            raise

    def abort(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._cleanup()

    def _cleanup(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass


_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def _write_pieces(fd: int, pieces: list[tuple[int, memoryview]]) -> int:
    """Writes (file offset, bytes) pieces, one ``pwritev`` per run of adjacent pieces."""
    written = 0
    run: list[memoryview] = []
    run_start = run_end = -1
    for offset, view in pieces:
        if not len(view):
            continue
        if run and (offset != run_end or len(run) >= _IOV_MAX):
            written += _pwrite_all(fd, run, run_start)
            run = []
        if not run:
            run_start = run_end = offset
        run.append(view)
        run_end += len(view)
    if run:
        written += _pwrite_all(fd, run, run_start)
    return written


def _pwrite_all(fd: int, views: list[memoryview], offset: int) -> int:
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        count = os.pwritev(fd, views, offset + done)
        if count <= 0:
            raise OSError("pwritev wrote nothing")
        done += count
        if done < total:  # drop what was written and go on (rare: partial writes)
            skip = count
            rest = []
            for view in views:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                rest.append(view[skip:])
                skip = 0
            views = rest
    return total


def _read_stager_replica(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise StagerError(f"replica {path!r} is truncated (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 1 << 31):
                raise StagerError(f"replica {path!r} has an invalid header length {header_len}")
            try:
                header = json.loads(f.read(header_len))
                info = header["__metadata__"]
                if info.get("format") != _FORMAT_TAG:
                    raise StagerError(f"{path!r} is not a stager replica file")
                meta = json.loads(info["stager"])
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise StagerError(f"replica {path!r} has an invalid header: {err}") from err
            data_start = 8 + header_len
            data_len = size - data_start
            plan = decode(meta, max_nbytes=data_len)
            position = 0
            for index, storage in enumerate(plan.storages):
                entry = header.get(f"storage.{index}")
                if (not isinstance(entry, dict)
                        or entry.get("data_offsets") != [position, position + storage.nbytes]):
                    raise StagerError(f"replica {path!r}: storage {index} is missing or misplaced")
                position += storage.nbytes
            if position != data_len:
                raise StagerError(f"replica {path!r} holds {data_len} data bytes, its header describes {position}")
            from ._native import HostPool

            buffer = HostPool().acquire(plan.total_nbytes) if plan.total_nbytes else bytearray(0)
            view = memoryview(buffer)
            f.seek(data_start)
            for storage in plan.storages:
                if storage.nbytes:
                    target = view[storage.offset:storage.offset + storage.nbytes]
                    got = f.readinto(target)
                    if got != storage.nbytes:
                        raise StagerError(f"replica {path!r} is truncated")
            del view
            return plan.materialize(buffer)
    except OSError as err:
        raise StagerError(f"cannot read replica {path!r}: {err}") from err


def _durable_torch_save(state_dict: Any, path: str) -> None:
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
    (full duplex) → write each received segment to the temp file as it lands → fsync → rename →
    acknowledge to the source → wait for the destination's acknowledgement → return. So a
    successful ``stage()`` means both: this rank holds its source's replica durably, and its
    destination holds this rank's. ``should_synchronize_after_execute`` is False, like PyTorch's.

    Args:
        pg: process group (default: the default group at stage time).
        timeout: bound on every wait; a partner that doesn't make progress within it raises
            :class:`~stager.StagerError` naming it.
        device: device of the wire tensors (CPU for gloo).
        storage_dir: where replicas are persisted (default: a new temp directory, like PyTorch).
        topology: ``"pairs"`` (PyTorch's partner; a ring for odd world sizes) or ``"ring"``.
        persist_format: ``"stager"`` (``.stager``, written as bytes arrive), ``"torch"``
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
        writer: list[_ReplicaWriter] = []

        def on_metadata(incoming: Any) -> None:
            writer.append(_ReplicaWriter(path, incoming.meta, [s.nbytes for s in incoming.plan.storages]))

        def on_segment(incoming: Any, index: int) -> None:
            segment = incoming.segments[index]
            storages = incoming.plan.storages
            if segment.direct:
                begin = segment.start - storages[segment.first].offset
                view = incoming.storage_view(segment.first)[begin:begin + segment.nbytes]
                pieces = [(segment.first, begin, view)]
            else:
                pieces = [(i, 0, incoming.storage_view(i)) for i in range(segment.first, segment.last)]
            writer[0].submit(pieces)

        def persist(received: Any) -> None:
            if streaming:
                writer[0].commit()
            elif fmt == "torch":
                _durable_torch_save(received, path)

        streaming = fmt == "stager"
        try:
            received = self._transport.exchange(dst, state_dict, src,
                                                on_metadata=on_metadata if streaming else None,
                                                on_segment=on_segment if streaming else None,
                                                confirm=persist)
        except BaseException:
            for w in writer:
                w.abort()
            raise
        return received

    def synchronize_staging(self) -> None:
        """No-op: staging is blocking."""

    def close(self) -> None:
        """Nothing to release; persisted replicas are left for discovery."""
