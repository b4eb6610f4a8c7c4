"""dcp's storage layer on stager's engine: :class:`FileSystemWriter` and :class:`FileSystemReader`.

Drop-ins for ``torch.distributed.checkpoint.FileSystemWriter`` / ``FileSystemReader``::

    dcp.async_save(sd, storage_writer=stager.FileSystemWriter(path), async_stager=stager.DefaultStager())
    dcp.load(sd, storage_reader=stager.FileSystemReader(path))

A checkpoint directory holds, per save:

* one **rank file** per rank, ``__<rank>_<token>.safetensors``: a stager file (safetensors-
  readable; ``stager.load``, ``stager inspect`` and ``stager verify`` open it) holding a flat dict
  ``{item key: tensor}`` of that rank's dcp write items. The Rust durable writer writes it
  (temp file, fsync, rename, directory fsync, crc32c per storage, the GIL released) straight from
  the tensors' memory: one aligned run per storage, no per-item pickle. dcp's non-tensor objects
  (``BYTE_IO`` items) are stored as the bytes dcp serialised them to, as uint8 tensors.
  ``<token>`` is new for every save (the save's start time in ns, hex, and a random part), so a
  save never overwrites a file the committed checkpoint still uses;
* ``.metadata``: dcp's ``Metadata`` as JSON (no pickle), written last, atomically: the commit.
  Until it is renamed into place the previous checkpoint is the one the directory holds; a save
  killed at any instant leaves that one loadable and its own rank files unreferenced. After the
  commit, rank files that no checkpoint references (the previous save's, those of killed saves)
  are removed, on a background thread: off the upload's path. One save at a time per directory
  (as with PyTorch's writer); of two overlapping saves the one that started later wins and the
  other fails with StagerError instead of committing over it.

``.metadata`` starts with a fixed 182-byte pickle that only PyTorch's own reader ever runs (it
unpickles whatever ``.metadata`` holds): its one call, ``stager.filesystem._written_by_stager``,
raises ``StagerError`` saying the checkpoint was written by stager and which reader loads it.
stager's reader never unpickles: it finds the JSON after that prefix (see :func:`_encode_metadata`).

The reader serves dcp's read plans, resharding included (sub-boxes of stored tensors): storages a
read item covers whole go straight from the file into the destination tensor; others are read once
into a pooled scratch buffer and copied out of it. Every storage read is checked against its
crc32c; damage raises ``StagerError`` naming the file and the items.

When a state_dict staged by stager reaches ``write_data`` while its copies are still running (see
``stager.engine.pending_copy``), each storage is written as soon as its copy has completed.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import json
import os
import pickle
import re
import secrets
import threading
import time
import zlib
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import (
    StorageReader,
    StorageWriter,
    WriteResult,
)
from torch.futures import Future

from . import _native, engine, files, tree
from ._native import StagerError
from .plan import ALIGNMENT, TensorPlan, gc_paused, plan_state_dict
from .stagers import BlockingAsyncStager

__all__ = ["FileSystemReader", "FileSystemWriter"]

METADATA_NAME = ".metadata"
#: dcp's version string for this layout of Metadata (what PyTorch's writer records).
DCP_VERSION = "1.0.0"
#: Version of the JSON this module writes into ``.metadata``.
FORMAT_VERSION = 1
_MAGIC = b"stager-dcp-metadata"
_RANK_FILE = re.compile(r"__(\d{1,9})_([0-9a-f]{16})([0-9a-f]{8})\.safetensors")
# Temp names of the one atomic commit (rust/commit.rs), and of stager 0.1's writer.
_TEMP_SUFFIX = re.compile(r"\.\d+\.\d+(\.stager)?\.tmp")
_METADATA_TEMP = re.compile(r"(__\d{1,9})?\.metadata\.\d+\.\d+(\.stager)?\.tmp")
#: Header metadata key of a rank file: which save and rank wrote it.
_RANK_FILE_KEY = "stager.dcp"


def _written_by_stager(message: str) -> None:
    """What the pickle prefix of ``.metadata`` calls when PyTorch's FileSystemReader unpickles it."""
    raise StagerError(message)


_TORCH_READER_MESSAGE = (
    "checkpoint written by stager.FileSystemWriter: load it with "
    "dcp.load(state_dict, storage_reader=stager.FileSystemReader(path))"
)


class _RefuseTorchReader:
    def __reduce__(self) -> tuple:
        return (_written_by_stager, (_TORCH_READER_MESSAGE,))


#: The prefix of every ``.metadata`` this module writes (deterministic bytes).
_TORCH_READER_STUB = pickle.dumps(_RefuseTorchReader(), protocol=2)


@dataclasses.dataclass(frozen=True)
class _RankFile:
    """``SavePlan.storage_data`` of a save: the rank's file name and the save's start time."""

    name: str
    started_ns: int


