"""Replica copies in named shared memory: ``ReplicationStager(survive_restart=True)``.

A copy that must outlive its process (torchrun restarts every worker after any failure) lives in
a *segment*: a file in ``/dev/shm`` (or ``$STAGER_SHM_DIR``) whose data region is the pool buffer
the copy was received or staged into (``rust/shm.rs``), so keeping it costs no second copy. A
fresh process given the same ``storage_dir`` finds it again by name:

``stager-{job}-h{holder}-o{owner}-s{step}.seg``

``job`` is a hash of the absolute ``storage_dir`` (two jobs with different directories never see
each other's segments), ``holder`` the rank that holds it, ``owner`` the rank whose state_dict
it is and ``step`` its generation. A segment records what a copy file records (owner, holder,
world size, step) plus the tree of its state_dict and the layout of its storages, and one
crc32c per storage. It is written as ``<name>.<pid>.tmp`` and becomes visible by a rename once
complete (:meth:`SegmentCopy.publish`).

Lifecycle: the holder keeps at most two generations per (holder, owner); older ones are removed
once the newer step is committed on every rank (:func:`prune`). A process holds a lock on every
segment it maps; :func:`release_shared_memory` (``stager release-shm DIR``) removes every
segment of a directory that no other live process holds and returns the bytes freed. Segments
live in RAM: a reboot removes them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from . import _native, tree
from ._native import StagerError
from .plan import StatePlan, gc_paused

__all__ = ["SHM_DIR_ENV", "Segment", "SegmentCopy", "find_segments", "is_segment", "load_segment",
           "release_shared_memory", "shm_dir"]

#: Environment variable naming the shared-memory directory (default ``/dev/shm``).
SHM_DIR_ENV = "STAGER_SHM_DIR"
#: ``format`` field of a segment's record.
FORMAT = "stager-shm"
_NAME = re.compile(r"^stager-([0-9a-f]{16})-h(\d+)-o(\d+)-s(\d+)\.seg$")
_TEMP = re.compile(r"^stager-([0-9a-f]{16})-h(\d+)-o(\d+)-s(\d+)\.seg\.(\d+)\.tmp$")


def shm_dir() -> str:
    """Where segments live: ``$STAGER_SHM_DIR``, else ``/dev/shm``."""
    return os.environ.get(SHM_DIR_ENV) or "/dev/shm"


def job_key(storage_dir: str | os.PathLike) -> str:
    """The part of a segment's name that comes from ``storage_dir``."""
    absolute = os.path.abspath(os.fspath(storage_dir))
    return hashlib.sha256(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def segment_path(storage_dir: str | os.PathLike, holder: int, owner: int, step: int) -> str:
    return os.path.join(shm_dir(), f"stager-{job_key(storage_dir)}-h{holder}-o{owner}-s{step}.seg")


@dataclass(frozen=True)
class Segment:
    """A published segment of a ``storage_dir``: ``holder`` holds it, it is ``owner``'s state at
    ``step``; ``nbytes`` is its size in shared memory."""

    path: str
    holder: int
    owner: int
    step: int
    nbytes: int
    mtime: float


def find_segments(storage_dir: str | os.PathLike, *, temps: bool = False) -> list[Segment]:
    """The published segments of ``storage_dir`` (with ``temps``: also segments being written, or
    left by killed writers), newest step first. Names only: nothing is opened."""
    key = job_key(storage_dir)
    directory = shm_dir()
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StagerError(f"cannot list shared-memory segments in {directory!r}: {err}") from err
    found = []
    for entry in entries:
        match = _NAME.match(entry.name) or (_TEMP.match(entry.name) if temps else None)
        if match is None or match.group(1) != key:
            continue
        try:
            stat = entry.stat()
        except OSError:
            continue  # removed meanwhile
        found.append(Segment(entry.path, int(match.group(2)), int(match.group(3)), int(match.group(4)),
                             stat.st_blocks * 512, stat.st_mtime))
    found.sort(key=lambda s: (s.step, s.mtime, s.path), reverse=True)
    return found


def read_segment_record(path: str) -> dict[str, Any]:
    """The record of a published segment (header and record checksums checked, data not read);
    StagerError when it is not a readable segment."""
    return _parse_record(path, _native.segment_record(path))


def _parse_record(path: str, raw: bytes) -> dict[str, Any]:
    try:
        with gc_paused():
            record = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise StagerError(f"invalid segment {path}: its record is not JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise StagerError(f"invalid segment {path}: not a {FORMAT} record")
    try:
        for key in ("owner", "holder", "world_size", "step"):
            if type(record[key]) is not int or record[key] < 0:
                raise KeyError(key)
    except KeyError as err:
        raise StagerError(f"invalid segment {path}: its record has no valid {err}") from None
    if record["world_size"] < 1 or record["owner"] >= record["world_size"]:
        raise StagerError(f"invalid segment {path}: owner {record['owner']} outside its world of "
                          f"{record['world_size']}")
    return record


class SegmentCopy:
    """One copy this rank keeps in shared memory in a stage: its writer (the buffer the bytes go
    to) and, once published, the lock-holding buffer that keeps it alive in this process."""

    def __init__(self, storage_dir: str, holder: int, owner: int, step: int, plan: StatePlan, meta: dict,
                 record: dict[str, int], *, pinned: bool = False, recycle: str | None = None) -> None:
        self.owner, self.step = owner, step
        self.path = segment_path(storage_dir, holder, owner, step)
        table = plan.table
        self.storages = [[int(offset), int(nbytes)] for offset, nbytes in zip(table.storage_offsets,
                                                                                   table.storage_nbytes)]
        self.record = {"format": FORMAT, "storage_dir": os.path.abspath(storage_dir), **record,
                       "nbytes": int(plan.total_nbytes), "storages": self.storages, "tree": meta}
        # ``recycle``: an older generation's file, reused when nobody maps it (no new memory).
        self.writer = _native.SegmentWriter(self.path, plan.total_nbytes, pinned=pinned, recycle=recycle)
        self.buffer = self.writer.buffer
        self.published = False

    def publish(self) -> None:
        """Checksums every storage, writes the record and makes the segment visible."""
        record = json.dumps(self.record, separators=(",", ":"), allow_nan=False).encode()
        self.writer.publish(record, [(offset, nbytes) for offset, nbytes in self.storages])
        self.published = True

    def abort(self) -> None:
        """Drops the segment: the temp file, or the published one (a failed stage)."""
        if self.published:
            _native.remove_segment(self.path)
        else:
            self.writer.abort()


def load_segment(path: str, *, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """``(state_dict, record)`` of a published segment, its tensors viewing the segment's data
    mapped copy-on-write (no copy; writing to them never changes the segment). Every checksum is
    checked first when ``verify``; a damaged, truncated or foreign segment raises StagerError."""
    segment = _native.open_segment(path)
    record = _parse_record(path, segment.record)
    buffer = segment.buffer
    meta = record.get("tree")
    try:
        plan = tree.decode(meta, max_nbytes=buffer.nbytes)
    except StagerError as err:
        raise StagerError(f"invalid segment {path}: {err}") from None
    except (RecursionError, TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as err:
        raise StagerError(f"invalid segment {path}: malformed tree ({type(err).__name__}: {err})") from None
    table = plan.table
    layout = [[int(o), int(n)] for o, n in zip(table.storage_offsets, table.storage_nbytes)]
    if layout != record.get("storages") or plan.total_nbytes != buffer.nbytes or segment.nranges != len(layout):
        raise StagerError(f"invalid segment {path}: its tree does not describe its {buffer.nbytes} data bytes")
    if verify:
        segment.verify()
    try:
        return plan.materialize(buffer), record
    except StagerError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:
        raise StagerError(f"invalid segment {path}: cannot rebuild its tensors: {err}") from None


def prune(storage_dir: str, holder: int, owner: int, keep: set[int]) -> None:
    """Removes the published segments of (holder, owner) whose step is not in ``keep`` (unless
    another live process holds one)."""
    for segment in find_segments(storage_dir):
        if segment.holder == holder and segment.owner == owner and segment.step not in keep:
            _native.remove_segment(segment.path)


def sweep_temps(storage_dir: str, holder: int) -> None:
    """Removes ``holder``'s segment temp files that no live process is writing."""
    for segment in find_segments(storage_dir, temps=True):
        if segment.holder == holder and segment.path.endswith(".tmp"):
            try:
                _native.remove_segment(segment.path)
            except StagerError:
                pass


def release_shared_memory(storage_dir: str | os.PathLike) -> int:
    """Removes every shared-memory segment of ``storage_dir`` (published or half-written) that no
    other live process holds, and returns the bytes freed. Segments this process holds (a
    ReplicationStager still open in it) are removed too: their memory goes once the process
    drops them. Call it once the job is done (e.g. on rank 0 of each node, after the last
    ``stage()``); a reboot removes segments anyway."""
    freed = 0
    for segment in find_segments(storage_dir, temps=True):
        result = _native.remove_segment(segment.path)
        if result:
            freed += result
    return freed


def is_segment(path: str) -> bool:
    """Whether ``path`` starts like a segment (its magic)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"STGSHM01"
    except OSError:
        return False


def inspect_command(path: str, *, verify: bool = False) -> int:
    """``stager inspect SEGMENT`` (and ``stager verify SEGMENT`` with ``verify``): its record,
    tensors and whether it is in use; returns the exit code."""
    import sys

    try:
        state_dict, record = load_segment(path, verify=verify)
        in_use = _native.segment_in_use(path)
    except StagerError as err:
        print(f"stager {'verify' if verify else 'inspect'}: {path}: {'DAMAGED: ' if verify else ''}{err}",
              file=sys.stderr)
        return 1
    if verify:
        print(f"{path}: OK ({len(record['storages'])} buffers, {record['nbytes']} bytes, all crc32c checksums match)")
        return 0
    print(f"{path}: stager shared-memory segment, {record['nbytes']} bytes of data")
    print(f"  storage_dir: {record['storage_dir']}")
    print(f"  owner {record['owner']}, holder {record['holder']}, world_size {record['world_size']}, "
          f"step {record['step']}; {'in use by a live process' if in_use else 'not in use'}")
    print()
    print("tensors (key  dtype  shape):")
    for key, value in tree.tensors_by_path(state_dict).items():
        print(f"  {tree.dotted(key)}  {str(value.dtype).removeprefix('torch.')}  {list(value.shape)}")
    return 0


def stage_into_segment(state_dict: Any, storage_dir: str, holder: int, owner: int, step: int,
                       record: dict[str, int], *, pinned: bool = False,
                       recycle: str | None = None) -> tuple[SegmentCopy, Any]:
    """Stages ``state_dict`` (CPU or device tensors) straight into a new segment with the copy
    engine; returns ``(copy, staged state_dict over the segment)`` once every byte landed. The
    segment is not published yet."""
    from . import engine
    from .device import start_device_copies
    from .options import default_num_threads
    from .plan import plan_state_dict

    plan = plan_state_dict(state_dict)
    with gc_paused():
        meta = tree.encode(plan)
    # Device copies land faster in page-locked memory (a no-op without CUDA).
    copy = SegmentCopy(storage_dir, holder, owner, step, plan, meta, record,
                       pinned=pinned or bool(plan.device_storages), recycle=recycle)
    try:
        completion = _native.Completion(len(plan.table.storage_nbytes))
        engine.copy_engine(default_num_threads()).submit_table(copy.buffer, plan.table, completion)
        start_device_copies(plan, copy.buffer, completion, True)
        completion.wait()
        return copy, plan.materialize(copy.buffer)
    except BaseException:
        copy.abort()
        raise
