"""dcp's storage layer on stager's engine: :class:`FileSystemWriter` and :class:`FileSystemReader`.

Drop-ins for ``torch.distributed.checkpoint.FileSystemWriter`` / ``FileSystemReader``::

    dcp.async_save(sd, storage_writer=stager.FileSystemWriter(path), async_stager=stager.DefaultStager())
    dcp.load(sd, storage_reader=stager.FileSystemReader(path))

No lock-in: the writer writes dcp's own format, which PyTorch's default reader (and
``dcp_to_torch_save``) loads unchanged, and the reader reads checkpoints of PyTorch's writer as
well as stager's (and stager 0.1's JSON ones). docs/FORMAT.md has the layout. A directory holds,
per save:

* one **data file** per rank, ``__<rank>_<token>.distcp``: the rank's items back to back, each
  tensor a ``torch.save`` record whose zip framing ``rust/torch_record.rs`` builds around the
  storage bytes, which the Rust durable writer streams from the tensors' memory (temp file,
  fsync, rename, directory fsync, crc32 per storage in the record, the GIL released, ``O_DIRECT``
  where the record places them for it); bytes items as dcp serialised them. ``<token>`` is new for
  every save (the save's start time in ns, hex, and a random part), so a save never overwrites a
  file the committed checkpoint still uses;
* ``.metadata``: dcp's pickled ``Metadata``, written last, atomically, under a ``flock`` of the
  directory that every saving process takes: the commit. Until it is renamed into place the
  previous checkpoint is the one the directory holds; a save killed at any instant leaves that
  one loadable and its own data files unreferenced. After the commit, data files that no
  committed checkpoint names (the previous save's, those of killed saves) are removed on a
  background thread, under the same lock. Of two overlapping saves (threads, or processes
  pointed at one directory) the one that started later wins and the other fails with
  StagerError instead of committing over it.

``.metadata`` is opened without blocking and must be a regular file (a FIFO or device raises
StagerError naming its type); a symlink is read through, and a save replaces the link itself,
never writing the file it points to.

The reader unpickles ``.metadata`` with an unpickler that admits only dcp's metadata classes and
parses each record without running its pickle (an allowlist unpickler yields the tensor's
description; nothing is rebuilt). It serves dcp's read plans, resharding included: a record a
read item covers whole goes straight from the file into the destination tensor; others are read
once into scratch and copied out. Every storage read is checked against its crc32; damage raises
``StagerError`` naming the file and the items.

When ``dcp.async_save`` stages with stager's ``DefaultStager`` for this writer (THREAD
checkpointer), the stager hands the stage in flight to the writer (:meth:`FileSystemWriter.accept_stage`,
found through :mod:`stager.dcp_hooks`) and dcp's upload gets the staged dict before its copies are
done: the Rust writer waits on the stage's own completion, per storage, before writing each item.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import fcntl
import io
import itertools
import json
import math
import os
import pathlib
import pickle
import re
import secrets
import stat
import threading
import time
import zlib
from typing import Any, TypeVar

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
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
from .json_checks import is_int_list
from .plan import ALIGNMENT, TensorPlan, gc_paused, plan_state_dict
from .stagers import BlockingAsyncStager
from .streaming import StreamedStage

__all__ = ["FileSystemReader", "FileSystemWriter"]

METADATA_NAME = ".metadata"
#: dcp's version string for this layout of Metadata (what PyTorch's writer records).
DCP_VERSION = "1.0.0"
#: Version of the JSON this module writes into ``.metadata``.
FORMAT_VERSION = 1
_MAGIC = b"stager-dcp-metadata"
_RANK_FILE = re.compile(r"__(\d{1,9})_([0-9a-f]{16})([0-9a-f]{8})\.(?:distcp|safetensors)")
#: Data files of this writer (dcp's suffix); ``.safetensors`` ones are stager 0.1's.
DATA_SUFFIX = ".distcp"
# Temp names of the one atomic commit (rust/commit.rs), and of stager 0.1's writer.
_TEMP_SUFFIX = re.compile(r"\.\d+\.\d+(\.stager)?\.tmp")
_METADATA_TEMP = re.compile(r"(__\d{1,9})?\.metadata\.\d+\.\d+(\.stager)?\.tmp")


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


#: Where a read item is stored: in a stager rank file, or in a data file of dcp's format.
_Location = TypeVar("_Location", _ItemLocation, _StorageInfo)


def _new_token() -> tuple[str, int]:
    started = time.time_ns()
    return f"{started:016x}{secrets.token_hex(4)}", started


def _rank_file_name(rank: int, token: str) -> str:
    return f"__{rank}_{token}{DATA_SUFFIX}"


def _rank_file_base(name: str) -> tuple[re.Match | None, str]:
    """The rank-file pattern's match on ``name`` (a rank file or a temp of one) and the rest."""
    match = _RANK_FILE.match(name)
    return match, ("" if match is None else name[match.end():])


def _token_time(name: str) -> int | None:
    """The start time (ns) of the save that wrote rank file (or temp of) ``name``; None if the
    name is not one of ours."""
    match, rest = _rank_file_base(name)
    if match is None or (rest and not _TEMP_SUFFIX.fullmatch(rest)):
        return None
    return int(match.group(2), 16)