@dataclasses.dataclass(frozen=True)
class _ItemLocation:
    """``Metadata.storage_data[index]``: the rank file holding the item and its key in that file."""

    relative_path: str
    key: str


def _new_token() -> tuple[str, int]:
    started = time.time_ns()
    return f"{started:016x}{secrets.token_hex(4)}", started


def _rank_file_name(rank: int, token: str) -> str:
    return f"__{rank}_{token}.safetensors"


def _token_time(name: str) -> int | None:
    """The start time (ns) of the save that wrote rank file (or temp of) ``name``; None if the
    name is not one of ours."""
    match = _RANK_FILE.fullmatch(name.split(".safetensors", 1)[0] + ".safetensors")
    if match is None:
        return None
    rest = name[match.end():]
    if rest and not _TEMP_SUFFIX.fullmatch(rest):
        return None
    return int(match.group(2), 16)


_dir_locks: dict[str, threading.Lock] = {}
_dir_locks_guard = threading.Lock()


def _dir_lock(path: str) -> threading.Lock:
    """One lock per checkpoint directory: two saves of one process commit one at a time."""
    key = os.path.realpath(path)
    with _dir_locks_guard:
        return _dir_locks.setdefault(key, threading.Lock())



def _atomic_write(path: str, data: bytes) -> None:
    """``path`` becomes ``data`` atomically and durably through the one atomic commit
    (``_native.AtomicFile``: temp in the directory, fsync, rename, directory fsync); on failure the
    previous file stays and the temp is removed."""
    file = _native.AtomicFile(path)
    try:
        fd = file.fileno()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        file.commit()
    except OSError as err:
        file.abort()
        raise StagerError(f"writing {path}: {err}") from err
    finally:
        file.abort()  # a no-op once committed


_cleanups: dict[str, threading.Thread] = {}


def _cleanup_in_background(path: str, remove: Any) -> None:
    """Runs ``remove`` (the post-commit removal of unreferenced files in ``path``) on a thread;
    at most one per directory at a time, joined at interpreter exit."""
    key = os.path.realpath(path)
    wait_for_cleanup(path)
    thread = threading.Thread(target=remove, name="stager-dcp-cleanup", daemon=True)
    with _dir_locks_guard:
        _cleanups[key] = thread
    thread.start()


def wait_for_cleanup(path: str | os.PathLike, timeout: float | None = None) -> None:
    """Waits until the removal of files the last commit in ``path`` left unreferenced is done."""
    with _dir_locks_guard:
        thread = _cleanups.get(os.path.realpath(path))
    if thread is not None:
        thread.join(timeout)


@atexit.register
def _finish_cleanups() -> None:
    with _dir_locks_guard:
        threads = list(_cleanups.values())
    for thread in threads:
        thread.join(30)


# ---- Metadata as JSON ----------------------------------------------------------------------------

_LAYOUTS = {torch.strided: "strided", torch.sparse_coo: "sparse_coo"}
_MEMORY_FORMATS = {
    torch.contiguous_format: "contiguous",
    torch.channels_last: "channels_last",
    torch.preserve_format: "preserve",
}


