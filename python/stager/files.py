"""Checkpoint files: ``save`` (atomic, durable, checksummed), ``load`` (validated, no pickle),
the whole-copy replica writer (:func:`durable_torch_save`), and the
``stager inspect`` / ``stager verify`` commands.

A stager file is a ``.safetensors`` file (any safetensors reader opens it) whose ``__metadata__``
also carries the tree (containers, non-tensor leaves, views sharing storages) and a crc32c per
stored buffer; the layout is documented in ``docs/FORMAT.md``. Python makes one pass over the
state_dict (:func:`stager.plan.plan_state_dict`) and encodes the tree (:mod:`stager.tree`); the
bytes are written and read by the Rust core without the GIL and without a serialization copy,
with direct I/O where the filesystem supports it (``rust/direct_io.rs``).

Every file goes through one atomic commit (``rust/commit.rs``, ``_native.AtomicFile``): a temp
file ``<name>.<pid>.<n>.stager.tmp`` next to the target → write → fsync → rename over the target
→ fsync of the directory. A crash leaves the previous file or the new one; the temp files of
killed writers are swept by the next save or replica written in that directory. Only regular
files are replaced: a device, FIFO, socket or directory at ``path`` raises :class:`StagerError`;
a symlink is followed and its target replaced (in the target's directory).

Order of operations in :func:`save`:

1. plan the state_dict (one pass) and encode its tree as JSON;
2. if every storage is on the CPU and no ``stager`` is given, write straight from the tensors'
   own memory (through aligned bounce chunks: their memory is not page-aligned); otherwise
   start staging into a host buffer (the given stager's pool and copy engine, or the
   process-wide pool) and write each storage as soon as its request of the stage's completion
   has completed, the buffer going to the device as one aligned run;
3. the Rust writer names the file entries (a storage one tensor covers is stored under that
   tensor's key path), fills the temp file and the commit renames it over ``path``. On any
   error the temp file is removed and the previous file is kept.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

import torch

from . import _native, dtensor, engine, tree
from ._native import StagerError
from .errors import IO, make_error
from .options import StagingOptions
from .plan import StatePlan, gc_paused, plan_state_dict
from .stagers import StagingEngine
from .streaming import StreamedStage

__all__ = ["durable_torch_save", "inspect_command", "load", "save", "verify_command"]

#: torch dtype → safetensors dtype name: the dtypes whose tensors a file stores under their own key
#: (the map itself is the Rust writer's, rust/python/table.rs).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, attr): code for attr, code in _native.SAFETENSORS_DTYPES if hasattr(torch, attr)
}


def _staging_engine() -> StagingEngine:
    """For saves that need staging (device tensors) without a stager: the process-wide pool."""
    return StagingEngine(StagingOptions(use_shared_memory=False, use_async_staging=False),
                         pool=engine.process_pool(False))


def fsync_directory(path: str) -> None:
    """Makes the directory entries of ``path`` (a directory) durable: after a rename or unlink
    that must survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save --------------------------------------------------------------------------------------


def header_metadata(meta: dict) -> dict[str, str]:
    """The ``__metadata__`` strings of a stager file holding the tree ``meta`` (tree.encode)."""
    return {
        _native.KEY_FORMAT: _native.FORMAT_NAME,
        _native.KEY_VERSION: _native.FORMAT_VERSION,  # the file layout; the tree JSON has its own version
        _native.KEY_TREE: json.dumps(meta, separators=(",", ":"), allow_nan=False),
    }