_dir_locks: dict[str, threading.Lock] = {}
_dir_locks_guard = threading.Lock()


def _dir_lock(path: str) -> threading.Lock:
    """One lock per checkpoint directory: two saves of one process commit one at a time."""
    key = os.path.realpath(path)
    with _dir_locks_guard:
        return _dir_locks.setdefault(key, threading.Lock())


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
    """stager 0.1's ``.metadata`` (what :func:`_decode_metadata` reads; the writer no longer
    makes it, tests do, to check that such checkpoints still load): the pickle prefix, a line
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


def _list(value: Any, reason: str) -> list[Any]:
    """``value`` when it is a list, else :class:`_Invalid` ``(reason)``."""
    _check(type(value) is list, reason)
    return value


def _int_list(value: Any, what: str) -> list[int]:
    _check(is_int_list(value, max_len=None), f"{what} must be a list of non-negative integers")
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
        files_used = _list(body.get("files"), "'files' must list rank files")
        _check(all(type(f) is str and _token_time(f) is not None and f.endswith(".safetensors")
                                                  and not _TEMP_SUFFIX.search(f) for f in files_used),
               "'files' must list rank files")
        state: dict[str, Any] = {}
        for entry in _list(body.get("state_dict_metadata"), "'state_dict_metadata' must be a list"):
            _check(type(entry) is list and len(entry) == 2 and type(entry[0]) is str and type(entry[1]) is dict,
                   "bad state_dict_metadata entry")
            fqn, spec = entry
            if spec.get("t") == "bytes":
                state[fqn] = BytesStorageMetadata()
                continue
            _check(spec.get("t") == "tensor", f"{fqn}: unknown kind {spec.get('t')!r}")
            dtype = tree.DTYPES.get(spec.get("dtype")) if type(spec.get("dtype")) is str else None
            if dtype is None:
                raise _Invalid(f"{fqn}: unknown dtype {spec.get('dtype')!r}")
            size = _int_list(spec.get("size"), f"{fqn} size")
            strides = spec.get("strides")
            if strides is not None:
                strides = tuple(_int_list(strides, f"{fqn} strides"))
            chunks = []
            for chunk in _list(spec.get("chunks"), f"{fqn}: chunks must be a list"):
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
        for entry in _list(body.get("storage_data"), "'storage_data' must be a list"):
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


# ---- dcp's own format: pickled Metadata, torch.save records -------------------------------------

#: ``(module, name)`` pairs a dcp ``.metadata`` pickle may reference: dcp's metadata classes and
#: the torch types they hold. Anything else is refused before it is looked up, so a hostile
#: pickle never runs code.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): name
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
}
_METADATA_OTHERS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}
_LAYOUTS_BY_NAME = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _torch_attribute(name: str, kind: type) -> Any:
    value = getattr(torch, name, None) if not name.startswith("_") else None
    return value if isinstance(value, kind) else None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles dcp's ``Metadata`` and nothing else (see :data:`_METADATA_CLASSES`)."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            from torch.distributed.checkpoint import metadata as dcp_metadata
            return getattr(dcp_metadata, name)
        found = _METADATA_OTHERS.get((module, name))
        if found is not None:
            return found
        if module == "torch":
            dtype = _torch_attribute(name, torch.dtype)
            if dtype is not None:
                return dtype
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout_by_name
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


class _Refused(Exception):
    """A pickle referenced something outside the allowlist."""


def _layout_by_name(name: Any) -> torch.layout:
    layout = _LAYOUTS_BY_NAME.get(name) if isinstance(name, str) else None
    if layout is None:
        raise _Refused(f"layout {name!r}")
    return layout


def _version_tuple(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def _safe_name(name: Any) -> bool:
    """A data file's relative path must be a plain name inside the checkpoint directory."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\0" not in name and name != METADATA_NAME)


def _load_dcp_metadata(data: bytes, path: str) -> Metadata:
    """dcp's pickled ``Metadata`` through :class:`_MetadataUnpickler`, validated."""
    try:
        with gc_paused():
            metadata = _MetadataUnpickler(data, path).load()
    except _Refused as refused:
        raise StagerError(
            f"{path}: refused to unpickle: it references {refused}, which is not one of dcp's "
            "metadata classes (a hostile or damaged file, or one from a newer dcp version); "
            "nothing in it was run"
        ) from None
    except Exception as err:  # truncated, damaged: pickle raises many kinds
        raise StagerError(f"{path}: not a readable dcp metadata pickle ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise StagerError(f"{path}: holds a {type(metadata).__name__}, not dcp's Metadata")
    version = getattr(metadata, "version", None)
    if version is not None:
        parsed = _version_tuple(version) if isinstance(version, str) else None
        if parsed is None or parsed > tuple(int(part) for part in DCP_VERSION.split(".")):
            raise StagerError(
                f"{path}: written by dcp metadata version {version!r}, newer than the {DCP_VERSION} this "
                "stager reads; load it with the PyTorch that wrote it"
            )
    state = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata)) for k, v in state.items()
    ):
        raise StagerError(f"{path}: damaged dcp metadata (state_dict_metadata)")
    if not isinstance(storage, dict):
        raise StagerError(f"{path}: damaged dcp metadata (storage_data)")
    for index, info in storage.items():
        fqn = getattr(index, "fqn", None)
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise StagerError(f"{path}: damaged dcp metadata (storage_data entry {fqn!r})")
        if not _safe_name(info.relative_path) or type(info.offset) is not int or type(info.length) is not int \
                or info.offset < 0 or info.length < 0:
            raise StagerError(f"{path}: dcp item {fqn!r} names an invalid location {info!r}")
        if getattr(info, "transform_descriptors", None):
            raise StagerError(
                f"{path}: dcp item {fqn!r} was written through stream transforms "
                f"{info.transform_descriptors!r}; stager.FileSystemReader reads plain torch.save items only"
            )
    return metadata