def _ints(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


def _encode_value(value: Any, what: str) -> Any:
    """A plain Python value (containers of str/int/float/..., what dcp planners keep in
    ``planner_data``) as stager's tree JSON; StagerError for anything that would need pickle."""
    plan = plan_state_dict(value)
    if plan.leaves:
        raise StagerError(f"cannot store the Metadata's {what}: it holds tensors")
    try:
        return tree.encode(plan)["tree"]
    except StagerError as err:
        raise StagerError(f"cannot store the Metadata's {what} without pickle: {err}") from None


def _decode_value(node: Any) -> Any:
    plan = tree.decode({"version": tree.FORMAT_VERSION, "tree": node, "tensors": [], "storages": []})
    return plan.fill([])


def _encode_metadata(metadata: Metadata, files_used: list[str], started_ns: int) -> bytes:
    """``.metadata``'s bytes: the pickle prefix for PyTorch's reader, a line
    ``stager-dcp-metadata <version> <json bytes> <crc32 hex>``, the JSON."""
    state = []
    for fqn, value in metadata.state_dict_metadata.items():
        if isinstance(value, BytesStorageMetadata):
            state.append([fqn, {"t": "bytes"}])
            continue
        if not isinstance(value, TensorStorageMetadata):
            raise StagerError(f"cannot store Metadata entry {fqn!r} of type {type(value).__name__}")
        props = value.properties
        state.append([fqn, {
            "t": "tensor",
            "dtype": str(props.dtype).removeprefix("torch."),
            "layout": _LAYOUTS.get(props.layout, "strided"),
            "requires_grad": bool(props.requires_grad),
            "memory_format": _MEMORY_FORMATS.get(props.memory_format, "contiguous"),
            "pin_memory": bool(props.pin_memory),
            "strides": _ints(props.strides),
            "size": list(value.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in value.chunks],
        }])
    file_index = {name: i for i, name in enumerate(files_used)}
    storage = []
    for index, location in (metadata.storage_data or {}).items():
        storage.append([index.fqn, _ints(index.offset), index.index, file_index[location.relative_path], location.key])
    meta = metadata.storage_meta
    body = {
        "format": "stager-dcp",
        "version": FORMAT_VERSION,
        "dcp_version": metadata.version,
        "started_ns": started_ns,
        "files": files_used,
        "state_dict_metadata": state,
        "planner_data": None if metadata.planner_data is None else _encode_value(metadata.planner_data, "planner_data"),
        "storage_data": storage,
        "storage_meta": None if meta is None else {
            "checkpoint_id": None if meta.checkpoint_id is None else os.fspath(meta.checkpoint_id),
            "save_id": meta.save_id,
            "load_id": meta.load_id,
            "modules": list(meta.modules),
        },
    }
    with gc_paused():
        text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    line = b"%s %d %d %08x\n" % (_MAGIC, FORMAT_VERSION, len(text), zlib.crc32(text))
    return _TORCH_READER_STUB + b"\n" + line + text


class _Invalid(Exception):
    """A malformed field of ``.metadata`` (turned into StagerError naming the file)."""


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise _Invalid(reason)


def _int_list(value: Any, what: str) -> list[int]:
    _check(type(value) is list and all(type(v) is int and v >= 0 for v in value), f"{what} must be a list of non-negative integers")
    return value


def _parse_header(data: bytes, path: str) -> tuple[dict, int]:
    """Finds and checks the JSON of a ``.metadata`` file written by this module; returns
    (parsed JSON, offset). StagerError for PyTorch's pickled metadata and anything damaged."""
    at = data.find(b"\n" + _MAGIC + b" ", 0, 4096)
    if at < 0:
        if data[:1] == b"\x80":
            raise StagerError(
                f"{path} is the pickled metadata of a checkpoint written by PyTorch's "
                "torch.distributed.checkpoint.FileSystemWriter: stager.FileSystemReader reads only checkpoints "
                "written by stager.FileSystemWriter (and never unpickles); load this one with "
                "torch.distributed.checkpoint.FileSystemReader"
            )
        raise StagerError(f"{path} is not the metadata of a dcp checkpoint written by stager.FileSystemWriter")
    end = data.find(b"\n", at + 1)
    fields = data[at + 1:end].split(b" ") if end > 0 else []
    try:
        _check(len(fields) == 4, "bad header line")
        version, length, crc = int(fields[1]), int(fields[2]), int(fields[3], 16)
    except (ValueError, _Invalid):
        raise StagerError(f"invalid stager dcp metadata {path}: its header line is damaged") from None
    if version != FORMAT_VERSION:
        raise StagerError(f"{path}: stager dcp metadata version {version}; this build reads version {FORMAT_VERSION}")
    text = data[end + 1:]
    if len(text) != length:
        raise StagerError(f"invalid stager dcp metadata {path}: {len(text)} bytes of JSON, the header says {length} (truncated?)")
    if zlib.crc32(text) != crc:
        raise StagerError(f"invalid stager dcp metadata {path}: crc32 mismatch, the file is damaged")
    try:
        with gc_paused():
            body = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise StagerError(f"invalid stager dcp metadata {path}: not JSON ({err})") from None
    if type(body) is not dict or body.get("format") != "stager-dcp":
        raise StagerError(f"invalid stager dcp metadata {path}: not a stager-dcp document")
    return body, end + 1


def _decode_metadata(data: bytes, path: str) -> tuple[Metadata, dict]:
    """Validates and rebuilds the Metadata of ``.metadata`` bytes (untrusted input)."""
    body, _ = _parse_header(data, path)
    try:
        files_used = body.get("files")
        _check(type(files_used) is list and all(type(f) is str and _token_time(f) is not None and "." in f
                                                  and not _TEMP_SUFFIX.search(f) for f in files_used),
               "'files' must list rank files")
        state: dict[str, Any] = {}
        entries = body.get("state_dict_metadata")
        _check(type(entries) is list, "'state_dict_metadata' must be a list")
        for entry in entries:
            _check(type(entry) is list and len(entry) == 2 and type(entry[0]) is str and type(entry[1]) is dict,
                   "bad state_dict_metadata entry")
            fqn, spec = entry
            if spec.get("t") == "bytes":
                state[fqn] = BytesStorageMetadata()
                continue
            _check(spec.get("t") == "tensor", f"{fqn}: unknown kind {spec.get('t')!r}")
            dtype = tree.DTYPES.get(spec.get("dtype")) if type(spec.get("dtype")) is str else None
            _check(dtype is not None, f"{fqn}: unknown dtype {spec.get('dtype')!r}")
            size = _int_list(spec.get("size"), f"{fqn} size")
            strides = spec.get("strides")
            if strides is not None:
                strides = tuple(_int_list(strides, f"{fqn} strides"))
            chunks = []
            raw_chunks = spec.get("chunks")
            _check(type(raw_chunks) is list, f"{fqn}: chunks must be a list")
            for chunk in raw_chunks:
                _check(type(chunk) is list and len(chunk) == 2, f"{fqn}: bad chunk")
                offsets = _int_list(chunk[0], f"{fqn} chunk offsets")
                sizes = _int_list(chunk[1], f"{fqn} chunk sizes")
                _check(len(offsets) == len(sizes) == len(size)
                       and all(o + s <= n for o, s, n in zip(offsets, sizes, size)),
                       f"{fqn}: chunk {offsets}+{sizes} outside the tensor's size {size}")
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            layouts = {v: k for k, v in _LAYOUTS.items()}
            formats = {v: k for k, v in _MEMORY_FORMATS.items()}
            _check(spec.get("layout") in layouts and spec.get("memory_format") in formats, f"{fqn}: bad layout")
            properties = TensorProperties(
                dtype=dtype,
                layout=layouts[spec["layout"]],
                requires_grad=spec.get("requires_grad") is True,
                memory_format=formats[spec["memory_format"]],
                pin_memory=spec.get("pin_memory") is True,
                strides=strides,
            )
            state[fqn] = TensorStorageMetadata(properties=properties, size=torch.Size(size), chunks=chunks)
        storage_data: dict[MetadataIndex, _ItemLocation] = {}
        raw_storage = body.get("storage_data")
        _check(type(raw_storage) is list, "'storage_data' must be a list")
        for entry in raw_storage:
            _check(type(entry) is list and len(entry) == 5, "bad storage_data entry")
            fqn, offset, hint, file_index, key = entry
            _check(type(fqn) is str and type(key) is str, "bad storage_data names")
            _check(offset is None or type(offset) is list, "bad storage_data offset")
            _check(hint is None or type(hint) is int, "bad storage_data index")
            _check(type(file_index) is int and 0 <= file_index < len(files_used), "bad storage_data file")
            index = MetadataIndex(fqn, None if offset is None else _int_list(offset, f"{fqn} offset"), hint)
            storage_data[index] = _ItemLocation(files_used[file_index], key)
        planner_data = body.get("planner_data")
        if planner_data is not None:
            planner_data = _decode_value(planner_data)
        meta = body.get("storage_meta")
        storage_meta = None
        if meta is not None:
            _check(type(meta) is dict, "bad storage_meta")
            storage_meta = StorageMeta(
                checkpoint_id=meta.get("checkpoint_id") if type(meta.get("checkpoint_id")) is str else None,
                save_id=meta.get("save_id") if type(meta.get("save_id")) is str else None,
                load_id=None,
                modules=[m for m in meta.get("modules") or [] if type(m) is str],
            )
        version = body.get("dcp_version")
        metadata = Metadata(
            state_dict_metadata=state,
            planner_data=planner_data,
            storage_data=storage_data,
            storage_meta=storage_meta,
            version=version if type(version) is str else None,
        )
    except _Invalid as err:
        raise StagerError(f"invalid stager dcp metadata {path}: {err}") from None
    except StagerError as err:
        raise StagerError(f"invalid stager dcp metadata {path}: {err}") from None
    return metadata, body


def _read_committed(path: str) -> dict | None:
    """The JSON of the checkpoint committed at ``path`` (a ``.metadata``) if it is stager's, else
    None (no file, PyTorch's, damaged)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return _parse_header(data, path)[0]
    except (OSError, StagerError):
        return None


# ---- the writer ----------------------------------------------------------------------------------


def _item_keys(items: list) -> list[str]:
    """One key per write item, unique in the rank file: its fqn, plus ``@offsets`` where a rank
    holds several chunks of one fqn."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.index.fqn] = counts.get(item.index.fqn, 0) + 1
    keys, used = [], set()
    for item in items:
        fqn = item.index.fqn
        key = fqn
        if counts[fqn] > 1 or key.startswith("__"):
            offset = item.index.offset
            key = f"{fqn}@{','.join(map(str, offset)) if offset is not None else ''}"
        base, n = key, 1
        while key in used:
            key = f"{base}#{n}"
            n += 1
        used.add(key)
        keys.append(key)
    return keys


def write_rank_file(path: str, tensors: dict[str, torch.Tensor], extra_metadata: dict[str, str]) -> int:
    """Writes the flat dict ``tensors`` as a stager file at ``path`` (atomic, durable) and returns
    its size. Storages whose stage copy is still running (a dict a stager handed out early) are
    each written as soon as their copy completes; tensors on an accelerator are staged through
    the process-wide pool first, each written as its copy lands."""
    plan = plan_state_dict(tensors)
    keys = list(tensors)
    if plan.opaque:
        _, index, tensor = plan.opaque[0]
        raise StagerError(
            f"cannot write dcp item {keys[index]!r} to {path}: a {type(tensor).__name__} "
            f"(layout {tensor.layout}) is not a plain strided tensor"
        )
    with gc_paused():
        meta = tree.encode(plan)
        names = tree.tensor_names(meta, len(plan.table))
        metadata = files.header_metadata(meta)
        metadata.update(extra_metadata)
    if plan.device_storages:
        staged = files._staging_engine().start_plan(plan)
        try:
            return _native.write_file(path, plan.table, names, metadata, staged.buffer, staged.completion)
        finally:
            staged.wait()
    waits = _PendingCopies(plan)
    try:
        return _native.write_file(path, plan.table, names, metadata, completion=waits.completion)
    finally:
        waits.close()


class _PendingCopies:
    """A completion for the writer, one request per storage of ``plan``, done once that storage's
    bytes are in place: at once for storages no stage is still filling; for the others when
    their request of the stage's completion completes (``engine.pending_copy``), relayed by a
    thread in file order (the order the writer needs them). ``completion`` is None when nothing
    is pending."""

    def __init__(self, plan: Any) -> None:
        self.completion = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        first_tensor: dict[int, int] = {}
        for index, storage in enumerate(plan.table.tensor_storage):
            first_tensor.setdefault(storage, index)
        waits = []
        for storage, tensor in sorted(first_tensor.items()):
            found = engine.pending_copy(plan.leaves[tensor])
            if found is not None:
                waits.append((storage, *found))
        if not waits:
            return
        completion = self.completion = _native.Completion(len(plan.table.storage_nbytes))
        pending = {storage for storage, _, _ in waits}
        for storage in range(len(plan.table.storage_nbytes)):
            if storage not in pending:
                completion.mark_complete(storage)
        self._thread = threading.Thread(target=self._relay, args=(completion, waits), daemon=True,
                                        name="stager-dcp-pending")
        self._thread.start()

    def _relay(self, completion: Any, waits: list) -> None:
        try:
            for storage, stage, request in waits:
                while not stage.wait(request, 0.1):
                    if self._stop.is_set() or stage.failure is not None:
                        completion.fail(stage.failure or "the write was abandoned")
                        return
                if stage.failure is not None:
                    completion.fail(f"staging failed: {stage.failure}")
                    return
                completion.mark_complete(storage)
        except BaseException as err:  # handed to the writer, which raises it
            completion.fail(f"staging failed: {err}")

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


class FileSystemWriter(StorageWriter):
    """A ``torch.distributed.checkpoint`` StorageWriter on stager's Rust durable writer.

    Drop-in for ``torch.distributed.checkpoint.FileSystemWriter`` (same constructor): one
    safetensors-readable stager file per rank, written from the staged buffers with the GIL
    released, crc32c-checksummed, and a JSON ``.metadata`` committed last and atomically. See the
    module docs for the directory layout and what a killed save leaves.

    Differences from PyTorch's: files are always durable (``sync_files=False`` changes nothing),
    there is always one file per rank (``single_file_per_rank=False`` is refused),
    ``thread_count`` and ``per_thread_copy_ahead`` are accepted and unused (the Rust writer
    picks its own I/O parallelism), ``serialization_format`` takes either of PyTorch's values
    and changes nothing (rank files are always safetensors-compatible stager files), and
    stream-transform extensions are refused.

    Like PyTorch's, the writer is also an ``AsyncStager``: ``dcp.async_save`` without an
    ``async_stager`` stages with it, through a :class:`stager.BlockingAsyncStager`.
    """

    _synchronize_after_execute: bool = False
    #: Tells stager's DefaultStager that this writer may be handed a staged dict whose copies are
    #: still running (it waits for each storage's copy before writing it): dcp's upload then
    #: plans and starts writing while the stage is still copying.
    waits_for_pending_copies: bool = True

    def __init__(
        self,
        path: str | os.PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Any = None,
        serialization_format: Any = None,
    ) -> None:
        super().__init__()
        if not single_file_per_rank:
            raise StagerError("stager.FileSystemWriter always writes one file per rank (single_file_per_rank=True)")
        if _extensions:
            raise StagerError("stager.FileSystemWriter does not support stream-transform extensions")
        if serialization_format is not None and getattr(serialization_format, "value", serialization_format) not in (
            "torch_save", "safetensors"
        ):
            raise StagerError(f"unknown serialization_format {serialization_format!r}")
        self.path = os.fspath(path)
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.cache_staged_state_dict = cache_staged_state_dict
        self.overwrite = overwrite
        self.save_id = secrets.token_hex(16)
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True
        self._stager: BlockingAsyncStager | None = None

    def __getstate__(self) -> dict:
        # The PROCESS checkpointer sends the writer to its daemon; the stager stays here.
        state = self.__dict__.copy()
        state["_stager"] = None
        return state

    # ---- AsyncStager (used only when dcp.async_save gets no async_stager) ----------------------
    @property
    def should_synchronize_after_execute(self) -> bool:
        return self._synchronize_after_execute

    def stage(self, state_dict: Any) -> Any:
        """Copies ``state_dict`` to host memory (stager's BlockingAsyncStager) and returns it."""
        if self._stager is None:
            self._stager = BlockingAsyncStager(cache_staged_state_dict=self.cache_staged_state_dict)
        return self._stager.stage(state_dict)

    def synchronize_staging(self) -> None:
        """No-op: staging through the writer is blocking."""

    def close(self) -> None:
        """Releases the staging memory; the writer stays usable."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---- StorageWriter -------------------------------------------------------------------------
    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.save_id = secrets.token_hex(16)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def _metadata_path(self) -> str:
        name = METADATA_NAME if self.use_collectives or self.rank is None else f"__{self.rank}{METADATA_NAME}"
        return os.path.join(self.path, name)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise StagerError(f"cannot create the checkpoint directory {self.path}: {err}") from err
        if not self.overwrite and os.path.exists(self._metadata_path()):
            raise StagerError(f"a checkpoint already exists in {self.path} and overwrite=False")
        if not self.use_collectives and self.rank is not None:
            token, started = _new_token()
            plan = dataclasses.replace(plan, storage_data=_RankFile(_rank_file_name(self.rank, token), started))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        token, started = _new_token()
        return [
            plan if isinstance(plan.storage_data, _RankFile)
            else dataclasses.replace(plan, storage_data=_RankFile(_rank_file_name(rank, token), started))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Writes this rank's items into its rank file (one Rust call); the returned Future is
        already complete."""
        target: _RankFile = plan.storage_data
        if not isinstance(target, _RankFile):
            raise StagerError("stager.FileSystemWriter.write_data got a plan that its prepare_global_plan did not make")
        items = plan.items
        keys = _item_keys(items)
        tensors: dict[str, torch.Tensor] = {}
        sizes: list[int] = []
        byte_type = WriteItemType.BYTE_IO
        for item, key in zip(items, keys):
            data = planner.resolve_data(item)
            if item.type == byte_type:
                raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
                tensor = torch.frombuffer(raw, dtype=torch.uint8) if raw.nbytes else torch.empty(0, dtype=torch.uint8)
            else:
                if not isinstance(data, torch.Tensor):
                    raise StagerError(f"dcp item {item.index.fqn!r} resolved to a {type(data).__name__}, not a tensor")
                tensor = data.detach()
            tensors[key] = tensor
            sizes.append(tensor.numel() * tensor.element_size())
        if not items:  # nothing of this rank's is in the checkpoint (dcp deduplicated it away)
            future: Future[list[WriteResult]] = Future()
            future.set_result([])
            return future
        path = os.path.join(self.path, target.name)
        extra = {_RANK_FILE_KEY: json.dumps({"rank": self.rank, "save_id": self.save_id, "items": len(items)})}
        write_rank_file(path, tensors, extra)
        results = [
            WriteResult(index=item.index, size_in_bytes=size, storage_data=_ItemLocation(target.name, key))
            for item, key, size in zip(items, keys, sizes)
        ]
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commits the checkpoint: ``.metadata`` renamed into place (durably), then rank files no
        checkpoint references any more are removed."""
        storage_data = {}
        files_used: list[str] = []
        seen: set[str] = set()
        for rank_results in results:
            for result in rank_results:
                location = result.storage_data
                storage_data[result.index] = location
                if location.relative_path not in seen:
                    seen.add(location.relative_path)
                    files_used.append(location.relative_path)
        started = min((t for t in map(_token_time, files_used) if t is not None), default=time.time_ns())
        metadata.version = DCP_VERSION
        metadata.storage_data = storage_data
        metadata.storage_meta = self.storage_meta()
        data = _encode_metadata(metadata, files_used, started)
        target = self._metadata_path()
        wait_for_cleanup(self.path)
        with _dir_lock(self.path):
            committed = _read_committed(target)
            if committed is not None and type(committed.get("started_ns")) is int and committed["started_ns"] > started:
                self._remove_unreferenced(set(committed.get("files") or []), started, own=set(files_used))
                raise StagerError(
                    f"a save to {self.path} that started later committed first; this older one was discarded"
                )
            _atomic_write(target, data)
        # Removing the previous checkpoint's files is off the upload's path: unlinking a file of
        # hundreds of MB costs tens of ms of page-cache work, and nothing waits for it.
        _cleanup_in_background(self.path, lambda: self._remove_unreferenced(set(files_used), started))

    def _remove_unreferenced(self, keep: set[str], started_ns: int, own: set[str] = frozenset()) -> None:
        """Removes what no checkpoint needs any more: rank files (and their temps) of saves that
        started before ``started_ns`` and that ``keep`` does not list, the files named in
        ``own``, and metadata temps of commits killed before this save. With
        ``use_collectives=False`` only this rank's."""
        only_rank = self.rank if not self.use_collectives and self.rank is not None else None
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        doomed = []
        for name in names:
            if name in keep:
                continue
            temp = _METADATA_TEMP.fullmatch(name)
            if temp is not None:
                if (temp.group(1) or None) != (None if only_rank is None else f"__{only_rank}"):
                    continue
                try:
                    if os.stat(os.path.join(self.path, name)).st_mtime_ns < started_ns:
                        doomed.append(name)
                except OSError:
                    pass
                continue
            base = name.split(".safetensors", 1)[0] + ".safetensors"
            match = _RANK_FILE.fullmatch(base)
            when = _token_time(name)
            if match is None or when is None or (only_rank is not None and int(match.group(1)) != only_rank):
                continue
            if when < started_ns or base in own:
                doomed.append(name)
        for name in doomed:
            try:
                os.unlink(os.path.join(self.path, name))
            except OSError:
                pass
        # No directory fsync: a removal lost in a crash leaves a file the next commit removes.

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike)) and "://" not in os.fspath(checkpoint_id)