def save(state_dict: Any, path: str | os.PathLike, *, stager: Any = None, allow_pickle: bool = False,
         metadata: dict[str, str] | None = None) -> None:
    """Writes ``state_dict`` to ``path`` atomically and durably (a crash leaves the previous file
    or the new one, complete), as a safetensors-compatible stager file.

    CPU tensors are written straight from their own memory. Tensors on a device are staged into a
    host buffer first, each written as soon as its copy lands. Pass ``stager=`` (a
    :class:`~stager.DefaultStager` or :class:`~stager.BlockingAsyncStager`) to stage through that
    stager's pool and copy threads: the save then also takes a consistent host copy of CPU
    tensors (training may change them as soon as their copy completed) while writing overlaps
    the copying. A dict staged by a stager saves with no further copy. When the state_dict does
    not fit that stager's ``memory_budget_bytes``, its CPU tensors are streamed instead: written
    from their own memory through one pool buffer of at most the budget (they must not change
    until ``save`` returns).

    Non-tensor leaves that are not plain Python values need ``allow_pickle=True`` (and the same
    flag to load them back). ``metadata``: extra ``__metadata__`` strings (replication records
    owner, step and world size there). Raises :class:`StagerError` naming ``path`` on any failure.

    ``path`` must be a regular file or not exist: a device file, FIFO, socket or directory there
    raises :class:`StagerError` naming it and its type, and is left as it is. A symlink is
    followed, as ``torch.save`` does: its target is replaced atomically (the temp file is made
    in the target's directory) and the link itself stays. Stale temp files of killed saves in
    that directory are removed.
    """
    path = os.fspath(path)
    plan = plan_state_dict(state_dict)
    with gc_paused():
        meta = tree.encode(plan, allow_pickle=allow_pickle)
        names = tree.tensor_names(meta, len(plan.table))
        metadata = {**(metadata or {}), **header_metadata(meta)}  # reserved keys win
    if stager is None and not plan.device_storages:
        _native.write_file(path, plan.table, names, metadata)
        return
    staging = _staging_engine() if stager is None else getattr(stager, "_engine", None)
    if not isinstance(staging, StagingEngine):
        raise StagerError(
            f"save(stager=...) needs a stager.DefaultStager or BlockingAsyncStager, got {type(stager).__name__}"
        )
    staging.pool.reset_peak()
    budget = staging._stream_budget(plan)
    if budget is not None:
        # Larger than the stager's memory budget: the writer reads the tensors themselves,
        # bounced through one pool buffer of at most the budget (stager.streaming).
        stream = StreamedStage(state_dict, plan, staging.pool, budget)
        consumed, bounce = stream.claim(len(plan.table.storage_nbytes))
        try:
            _native.write_file(path, plan.table, names, metadata, consumed=consumed, bounce=bounce)
        finally:
            bounce = None  # a traceback keeps this frame: it must not keep the pool buffer
        return
    staged = staging.start_plan(plan)
    try:
        # Storage i is written once request i of the stage has completed, so writing overlaps
        # copying, from the host and from devices alike.
        _native.write_file(path, plan.table, names, metadata, staged.buffer, staged.completion)
    finally:
        staged.wait()


# ---- replicas -----------------------------------------------------------------------------------


class _RecordingWriter:
    """The file object ``torch.save`` writes into: the commit's temp file, buffered, keeping the
    first OSError, which torch's zip writer turns into an opaque ``RuntimeError``."""

    def __init__(self, fd: int) -> None:
        self._file = open(os.dup(fd), "wb", buffering=1 << 20)  # closed by close()
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            if self.error is None:
                self.error = err


def durable_torch_save(state_dict: Any, path: str | os.PathLike) -> None:
    """``torch.save`` (PyTorch's ``.pt``) through the atomic commit: into the temp file, fsync,
    rename over ``path``, fsync of the directory. An OS error while writing (a full disk, a file
    size limit) raises :class:`StagerError` naming ``path`` and the error (``.errno`` kept);
    the previous file stays and no temp file is left."""
    path = os.fspath(path)
    with _native.AtomicFile(path) as file:  # aborted (temp removed) unless committed
        sink = _RecordingWriter(file.fileno())
        try:
            # torch.save writes to any object with write() (its annotation names only IO[bytes]).
            torch.save(state_dict, sink)  # type: ignore[arg-type]
            sink.flush()
        except Exception:
            if sink.error is None:
                raise
        finally:
            sink.close()
        if sink.error is not None:
            raise os_error(f"cannot write {path}", sink.error) from sink.error
        file.commit()