def _read_regular(path: str) -> bytes:
    """The bytes of ``path``, opened without blocking (a FIFO must not hang us) and only if it is
    a regular file (a symlink to one is followed, as for data files). FileNotFoundError passes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StagerError(f"{path} is {_file_kind(mode)}, not a regular file: refused")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def _is_stager_json(data: bytes) -> bool:
    return data.find(b"\n" + _MAGIC + b" ", 0, 4096) >= 0


def _committed_save(path: str) -> tuple[int | None, set[str]] | None:
    """The committed checkpoint at ``path`` (a ``.metadata``): (start time of its save when
    stager wrote it, the files it names); None when there is none or it cannot be read."""
    try:
        data = _read_regular(path)
    except (OSError, StagerError):
        return None
    try:
        if _is_stager_json(data):
            body = _parse_header(data, path)[0]
            started = body.get("started_ns")
            return (started if type(started) is int else None), set(body.get("files") or [])
        metadata = _load_dcp_metadata(data, path)
    except StagerError:
        return None
    files = {info.relative_path for info in metadata.storage_data.values()}
    times = [t for t in map(_token_time, files) if t is not None]
    return (min(times) if times else None), files


class _DirectoryLock:
    """``flock`` on the checkpoint directory itself: commits and cleanups of every process
    saving into one directory take turns (no lock file is left behind)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _DirectoryLock:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:
            if self.fd >= 0:
                os.close(self.fd)
            raise StagerError(f"cannot lock the checkpoint directory {self.path}: {err}") from err
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the lock


_metadata_temps = itertools.count()


def _in_use(path: str) -> bool:
    """Whether a live writer holds the temp file ``path`` (its commit keeps it flocked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _commit_metadata(path: str, data: bytes) -> None:
    """``path`` (a ``.metadata``) becomes ``data`` atomically and durably: temp file, fsync,
    rename, directory fsync. The rename replaces what the name holds, a symlink included (the
    file a link points to is never written); anything else that is not a regular file is
    refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise StagerError(f"{path} is {_file_kind(mode)}, not a regular file: refusing to replace it")
    # Not a ``.stager.tmp`` name: the sweep of stale temps that every data file's commit runs
    # (rust/commit.rs) must not race this one between its creation and its lock. Stale ones are
    # removed by _remove_unreferenced, under the directory lock.
    temp = f"{path}.{os.getpid()}.{next(_metadata_temps)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            # Locked while it is a temp: another process's sweep of stale temps (rust/commit.rs)
            # skips locked ones.
            fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.rename(temp, path)
        finally:
            os.close(fd)
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise StagerError(f"writing {path}: {err}") from err


def _storage_type(dtype: torch.dtype) -> tuple[str, str | None]:
    """What ``torch.save`` names a storage of ``dtype``: a legacy typed storage, or
    ``UntypedStorage`` plus the dtype (``_rebuild_tensor_v3``)."""
    name = _LEGACY_STORAGE_TYPES.get(dtype)
    if name is not None:
        return name, None
    return "UntypedStorage", str(dtype).removeprefix("torch.")


_LEGACY_STORAGE_TYPES: dict[torch.dtype, str] = dict(torch.storage._dtype_to_storage_type_map())


class _RecordStorage:
    """A ``torch.save`` record's storage as its pickle names it."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _RecordTensor:
    """A ``torch.save`` record's tensor as its pickle describes it (nothing rebuilt)."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype) -> None:
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype


class _StorageTypeName(str):
    """A storage class named by a record's pickle (a marker: no storage class is looked up)."""


def _record_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
               hooks: Any = None, metadata: Any = None) -> _RecordTensor:
    if not isinstance(storage, _RecordStorage):
        raise _Refused("a rebuild call without a storage")
    return _RecordTensor(storage, offset, size, stride, storage.dtype)


def _record_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
               dtype: Any, metadata: Any = None) -> _RecordTensor:
    if not isinstance(storage, _RecordStorage) or not isinstance(dtype, torch.dtype):
        raise _Refused("a rebuild call without a storage or dtype")
    return _RecordTensor(storage, offset, size, stride, dtype)