# ---- the reader ----------------------------------------------------------------------------------


def _describe(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class _OpenRankFile:
    """A validated rank file: its native handle, storages, tensors, and item key → tensor index."""

    def __init__(self, path: str, wanted: list[str]) -> None:
        try:
            self.file, meta, self.plan, self.storages = files._open(path)
        except StagerError as err:
            raise StagerError(f"cannot read dcp item(s) {_describe(wanted)} from {path}: {err}") from None
        root = meta.get("tree")
        if type(root) is not dict or root.get("t") not in ("dict", "odict"):
            raise StagerError(f"{path} is a stager file but not a dcp rank file (its root is not a dict)")
        self.path = path
        self.tensor_of: dict[str, int] = dict(tree.dict_tensor_items(root))
        self.tensors = self.plan.tensors


class FileSystemReader(StorageReader):
    """A ``torch.distributed.checkpoint`` StorageReader for checkpoints of
    :class:`stager.FileSystemWriter`, resharding included.

    Reads only the storages the rank's read plan needs; a storage that one read item covers
    whole lands straight in the destination tensor (no second copy), others go through a pooled
    scratch buffer. Every storage read is verified against its crc32c (``verify=False`` skips
    that); a damaged or missing file raises :class:`StagerError` naming the file and the items.
    Never unpickles tensor data; dcp's non-tensor values are handed to the planner's
    ``load_bytes`` as dcp serialised them.

    A directory holding a checkpoint of PyTorch's FileSystemWriter is refused at
    ``read_metadata`` with a StagerError that says so.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.verify = verify
        self.storage_data: dict[MetadataIndex, _ItemLocation] = {}
        self.load_id = secrets.token_hex(16)
        self.rank: int | None = None

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.load_id = secrets.token_hex(16)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        path = os.path.join(self.path, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StagerError(
                f"no checkpoint in {self.path}: {name} is missing (a save that never committed leaves none)"
            ) from None
        except OSError as err:
            raise StagerError(f"reading {path}: {err}") from err
        metadata, _ = _decode_metadata(data, path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        self.rank = kwargs.get("rank")
        if self.storage_data is None:
            raise StagerError("the checkpoint's metadata has no storage_data")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            location = self.storage_data.get(item.storage_index)
            if not isinstance(location, _ItemLocation):
                raise StagerError(f"the checkpoint in {self.path} has no storage for item {item.storage_index.fqn!r}")
            per_file.setdefault(location.relative_path, []).append(item)
        for name, items in per_file.items():
            self._read_file(name, items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_file(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        path = os.path.join(self.path, name)
        keys = [self.storage_data[item.storage_index].key for item in items]
        rank_file = _OpenRankFile(path, keys)
        tensors = rank_file.tensors
        storages = rank_file.plan.storages
        # Which stored tensor each item reads, and how often each storage is wanted.
        chosen: list[TensorPlan] = []
        wanted: dict[int, int] = {}
        for key in keys:
            index = rank_file.tensor_of.get(key)
            if index is None:
                raise StagerError(f"{path} does not hold dcp item {key!r} (damaged, or not this checkpoint's file)")
            tensor = tensors[index]
            chosen.append(tensor)
            wanted[tensor.storage_index] = wanted.get(tensor.storage_index, 0) + 1
        # Destinations; storages read straight into one of them, the rest into scratch.
        targets: list[torch.Tensor | None] = []
        direct: dict[int, torch.Tensor] = {}
        for item, key, tensor in zip(items, keys, chosen):
            if item.type == LoadItemType.BYTE_IO:
                targets.append(None)
                continue
            dest = planner.resolve_tensor(item).detach()
            lengths = tuple(item.lengths)
            if tuple(dest.shape) != lengths:
                raise StagerError(f"dcp item {key!r}: destination of shape {tuple(dest.shape)} for a read of {lengths}")
            _check_box(path, key, tensor, item)
            storage = tensor.storage_index
            if (
                wanted[storage] == 1
                and storages[storage].users == 1
                and tensor.flags == TensorPlan.WHOLE_STORAGE
                and lengths == tuple(tensor.size)
                and not any(item.storage_offsets)
                and dest.device.type == "cpu"
                and dest.dtype == tensor.dtype
                and dest.is_contiguous()
                and not dest.is_conj()
                and not dest.is_neg()
                and dest.numel() * dest.element_size() == storages[storage].nbytes
            ):
                direct[storage] = dest
            targets.append(dest)
        _drop_overlapping(direct, storages)
        scratch_offsets: dict[int, int] = {}
        total = 0
        for storage in wanted:
            if storage not in direct:
                scratch_offsets[storage] = total
                total += -(-storages[storage].nbytes // ALIGNMENT) * ALIGNMENT
        scratch = engine.process_pool(False).acquire(total) if total else engine.empty_buffer()
        reads = [(s, destination) for s, destination in direct.items()]
        reads += [(s, (scratch, offset)) for s, offset in scratch_offsets.items()]
        damaged = rank_file.file.read_storages(reads, self.verify)
        if damaged:
            bad = set(damaged)
            names = [key for key, tensor in zip(keys, chosen) if tensor.storage_index in bad]
            raise StagerError(
                f"{path}: crc32c checksum mismatch in dcp item(s) {_describe(names)} "
                f"(stored buffer(s) {', '.join(repr(rank_file.storages[s][0]) for s in sorted(bad))}); "
                "the file is damaged"
            )
        bases: dict[int, torch.Tensor] = {}
        for item, tensor, dest in zip(items, chosen, targets):
            storage = tensor.storage_index
            if storage in direct:
                planner.commit_tensor(item, dest)
                continue
            base = bases.get(storage)
            if base is None:
                nbytes = storages[storage].nbytes
                base = bases[storage] = (
                    torch.frombuffer(scratch, dtype=torch.uint8, count=nbytes, offset=scratch_offsets[storage])
                    if nbytes else torch.empty(0, dtype=torch.uint8)
                )
            if dest is None:
                planner.load_bytes(item, io.BytesIO(base.numpy().tobytes()))
                continue
            source = torch.empty(0, dtype=tensor.dtype).set_(
                base.untyped_storage(), tensor.storage_offset, tensor.size, tensor.stride
            )
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                source = source.narrow(dim, start, length)
            dest.copy_(source)
            planner.commit_tensor(item, dest)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        if not isinstance(checkpoint_id, (str, os.PathLike)) or "://" in os.fspath(checkpoint_id):
            return False
        return _read_committed(os.path.join(os.fspath(checkpoint_id), METADATA_NAME)) is not None


def _drop_overlapping(direct: dict[int, torch.Tensor], storages: list) -> None:
    """Moves to scratch the direct targets whose destination memory overlaps another's (tied
    weights: two dcp items, one tensor), so no two reads ever write the same bytes at once."""
    spans = sorted((dest.data_ptr(), dest.data_ptr() + storages[storage].nbytes, storage)
                   for storage, dest in direct.items())
    clash: set[int] = set()
    reach, holder = -1, -1  # the furthest end so far and whose it is
    for start, end, storage in spans:
        if start < reach:
            clash.update((storage, holder))
        if end > reach:
            reach, holder = end, storage
    for storage in clash:
        del direct[storage]


def _check_box(path: str, key: str, tensor: TensorPlan, item: ReadItem) -> None:
    """The read's box must lie inside the stored tensor (the metadata could be damaged)."""
    offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
    if item.type == LoadItemType.BYTE_IO:
        return
    if len(offsets) != len(tensor.size) or len(lengths) != len(tensor.size) or any(
        o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, lengths, tensor.size)
    ):
        raise StagerError(
            f"{path}: dcp item {key!r} asks for [{offsets} + {lengths}] of a stored tensor of shape {tuple(tensor.size)}"
        )
