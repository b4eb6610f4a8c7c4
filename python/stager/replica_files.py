"""Replica files on disk: their names, the record each carries (owner, holder, world size, step,
sending id), finding them in a directory, loading one, and writing one durably: whole
(:func:`_write_copy`) or as its bytes arrive (:class:`StreamingReplica`).

Both sides of recovery use this room: :mod:`stager.replication` writes copies (its own and its
partners') and :mod:`stager.recovery` reads them back after a failure. A copy is a stager file
(``.stager``, the record in its ``__metadata__``) or a ``torch.save`` archive (``.pt``, the record
as an extra zip entry torch.load ignores). ``<name>.previous.<ext>`` is the generation before the
newest; temp files follow the rules of :mod:`stager.files` and are swept by the next stage.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from . import _native, files, tree
from ._native import StagerError
from .files import durable_torch_save, header_metadata

__all__ = ["Replica", "find_replicas", "load_replica", "read_record", "recover", "replica_path"]

#: File extension per ``persist_format``.
EXTENSIONS = {"stager": ".stager", "torch": ".pt"}
#: Inserted before the extension of the kept previous generation.
PREVIOUS = ".previous"
_NAME = re.compile(r"^rank_(\d+)_replica_partner_(\d+)(\.previous)?\.(stager|pt)$")
#: Temp files of replication: ``<copy name>.<pid>.<anything>.tmp``.
_TEMP = re.compile(r"^rank_(\d+)_replica_partner_\d+(?:\.previous)?\.(?:stager|pt)\.(\d+)\..*\.tmp$")

#: Header metadata keys of a ``.stager`` copy (values are decimal strings).
META_OWNER = "stager.replica.owner"
META_HOLDER = "stager.replica.holder"
META_WORLD = "stager.replica.world_size"
META_STEP = "stager.replica.step"
#: The id of the sending a copy came from (incremental replication: see the module doc).
META_SENDING = "stager.replica.sending"
#: The record inside a ``.pt`` copy's zip archive (JSON with the same fields).
TORCH_RECORD = "stager_replica.json"


@dataclass(frozen=True)
class Replica:
    """A copy file: ``rank`` holds it, it is the state_dict of ``partner`` (its ``owner``) at
    ``step`` in a world of ``world_size`` ranks (None for files that don't record them);
    ``previous`` marks the kept previous generation. ``format`` is ``"stager"``, ``"torch"``, or
    ``"shm"`` for a copy in named shared memory (``survive_restart``; ``path`` is the segment)."""

    rank: int
    partner: int
    path: str
    nbytes: int
    mtime: float
    format: str
    step: int | None = None
    world_size: int | None = None
    previous: bool = False

    @property
    def owner(self) -> int:
        return self.partner

    @property
    def holder(self) -> int:
        return self.rank


def replica_path(storage_dir: str, rank: int, partner: int, persist_format: str, previous: bool = False) -> str:
    """Where ``rank`` keeps its copy of ``partner``'s state_dict (see the module doc)."""
    suffix = PREVIOUS if previous else ""
    return os.path.join(storage_dir, f"rank_{rank}_replica_partner_{partner}{suffix}{EXTENSIONS[persist_format]}")


def _pending_path(final: str) -> str:
    return f"{final}.{os.getpid()}.pending.tmp"


def _record(owner: int, holder: int, world_size: int, step: int, sending: int = 0) -> dict[str, int]:
    record = {"owner": owner, "holder": holder, "world_size": world_size, "step": step}
    if sending:
        record["sending"] = sending
    return record


def _metadata(record: dict[str, int]) -> dict[str, str]:
    metadata = {META_OWNER: str(record["owner"]), META_HOLDER: str(record["holder"]),
                META_WORLD: str(record["world_size"]), META_STEP: str(record["step"])}
    if record.get("sending"):
        metadata[META_SENDING] = str(record["sending"])
    return metadata


def _sending_of(path: str) -> int | None:
    """The sending id a copy file records (None when it records none); StagerError when the file
    can't be opened as its format."""
    if path.endswith(".pt"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("/" + TORCH_RECORD)]
                raw = json.loads(archive.read(names[0])).get("sending") if names else None
        except (OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError) as err:
            raise StagerError(f"cannot read the replica record of {path!r}: {err}") from err
    else:
        raw = _native.CheckpointFile(path).metadata.get(META_SENDING)
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def read_record(path: str) -> dict[str, int] | None:
    """The owner/holder/world_size/step a copy file records, None when it records none; raises
    StagerError when the file can't be opened as its format."""
    if path.endswith(".pt"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("/" + TORCH_RECORD)]
                if not names:
                    return None
                raw = json.loads(archive.read(names[0]))
        except (OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
            raise StagerError(f"cannot read the replica record of {path!r}: {err}") from err
    else:
        metadata = _native.CheckpointFile(path).metadata
        if META_STEP not in metadata:
            return None
        raw = {"owner": metadata.get(META_OWNER), "holder": metadata.get(META_HOLDER),
               "world_size": metadata.get(META_WORLD), "step": metadata.get(META_STEP)}
    try:
        record = {key: int(raw[key]) for key in ("owner", "holder", "world_size", "step")}
    except (KeyError, TypeError, ValueError) as err:
        raise StagerError(f"invalid replica record in {path!r}: {raw!r}") from err
    if record["step"] < 0 or record["world_size"] < 1 or not 0 <= record["owner"] < record["world_size"]:
        raise StagerError(f"invalid replica record in {path!r}: {raw!r}")
    return record


def _scan(storage_dir: str) -> list[tuple[Any, re.Match]]:
    try:
        entries = list(os.scandir(storage_dir))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StagerError(f"cannot list replicas in {storage_dir!r}: {err}") from err
    found = []
    for entry in entries:
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((entry, match))
    return found


def find_replicas(storage_dir: str | os.PathLike) -> list[Replica]:
    """Every copy file in ``storage_dir`` and every shared-memory segment of it (format
    ``"shm"``), newest first: by recorded step (files without one last), then modification time.
    Temp files are ignored; a file whose record can't be read is listed with ``step=None``."""
    from . import segments

    storage_dir = os.fspath(storage_dir)
    found = []
    listed = segments.find_segments(storage_dir)
    newest: dict[tuple[int, int], int] = {}  # (holder, owner) → the newest step
    for segment in listed:
        key = (segment.holder, segment.owner)
        newest[key] = max(newest.get(key, segment.step), segment.step)
    for segment in listed:
        try:
            record = segments.read_segment_record(segment.path)
        except StagerError:
            record = None
        world = record["world_size"] if record else None
        replica = Replica(segment.holder, segment.owner, segment.path, segment.nbytes, segment.mtime, "shm",
                          segment.step, world, segment.step < newest[(segment.holder, segment.owner)])
        found.append(((True, segment.step, int(segment.mtime * 1e9), os.path.basename(segment.path)), replica))
    for entry, match in _scan(storage_dir):
        stat = entry.stat()
        fmt = "stager" if match.group(4) == "stager" else "torch"
        try:
            record = read_record(entry.path)
        except StagerError:
            record = None
        step = record["step"] if record else None
        world = record["world_size"] if record else None
        replica = Replica(int(match.group(1)), int(match.group(2)), entry.path, stat.st_size, stat.st_mtime, fmt,
                          step, world, match.group(3) is not None)
        found.append(((step is not None, step or 0, stat.st_mtime_ns, entry.name), replica))
    found.sort(key=lambda item: item[0], reverse=True)
    return [replica for _, replica in found]


def recover(storage_dir: str | os.PathLike, rank: int) -> Any:
    """The state_dict of ``rank`` from the newest intact copy of it in ``storage_dir`` (an older
    one when the newest fails its checksums); StagerError when there is none."""
    candidates = [r for r in find_replicas(storage_dir) if r.partner == rank]
    if not candidates:
        raise StagerError(f"no replica of rank {rank} in {os.fspath(storage_dir)!r}")
    failures = []
    for replica in candidates:
        try:
            return load_replica(replica.path)
        except StagerError as err:
            failures.append(str(err))
    raise StagerError(f"no intact replica of rank {rank} in {os.fspath(storage_dir)!r}: " + "; ".join(failures))


def load_replica(path: str, *, verify: bool = True) -> Any:
    """Loads one copy file (either format) or shared-memory segment, checking its checksums first
    when ``verify``."""
    if path.endswith(".seg"):
        from . import segments

        return segments.load_segment(path, verify=verify)[0]
    if path.endswith(".pt"):
        try:
            if verify:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise StagerError(f"replica {path!r} is damaged: record {bad!r} fails its crc32 checksum")
            with open(path, "rb") as f:  # a file object: never routed to another reader
                return torch.load(f, map_location="cpu", weights_only=True)
        except StagerError:
            raise
        except Exception as err:
            raise StagerError(f"cannot load replica {path!r} with torch.load(weights_only=True): {err}") from err
    return files.load(path, verify=verify)


# ---- persistence ---------------------------------------------------------------------------------


class StreamingReplica:
    """Writes a received replica with stager's durable writer *while its bytes arrive*.

    The writer (``_native.write_file``, the one behind :func:`save`) writes storage i once
    request i of a completion completes; here the requests are completed as each storage
    lands (the incoming side's :meth:`~stager.transport.Incoming.on_storage_landed` hook), so
    the disk works during the exchange. It writes straight into the commit's temp file (``<final>.<pid>.<n>.stager.tmp``)
    and fsyncs it, but does not rename it: :meth:`commit`, called once the exchange succeeded,
    renames it over the final name and fsyncs the directory. :meth:`abort` releases the writer
    and removes the temp file, so neither a partial nor a stale replica is left and the previous
    one stays. ``metadata``: extra header strings (the replica record)."""

    _ABORT_WAIT_S = 5.0

    def __init__(self, path: str, incoming: Any, metadata: dict[str, str] | None = None) -> None:
        plan, meta = incoming.plan, incoming.meta
        self.path = path
        names = tree.tensor_names(meta, len(plan.table))
        metadata = {**(metadata or {}), **header_metadata(meta)}  # reserved keys win
        nbytes = plan.table.storage_nbytes
        buffer = incoming.buffer if isinstance(incoming.buffer, _native.HostBuffer) else None
        self.buffer = incoming.buffer  # the writer reads it until it returns
        self.job = _native.Completion(len(nbytes))
        for index, size in enumerate(nbytes):
            if not size:
                self.job.mark_complete(index)
        self.error: BaseException | None = None
        self.file: Any = None  # the written, uncommitted _native.AtomicFile
        self._aborted = False

        def write() -> None:
            try:
                file = _native.write_file(path, plan.table, names, metadata, buffer, self.job, commit=False)
            except BaseException as err:  # reported by commit(), in the caller's thread
                self.error = err
                return
            if self._aborted:
                file.abort()
            else:
                self.file = file

        self.thread = threading.Thread(target=write, name="stager-replica-writer", daemon=True)
        self.thread.start()
        incoming.on_storage_landed(self._landed)

    def _landed(self, storage_index: int) -> None:
        """All the bytes of storage ``storage_index`` are in the buffer: the writer may take it."""
        self.job.mark_complete(storage_index)

    def commit(self) -> None:
        """Waits for the writer, then renames the replica over its final name."""
        self.thread.join()
        if self.error is not None:
            if isinstance(self.error, StagerError):
                raise self.error
            raise StagerError(f"cannot persist replica {self.path!r}: {self.error}") from self.error
        self.file.commit()

    def abort(self) -> None:
        """Drops the replica being written; the previous one stays. Doesn't wait for the disk."""
        self._aborted = True
        self.job.fail("the replica was not received completely")  # the writer stops, removes its temp
        self.thread.join(self._ABORT_WAIT_S)
        if not self.thread.is_alive() and self.file is not None:
            self.file.abort()  # (a writer still running aborts its own file when it returns)



def _append_torch_record(path: str, record: dict[str, int]) -> None:
    """Adds the replica record to a ``.pt`` zip archive (torch.load ignores unknown records) and
    fsyncs it."""
    try:
        with open(path, "r+b") as f:
            with zipfile.ZipFile(f, "a") as archive:
                prefix = archive.namelist()[0].split("/")[0]
                archive.writestr(f"{prefix}/{TORCH_RECORD}", json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
    except (OSError, zipfile.BadZipFile, IndexError) as err:
        raise StagerError(f"cannot record the replica metadata in {path!r}: {err}") from err


def _write_copy(state_dict: Any, pending: str, persist_format: str, record: dict[str, int]) -> None:
    """Writes a whole state_dict durably as ``pending`` (the own copy; replicas that arrive over
    the wire stream through StreamingReplica instead)."""
    if persist_format == "stager":
        files.save(state_dict, pending, metadata=_metadata(record))
    else:
        durable_torch_save(state_dict, pending)
        _append_torch_record(pending, record)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # a stale temp file is swept by the next stage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