class _RecordUnpickler(pickle.Unpickler):
    """Reads a ``torch.save`` record's ``data.pkl`` of a plain tensor: admits only the rebuild
    calls, storage type names, dtypes and ``OrderedDict``; returns a :class:`_RecordTensor`."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _record_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _record_v3
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageTypeName("UntypedStorage")
        if module == "torch" and name in _LEGACY_STORAGE_NAMES:
            return _StorageTypeName(name)
        if module == "torch":
            dtype = _torch_attribute(name, torch.dtype)
            if dtype is not None:
                return dtype
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageTypeName) and isinstance(pid[2], str) and type(pid[4]) is int
                and pid[4] >= 0):
            raise _Refused(f"persistent id {pid!r}")
        dtype = torch.uint8 if pid[1] == "UntypedStorage" else _LEGACY_STORAGE_NAMES[pid[1]]
        return _RecordStorage(pid[2], dtype, pid[4])


_LEGACY_STORAGE_NAMES: dict[str, torch.dtype] = {name: dtype for dtype, name in _LEGACY_STORAGE_TYPES.items()}


def _ints_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, torch.Size)) and all(type(v) is int for v in value):
        return tuple(value)
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
    its size. Tensors on an accelerator are staged through the process-wide pool first, each
    written as its copy lands."""
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
    return _native.write_file(path, plan.table, names, metadata)


def write_data_file(path: str, items: list[tuple[str, Any]], stage: Any = None) -> list[tuple[int, int]]:
    """Writes a data file of dcp's format at ``path`` (atomic, durable; one Rust call) and returns
    each item's ``(offset, length)``: for each ``(fqn, value)``, a tensor becomes a ``torch.save``
    record whose storage bytes go straight from the tensor's memory (a view or a non-contiguous
    tensor: from a compact copy, as PyTorch's writer stores it), anything else (dcp's serialised
    ``BytesIO``) is stored as its bytes. With ``stage`` (a :class:`stager.StagedCopy` still
    copying, whose staged dict ``items`` come from), a tensor in that stage's buffer is written
    once its storage's request of the stage's completion has completed: the Rust writer waits on
    it."""
    if isinstance(stage, StreamedStage):
        return _write_streamed(path, items, stage)
    entries, waits = _record_entries(items, path, stage)
    _, ranges, _, _ = _native.write_records(
        path, entries, _serialization_id(os.path.basename(path)), stage.completion if waits else None
    )
    return ranges