def make_directory(path: str, what: str, *, writable: bool = True) -> None:
    """Creates directory ``path`` (and its parents) if needed and, with ``writable``, checks that
    files can be created in it; a StagerError naming ``what`` and ``path`` (and a read-only
    mount) if not."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise os_error(f"cannot create {what} {path}", err) from None
    if not writable or os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    code = errno.EROFS if read_only else errno.EACCES
    raise os_error(f"{what} {path} is not writable", OSError(code, os.strerror(code)))


def os_error(what: str, err: OSError) -> StagerError:
    """A StagerError saying ``what`` failed with ``err`` (its errno name included and kept as
    ``.errno``)."""
    return make_error(IO, f"{what}: {err.strerror or err} [{errno_name(err.errno)}]", err.errno)


def errno_name(code: int | None) -> str:
    """``ENOSPC`` for 28, etc."""
    return errno.errorcode.get(code, str(code)) if code is not None else "no errno"


# ---- load --------------------------------------------------------------------------------------


def _open(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[Any, dict, StatePlan, list]:
    """Opens ``path``, validates header, metadata and tree; returns (file, meta, plan, storages)."""
    file = _native.CheckpointFile(os.fspath(path))
    tree_json, storages = file.layout()
    try:
        with gc_paused():
            meta = json.loads(tree_json)
    except (ValueError, RecursionError) as err:
        raise StagerError(f"invalid stager file {os.fspath(path)}: the tree metadata is not valid JSON: {err}") from None
    try:
        plan = tree.decode(meta, allow_pickle=allow_pickle, max_nbytes=file.data_nbytes)
    except StagerError as err:
        raise StagerError(f"invalid stager file {os.fspath(path)}: {err}") from None
    except RecursionError:
        raise StagerError(f"invalid stager file {os.fspath(path)}: the tree is nested too deeply") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as err:
        # decode validates what it reads; this is the backstop for a case it missed.
        raise StagerError(f"invalid stager file {os.fspath(path)}: malformed tree metadata ({type(err).__name__}: {err})") from None
    if len(plan.storages) != len(storages):
        raise StagerError(
            f"invalid stager file {os.fspath(path)}: the tree has {len(plan.storages)} storages, "
            f"the file {len(storages)}"
        )
    for index, (expected, (entry, _, nbytes, _)) in enumerate(zip(plan.table.storage_nbytes, storages)):
        if expected != nbytes:
            raise StagerError(
                f"invalid stager file {os.fspath(path)}: storage {index} is {expected} bytes in the tree "
                f"but its entry {entry!r} holds {nbytes}"
            )
    return file, meta, plan, storages


def load(path: str | os.PathLike, *, mesh: Any = None, verify: bool = True, allow_pickle: bool = False) -> Any:
    """Reads a file written by :func:`save` and returns the exact state_dict (containers, strides,
    storage offsets, shared storages, leaf values), its tensors on the CPU.

    DTensors come back as DTensors on ``mesh`` (a ``DeviceMesh``, or a list of them for
    DTensors saved on several meshes; a submesh is picked by dim names), with the saved
    placements, shape and stride and the saved local shard; a mesh that does not fit raises
    StagerError naming the key. Without ``mesh`` each comes back as a :class:`stager.LocalShard`
    (the local tensor with its placement).

    Every malformed input raises :class:`StagerError` saying what is wrong; with ``verify`` every
    buffer's crc32c is checked. Never unpickles unless ``allow_pickle=True``.
    """
    file, _, plan, _ = _open(path, allow_pickle)
    if mesh is not None:
        dtensor.bind_meshes(plan, mesh, required=True)
    buffer = engine.process_pool(False).acquire(plan.total_nbytes)
    file.read_into(buffer, plan.table, verify)
    try:
        return plan.materialize(buffer)
    except StagerError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:
        raise StagerError(f"invalid stager file {os.fspath(path)}: cannot rebuild its tensors: {err}") from None


# ---- command line ------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    amount = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return str(amount)


def inspect_command(path: str) -> int:
    """``stager inspect FILE``: keys, dtypes, shapes, sizes and metadata. Returns the exit code."""
    try:
        file, meta, plan, storages = _open(path)
    except StagerError as err:
        print(f"stager inspect: {err}", file=sys.stderr)
        return 1
    paths = {index: tree.dotted(key_path) for index, key_path in tree.tensor_paths(meta).items()}
    print(f"{path}: stager file, tree version {meta['version']}, {_size(file.file_size)}")
    print(f"  {len(plan.tensors)} tensors in {len(storages)} stored buffers, {_size(file.data_nbytes)} of data")
    header_nbytes = file.data_start - 8
    print(f"  header: {header_nbytes} bytes ({header_nbytes / max(len(plan.tensors), 1):.0f} per tensor)")
    if header_nbytes > _native.SAFETENSORS_MAX_HEADER_BYTES:
        print(
            f"  note: the header is over the {_native.SAFETENSORS_MAX_HEADER_BYTES} bytes safetensors readers accept: "
            "safetensors readers will refuse this file; stager.load reads it"
        )
    print()
    print("tensors (key  dtype  shape  stride  offset  storage):")
    for index, tensor in enumerate(plan.tensors):
        key = paths.get(index, f"<tensor {index}>")
        print(
            f"  {key}  {str(tensor.dtype).removeprefix('torch.')}  {list(tensor.size)}  {list(tensor.stride)}"
            f"  {tensor.storage_offset}  #{tensor.storage_index}"
        )
    if plan.dtensors:
        print()
        print("DTensors (key  placements  global shape  stride  mesh):")
        for line in dtensor.describe(plan):
            print(f"  {line}")
    print()
    print("stored buffers (entry  bytes  crc32c):")
    for index, (entry, _, nbytes, crc) in enumerate(storages):
        print(f"  #{index} {entry}  {nbytes}  {crc:08x}")
    print()
    print("metadata:")
    for key, value in file.metadata.items():
        if key in ("stager.tree", "stager.crc32c", "stager.storages"):
            value = f"<{len(value)} chars>"
        print(f"  {key}: {value}")
    leaves = tree.leaf_values(meta)
    if leaves:
        print()
        print("non-tensor values:")
        for key, value in leaves[:200]:
            print(f"  {key}: {value}")
        if len(leaves) > 200:
            print(f"  ... {len(leaves) - 200} more")
    return 0


def verify_command(path: str) -> int:
    """``stager verify FILE``: validates the header and tree and checks every checksum.
    Returns 0 when the file is intact, 1 (with the reasons on stderr) when it is damaged."""
    try:
        file, _, plan, storages = _open(path)
        problems = file.verify()
    except StagerError as err:
        print(f"stager verify: {path}: DAMAGED: {err}", file=sys.stderr)
        return 1
    if problems:
        print(f"stager verify: {path}: DAMAGED: {len(problems)} of {len(storages)} buffers fail their checksum", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(plan.tensors)} tensors, {len(storages)} buffers, {file.data_nbytes} bytes, all crc32c checksums match)")
    return 0