def _record_entries(items: list[tuple[str, Any]], path: str, stage: Any) -> tuple[list[tuple], bool]:
    """``write_records``' items for ``items``, and whether one waits for a copy of ``stage``."""
    entries: list[tuple[torch.Tensor, int, int | None, tuple | None]] = []
    waits = False
    for fqn, data in items:
        if not isinstance(data, torch.Tensor):
            raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
            tensor = torch.frombuffer(raw, dtype=torch.uint8) if raw.nbytes else torch.empty(0, dtype=torch.uint8)
            entries.append((tensor, raw.nbytes, None, None))
            continue
        tensor = _record_source(data.detach(), fqn, path, stage)
        request = stage.request_of(tensor) if stage is not None else None
        waits = waits or request is not None
        nbytes = tensor.numel() * tensor.element_size()
        storage_type, v3_dtype = _storage_type(tensor.dtype)
        spec = (storage_type, nbytes if v3_dtype else tensor.numel(), 0, list(tensor.shape),
                list(tensor.stride()), v3_dtype)
        record_bytes = tensor.reshape(-1).view(torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        entries.append((record_bytes, nbytes, request, spec))
    return entries, waits


def _write_streamed(path: str, items: list[tuple[str, Any]], stage: StreamedStage) -> list[tuple[int, int]]:
    """:func:`write_data_file` for a state_dict larger than the budget (:mod:`stager.streaming`):
    the Rust writer reads the sources themselves, bounces through the stage's pool buffer, and
    reports each item read."""
    bounce = None
    try:
        try:
            entries = _record_entries(items, path, None)[0]
            consumed, bounce = stage.claim(len(entries))
        except BaseException as err:
            stage.fail(str(err))
            raise
        _, ranges, _, _ = _native.write_records(
            path, entries, _serialization_id(os.path.basename(path)), consumed=consumed, bounce=bounce
        )
        return ranges
    finally:
        # Back to the pool before the next streamed stage may take it (a traceback keeps this
        # frame alive: it must not keep the buffer).
        bounce = None
        stage.released.set()


def _record_source(tensor: torch.Tensor, fqn: str, path: str, stage: Any = None) -> torch.Tensor:
    """The tensor whose bytes a record stores: ``tensor`` itself when it is a plain contiguous
    CPU tensor (its bytes go straight from its memory), else a contiguous CPU copy (what
    PyTorch's writer stores too: it clones views)."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise StagerError(f"cannot write dcp item {fqn!r} to {path}: a tensor of layout {tensor.layout} "
                          "is not a plain strided tensor")
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if tensor.is_conj() or tensor.is_neg() or not tensor.is_contiguous():
        request = stage.request_of(tensor) if stage is not None else None
        if request is not None:  # a staged copy still landing: wait before reading it here
            stage.completion.wait(request)
        tensor = tensor.resolve_conj().resolve_neg().contiguous()
    return tensor


def _serialization_id(name: str) -> str:
    """The 40 decimal digits of a record's ``.data/serialization_id`` (from the save's token)."""
    match = _RANK_FILE.match(name)
    number = int(match.group(2) + match.group(3), 16) if match else 0
    return f"{number % 10**40:040d}"


class FileSystemWriter(StorageWriter):
    """A ``torch.distributed.checkpoint`` StorageWriter on stager's Rust durable writer.

    Drop-in for ``torch.distributed.checkpoint.FileSystemWriter`` (same constructor), writing the
    same format: one data file of ``torch.save`` records per rank, written from the staged
    buffers with the GIL released, crc32-checksummed, and dcp's pickled ``.metadata`` committed
    last and atomically. PyTorch's ``FileSystemReader`` loads what it writes. See the module docs
    for the directory layout and what a killed save leaves.

    Differences from PyTorch's: files are always durable (``sync_files=False`` changes nothing),
    there is always one file per rank (``single_file_per_rank=False`` is refused),
    ``thread_count`` and ``per_thread_copy_ahead`` are accepted and unused (the Rust writer
    picks its own I/O parallelism), ``serialization_format`` takes either of PyTorch's values
    and changes nothing (items are always ``torch.save`` records, PyTorch's default), and
    stream-transform extensions are refused.

    Like PyTorch's, the writer is also an ``AsyncStager``: ``dcp.async_save`` without an
    ``async_stager`` stages with it, through a :class:`stager.BlockingAsyncStager`.
    """

    _synchronize_after_execute: bool = False

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
        # Stages in flight handed over by stager's DefaultStager (accept_stage), oldest first.
        self._accepted: collections.deque = collections.deque()

    def __getstate__(self) -> dict:
        # The PROCESS checkpointer sends the writer to its daemon; the stager and the stages in
        # flight stay here.
        state = self.__dict__.copy()
        state["_stager"] = None
        state["_accepted"] = collections.deque()
        return state

    def accept_stage(self, stage: Any) -> None:
        """Told by stager's ``DefaultStager`` (under ``dcp.async_save``, see :mod:`stager.dcp_hooks`)
        that the dict it stages for this writer is ``stage`` (a :class:`stager.StagedCopy`), whose
        copies may still be running when ``write_data`` gets its tensors: the write then waits
        for each storage's copy (in Rust, on the stage's own completion) before writing it."""
        self._accepted.append(stage)

    def _stage_of(self, values: list[tuple[str, Any]]) -> Any:
        """The accepted stage that holds this plan's tensors (taken off the list, with any stage
        older than it or already complete); else the oldest streamed stage (this rank writes
        none of its tensors); None when there is neither."""
        accepted = self._accepted
        if not accepted:
            return None
        tensors = [data for _, data in values if isinstance(data, torch.Tensor) and data.device.type == "cpu"]
        for stage in list(accepted):
            if any(stage.holds(tensor) for tensor in tensors):
                accepted.remove(stage)
                return stage
        for stage in list(accepted):
            if isinstance(stage, StreamedStage):
                accepted.remove(stage)
                return stage
        while accepted and accepted[0].completion.done():
            accepted.popleft()
        return None

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
        """Writes this rank's items into its data file (one Rust call): a ``torch.save`` record
        per tensor item, the bytes of each bytes item, as PyTorch's writer lays them out. The
        returned Future is already complete."""
        target: _RankFile = plan.storage_data
        if not isinstance(target, _RankFile):
            raise StagerError("stager.FileSystemWriter.write_data got a plan that its prepare_global_plan did not make")
        items = plan.items
        if not items:  # nothing of this rank's is in the checkpoint (dcp deduplicated it away)
            stream = self._stage_of([])
            if stream is not None and isinstance(stream, StreamedStage):
                stream.skip()
            future: Future[list[WriteResult]] = Future()
            future.set_result([])
            return future
        path = os.path.join(self.path, target.name)
        byte_type = WriteItemType.BYTE_IO
        values = []
        try:
            for item in items:
                data = planner.resolve_data(item)
                if item.type != byte_type and not isinstance(data, torch.Tensor):
                    raise StagerError(f"dcp item {item.index.fqn!r} resolved to a {type(data).__name__}, not a tensor")
                values.append((item.index.fqn, data))
        except BaseException as err:
            stage = self._stage_of(values)
            if isinstance(stage, StreamedStage):
                stage.fail(str(err))
            raise
        ranges = write_data_file(path, values, self._stage_of(values))
        results = [
            WriteResult(index=item.index, size_in_bytes=length,
                        storage_data=_StorageInfo(target.name, offset, length))
            for item, (offset, length) in zip(items, ranges)
        ]
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commits the checkpoint: ``.metadata`` (dcp's pickled Metadata) renamed into place
        durably, then data files no committed checkpoint names are removed. Both under a lock on
        the directory that every process saving there takes, so two saves into one directory
        never commit a ``.metadata`` naming a file the other removed."""
        storage_data = {}
        for rank_results in results:
            for result in rank_results:
                storage_data[result.index] = result.storage_data
        files_used = sorted({location.relative_path for location in storage_data.values()})
        started = min((t for t in map(_token_time, files_used) if t is not None), default=time.time_ns())
        metadata.version = DCP_VERSION
        metadata.storage_data = storage_data
        metadata.storage_meta = self.storage_meta()
        with gc_paused():
            data = pickle.dumps(metadata)
        target = self._metadata_path()
        wait_for_cleanup(self.path)
        with _dir_lock(self.path), _DirectoryLock(self.path):
            committed = _committed_save(target)
            if committed is not None and committed[0] is not None and committed[0] > started:
                self._remove_unreferenced(committed[1], started, own=set(files_used))
                raise StagerError(
                    f"a save to {self.path} that started later committed first; this older one was discarded"
                )
            _commit_metadata(target, data)
        # Removing the previous checkpoint's files is off the upload's path: unlinking a file of
        # hundreds of MB costs tens of ms of page-cache work, and nothing waits for it.
        _cleanup_in_background(self.path, lambda: self._remove_after_commit(target, set(files_used), started))

    def _remove_after_commit(self, target: str, files_used: set[str], started_ns: int) -> None:
        """The post-commit cleanup, under the directory lock: keeps what the checkpoint committed
        *now* names (another process may have committed since) besides this save's files."""
        with _dir_lock(self.path), _DirectoryLock(self.path):
            committed = _committed_save(target)
            keep = set(files_used) | (committed[1] if committed is not None else set())
            self._remove_unreferenced(keep, started_ns)

    def _remove_unreferenced(self, keep: set[str], started_ns: int, own: frozenset[str] | set[str] = frozenset()) -> None:
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
            match, rest = _rank_file_base(name)
            base = match.group(0) if match is not None else name
            when = _token_time(name)
            if rest and _in_use(os.path.join(self.path, name)):
                continue  # a temp a live writer still holds (an older save in flight)
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
    """A ``torch.distributed.checkpoint`` StorageReader for dcp checkpoints of
    :class:`stager.FileSystemWriter`, of PyTorch's ``FileSystemWriter`` (its default
    ``torch.save`` items) and of stager 0.1, resharding included.

    Reads only the storages the rank's read plan needs, with parallel direct I/O; a storage that
    one read item covers whole lands straight in the destination tensor (no second copy), others
    go through scratch. Every storage read is verified against its checksum (crc32 of the
    ``torch.save`` record; crc32c for stager 0.1 files; ``verify=False`` skips that); a damaged,
    truncated or missing file raises :class:`StagerError` naming the file and the items. Never
    runs a pickle on tensor data: records are parsed, ``.metadata`` goes through an unpickler that
    admits only dcp's metadata classes. dcp's non-tensor values are handed to the planner's
    ``load_bytes`` as dcp serialised them.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.verify = verify
        self.storage_data: dict[MetadataIndex, _ItemLocation | _StorageInfo] = {}
        self.state_dict_metadata: dict[str, Any] = {}
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
            data = _read_regular(path)
        except FileNotFoundError:
            raise StagerError(
                f"no checkpoint in {self.path}: {name} is missing (a save that never committed leaves none)"
            ) from None
        except OSError as err:
            raise StagerError(f"reading {path}: {err}") from err
        if _is_stager_json(data):  # stager 0.1's format
            metadata, _ = _decode_metadata(data, path)
        else:
            metadata = _load_dcp_metadata(data, path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data
        self.state_dict_metadata = metadata.state_dict_metadata
        self.rank = kwargs.get("rank")
        if self.storage_data is None:
            raise StagerError("the checkpoint's metadata has no storage_data")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        kinds: dict[str, type] = {}
        for item in plan.items:
            location = self.storage_data.get(item.storage_index)
            if not isinstance(location, (_ItemLocation, _StorageInfo)):
                raise StagerError(f"the checkpoint in {self.path} has no storage for item {item.storage_index.fqn!r}")
            per_file.setdefault(location.relative_path, []).append(item)
            kinds[location.relative_path] = type(location)
        for name, items in per_file.items():
            if kinds[name] is _StorageInfo:
                self._read_records(name, items, planner)
            else:
                self._read_file(name, items, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _located(self, item: ReadItem, kind: type[_Location], name: str) -> _Location:
        """Where ``item`` is stored: a location of ``kind`` (the kind of its file's others, as
        :meth:`read_data` routed it); StagerError for metadata that mixes kinds in one file."""
        location = self.storage_data[item.storage_index]
        if not isinstance(location, kind):
            raise StagerError(f"the checkpoint in {self.path} names {name!r} as both a stager rank file and a data "
                              f"file of dcp's format (item {item.storage_index.fqn!r}): damaged metadata")
        return location

    def _read_records(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Serves ``items`` from a data file of dcp's format: records parsed without running
        their pickles, storages read straight into the destination where one read item covers
        one whole contiguous tensor, else once into scratch and copied out; every storage's
        crc32 checked (``verify``)."""
        path = os.path.join(self.path, name)
        fqns = [item.storage_index.fqn for item in items]
        try:
            file = _native.RecordFile(path)
        except StagerError as err:
            raise StagerError(f"cannot read dcp item(s) {_describe(fqns)} from {path}: {err}") from None
        reads: list[tuple[int, int, torch.Tensor, int | None]] = []
        read_items: list[list[str]] = []
        after: list[Any] = []  # what to do once the bytes are in
        records: dict[int, tuple[_RecordTensor, int, int, int | None]] = {}
        scratch: dict[int, torch.Tensor] = {}
        direct_spans: list[tuple[int, int, int]] = []  # (start, end, index into `after`)
        # Every record's framing at once (a cold file serves each small read with a seek).
        located = [self._located(item, _StorageInfo, name) for item in items]
        spans: dict[int, int] = {}  # record offset → length
        for item, info in zip(items, located):
            if item.type != LoadItemType.BYTE_IO:
                spans.setdefault(info.offset, info.length)
        raw_records = dict(zip(spans, file.parse_records(list(spans.items()))))
        for item, info in zip(items, located):
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                buffer = torch.empty(info.length, dtype=torch.uint8)
                reads.append((info.offset, info.length, buffer, None))
                read_items.append([fqn])
                after.append(("bytes", item, buffer))
                continue
            record = records.get(info.offset)
            if record is None:
                record = records[info.offset] = self._parse_record(raw_records[info.offset], path, item, info)
            tensor, data_at, nbytes, crc = record
            dest = planner.resolve_tensor(item).detach()
            lengths = tuple(item.lengths)
            offsets = tuple(item.storage_offsets)
            if tuple(dest.shape) != lengths:
                raise StagerError(f"dcp item {fqn!r}: destination of shape {tuple(dest.shape)} for a read of {lengths}")
            if len(offsets) != len(tensor.size) or any(
                o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, lengths, tensor.size)
            ):
                raise StagerError(
                    f"{path}: dcp item {fqn!r} asks for [{offsets} + {lengths}] of a stored tensor of shape {tensor.size}"
                )
            whole = (
                tensor.offset == 0
                and lengths == tensor.size
                and tensor.stride == _contiguous_strides(tensor.size)
                and math.prod(tensor.size) * tensor.dtype.itemsize == nbytes
                and dest.device.type == "cpu"
                and dest.dtype == tensor.dtype
                and dest.is_contiguous()
                and not dest.is_conj()
                and not dest.is_neg()
            )
            if whole and nbytes:
                start = dest.data_ptr()
                direct_spans.append((start, start + nbytes, len(after)))
            after.append(("tensor", item, dest, info.offset, whole))
        # Destinations that overlap (tied weights) go through scratch like the rest.
        direct_spans.sort()
        clash: set[int] = set()
        reach, holder = -1, -1
        for start, end, index in direct_spans:
            if start < reach:
                clash.update((index, holder))
            if end > reach:
                reach, holder = end, index
        for index, action in enumerate(after):
            if action[0] != "tensor":
                continue
            _, item, dest, record_at, whole = action
            tensor, data_at, nbytes, crc = records[record_at]
            if whole and index not in clash:
                if nbytes:
                    reads.append((data_at, nbytes, dest.reshape(-1).view(torch.uint8), crc))
                    read_items.append([item.storage_index.fqn])
                after[index] = ("done", item, dest)
                continue
            if record_at not in scratch:
                scratch[record_at] = torch.empty(nbytes, dtype=torch.uint8)
                reads.append((data_at, nbytes, scratch[record_at], crc))
                read_items.append([])
            read_items_index = next(i for i, r in enumerate(reads) if r[2] is scratch[record_at])
            read_items[read_items_index].append(item.storage_index.fqn)
        size = file.file_size
        for (offset, length, _, _), names in zip(reads, read_items):
            if offset + length > size:
                raise StagerError(
                    f"{path}: dcp item(s) {_describe(names)} lie at [{offset}, {offset + length}) but the file holds "
                    f"{size} bytes: the data file is shorter than the metadata says (truncated?)"
                )
        try:
            damaged = file.read_ranges(reads)
        except StagerError as err:
            names = [name for group in read_items for name in group]
            raise StagerError(f"cannot read dcp item(s) {_describe(names)} from {path}: {err}") from None
        if damaged:
            names = [fqn for index in damaged for fqn in read_items[index]]
            raise StagerError(f"{path}: crc32 checksum mismatch in dcp item(s) {_describe(names)}; the file is damaged")
        for action in after:
            kind, item = action[0], action[1]
            if kind == "bytes":
                planner.load_bytes(item, io.BytesIO(action[2].numpy().tobytes()))
            elif kind == "done":
                planner.commit_tensor(item, action[2])
            else:
                dest, record_at = action[2], action[3]
                tensor = records[record_at][0]
                base = scratch[record_at]
                source = torch.empty(0, dtype=tensor.dtype).set_(
                    base.untyped_storage(), tensor.offset, tensor.size, tensor.stride
                )
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                    source = source.narrow(dim, start, length)
                dest.copy_(source)
                planner.commit_tensor(item, dest)

    def _parse_record(self, raw: Any, path: str, item: ReadItem, info: _StorageInfo) -> tuple:
        """``(tensor, data offset, storage bytes, crc32 to check or None)`` of the record of
        ``item`` (``raw``: what ``RecordFile.parse_records`` gave for it), checked against itself
        and the checkpoint's metadata."""
        fqn = item.storage_index.fqn
        try:
            if isinstance(raw, BaseException):
                raise raw
            pickle_bytes, storages = raw
        except StagerError as err:
            hint = ""
            if path.endswith(".safetensors"):
                hint = (" (a stager 0.1 rank file named by dcp's pickled .metadata: the directory mixes files "
                        "of two checkpoint formats)")
            raise StagerError(f"cannot read dcp item {fqn!r} from {path}: {err}{hint}") from None
        try:
            tensor = _RecordUnpickler(io.BytesIO(pickle_bytes)).load()
        except _Refused as refused:
            raise StagerError(
                f"{path}: the torch.save record of dcp item {fqn!r} references {refused}, which a plain tensor's "
                "record never does; refused (nothing in it was run)"
            ) from None
        except Exception as err:
            raise StagerError(f"{path}: the torch.save record of dcp item {fqn!r} has a damaged data.pkl ({err})") from None
        size, stride = (_ints_tuple(getattr(tensor, "size", None)), _ints_tuple(getattr(tensor, "stride", None)))
        if not isinstance(tensor, _RecordTensor) or size is None or stride is None or len(size) != len(stride) \
                or type(tensor.offset) is not int or tensor.offset < 0 or any(v < 0 for v in size + stride):
            raise StagerError(f"{path}: the torch.save record of dcp item {fqn!r} does not hold a plain tensor")
        tensor.size, tensor.stride = size, stride
        found = [entry for entry in storages if entry[0] == tensor.storage.key]
        if len(found) != 1:
            raise StagerError(f"{path}: the torch.save record of dcp item {fqn!r} lacks its storage {tensor.storage.key!r}")
        _, data_at, nbytes, crc = found[0]
        itemsize = tensor.dtype.itemsize
        storage_bytes = tensor.storage.numel * tensor.storage.dtype.itemsize
        if storage_bytes != nbytes:
            raise StagerError(
                f"{path}: dcp item {fqn!r}: the record's storage holds {nbytes} bytes but its pickle says {storage_bytes}"
            )
        extent = 0 if 0 in size else (tensor.offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1) * itemsize
        if extent > nbytes:
            raise StagerError(f"{path}: dcp item {fqn!r}: the record's tensor reaches past its {nbytes}-byte storage")
        meta = getattr(self, "state_dict_metadata", {}).get(fqn)
        if isinstance(meta, TensorStorageMetadata):
            chunk = _chunk_of(meta, item.storage_index)
            if meta.properties.dtype != tensor.dtype or (chunk is not None and tuple(chunk.sizes) != size):
                raise StagerError(
                    f"{path}: dcp item {fqn!r}: the record holds a {tensor.dtype} tensor of shape {size}, the "
                    f"metadata says {meta.properties.dtype} of shape "
                    f"{tuple(chunk.sizes) if chunk is not None else '?'}: the storage size disagrees with the metadata"
                )
        return tensor, data_at, nbytes, (crc if self.verify and crc else None)

    def _read_file(self, name: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        path = os.path.join(self.path, name)
        keys = [self._located(item, _ItemLocation, name).key for item in items]
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
        reads: list[tuple[int, torch.Tensor | tuple[_native.HostBuffer, int]]] = list(direct.items())
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
        for item, tensor, target in zip(items, chosen, targets):
            storage = tensor.storage_index
            if storage in direct:  # read straight into this item's destination (its only reader)
                planner.commit_tensor(item, direct[storage])
                continue
            base = bases.get(storage)
            if base is None:
                nbytes = storages[storage].nbytes
                base = bases[storage] = (
                    torch.frombuffer(scratch, dtype=torch.uint8, count=nbytes, offset=scratch_offsets[storage])
                    if nbytes else torch.empty(0, dtype=torch.uint8)
                )
            if target is None:
                planner.load_bytes(item, io.BytesIO(base.numpy().tobytes()))
                continue
            source = torch.empty(0, dtype=tensor.dtype).set_(
                base.untyped_storage(), tensor.storage_offset, tensor.size, tensor.stride
            )
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                source = source.narrow(dim, start, length)
            target.copy_(source)
            planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        if not isinstance(checkpoint_id, (str, os.PathLike)) or "://" in os.fspath(checkpoint_id):
            return False
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), METADATA_NAME))


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _chunk_of(meta: TensorStorageMetadata, index: MetadataIndex) -> ChunkStorageMetadata | None:
    """The chunk of ``meta`` that ``index`` names (by its offset)."""
    if index.offset is None:
        return meta.chunks[0] if len(meta.chunks) == 1 else None
    for chunk in meta.chunks:
        if tuple(chunk.offsets) == tuple(index.offset):
            return chunk
    return None


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
