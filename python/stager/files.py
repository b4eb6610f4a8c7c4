"""Checkpoint files: ``save`` (atomic, durable, checksummed), ``load`` (validated, no pickle),
and the ``stager inspect`` / ``stager verify`` commands.

A stager file is a ``.safetensors`` file (any safetensors reader opens it) whose ``__metadata__``
also carries the tree (containers, non-tensor leaves, views sharing storages) and a crc32c per
stored buffer; the layout is documented in ``docs/FORMAT.md``. Python makes one pass over the
state_dict (:func:`stager.plan.plan_state_dict`) and encodes the tree (:mod:`stager.tree`); the
bytes are written and read by the Rust core without the GIL and without a serialization copy.

Order of operations in :func:`save`:

1. plan the state_dict (one pass) and encode its tree as JSON;
2. if every storage is on the CPU and no ``stager`` is given, write straight from the tensors'
   own memory; otherwise start staging into a host buffer (the given stager's pool and copy
   engine, or a private one) and write each storage as soon as its copy has completed;
3. the Rust writer writes a temp file ``<name>.<pid>.<n>.tmp`` next to ``path``, fsyncs it,
   renames it over ``path`` and fsyncs the directory. On any error the temp file is removed and
   the previous file is kept.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from . import _native, tree
from ._native import StagerError
from .options import StagingOptions
from .plan import StatePlan, TensorPlan, gc_paused, plan_state_dict
from .stagers import StagingEngine, process_pool

__all__ = ["inspect_command", "load", "save", "verify_command"]

#: torch dtype → safetensors dtype name, for tensors stored under their own key.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    **{
        getattr(torch, name): code
        for name, code in (
            ("float8_e4m3fn", "F8_E4M3"),
            ("float8_e5m2", "F8_E5M2"),
            ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
            ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
            ("uint16", "U16"),
            ("uint32", "U32"),
            ("uint64", "U64"),
        )
        if hasattr(torch, name)
    },
}

_RESERVED = "__stager__."


def _staging_engine() -> StagingEngine:
    """For saves that need staging (device tensors) without a stager: the process-wide pool."""
    return StagingEngine(StagingOptions(use_shared_memory=False, use_async_staging=False), pool=process_pool(False))


# ---- save --------------------------------------------------------------------------------------


def _key_paths(node: Any, path: list[str], out: dict[int, str]) -> None:
    """Fills ``out[tensor index] = dotted key path`` (first occurrence) from an encoded tree."""
    kind = node.get("t")
    if kind == "tensor":
        out.setdefault(node["i"], ".".join(path))
    elif kind in ("dict", "odict"):
        for key, child in node["items"]:
            if key.get("t") in ("str", "int"):
                _key_paths(child, path + [str(key["v"])], out)
    elif kind in ("list", "tuple", "namedtuple"):
        for index, child in enumerate(node["items"]):
            _key_paths(child, path + [str(index)], out)


def _entries(plan: StatePlan, meta: dict) -> tuple[list[str], list[str], list[list[int]]]:
    """One safetensors entry per storage: the owning tensor's dotted key, dtype and shape when a
    single plain tensor covers the storage exactly, else a ``__stager__.storage.<i>`` byte blob."""
    paths: dict[int, str] = {}
    _key_paths(meta["tree"], [], paths)
    owner: dict[int, int] = {}
    for index, tensor in enumerate(plan.tensors):
        if tensor.flags == TensorPlan.WHOLE_STORAGE and tensor.dtype in SAFETENSORS_DTYPES:
            owner[tensor.storage_index] = index
    names, dtypes, shapes = [], [], []
    used: set[str] = set()
    for index, storage in enumerate(plan.storages):
        tensor_index = owner.get(index) if storage.users == 1 else None
        name = paths.get(tensor_index) if tensor_index is not None else None
        if name and not name.startswith("__") and name not in used:
            tensor = plan.tensors[tensor_index]
            names.append(name)
            dtypes.append(SAFETENSORS_DTYPES[tensor.dtype])
            shapes.append(list(tensor.size))
        else:
            names.append(f"{_RESERVED}storage.{index}")
            dtypes.append("U8")
            shapes.append([storage.nbytes])
        used.add(names[-1])
    return names, dtypes, shapes


def header_metadata(meta: dict) -> dict[str, str]:
    """The ``__metadata__`` strings of a stager file holding the tree ``meta`` (tree.encode)."""
    return {
        "format": "stager",
        "stager.version": str(tree.FORMAT_VERSION),
        "stager.tree": json.dumps(meta, separators=(",", ":"), allow_nan=False),
    }


def save(state_dict: Any, path: str | os.PathLike, *, stager: Any = None, allow_pickle: bool = False) -> None:
    """Writes ``state_dict`` to ``path`` atomically and durably (a crash leaves the previous file
    or the new one, complete), as a safetensors-compatible stager file.

    CPU tensors are written straight from their own memory. Tensors on a device are staged into a
    host buffer first, each written as soon as its copy lands. Pass ``stager=`` (a
    :class:`~stager.DefaultStager` or :class:`~stager.BlockingAsyncStager`) to stage through that
    stager's pool and copy threads: the save then also takes a consistent host copy of CPU
    tensors (training may change them as soon as their copy completed) while writing overlaps
    the copying. A dict staged by a stager saves with no further copy.

    Non-tensor leaves that are not plain Python values need ``allow_pickle=True`` (and the same
    flag to load them back). Raises :class:`StagerError` naming ``path`` on any failure.
    """
    path = os.fspath(path)
    plan = plan_state_dict(state_dict)
    with gc_paused():
        meta = tree.encode(plan, allow_pickle=allow_pickle)
        names, dtypes, shapes = _entries(plan, meta)
        metadata = header_metadata(meta)
    storages = plan.storages
    nbytes = [s.nbytes for s in storages]
    if stager is None and not plan.device_storages:
        _native.write_file(path, names, dtypes, shapes, nbytes, [s.address for s in storages], metadata)
        return
    engine = _staging_engine() if stager is None else getattr(stager, "_engine", None)
    if engine is None or not hasattr(engine, "copier"):
        raise StagerError(
            f"save(stager=...) needs a stager.DefaultStager or BlockingAsyncStager, got {type(stager).__name__}"
        )
    staged = engine.start_plan(plan)
    try:
        # Device copies complete in the background; wait for them before their bytes are written
        # (host copies are waited for one by one by the writer, so writing overlaps copying).
        staged.wait_device_copies()
        # The copy job has one request per CPU storage with bytes, in storage order.
        requests: list[int | None] = [None] * len(storages)
        request = 0
        for index, storage in enumerate(storages):
            if storage.is_cpu and storage.nbytes:
                requests[index] = request
                request += 1
        base = staged.buffer.address
        addresses = [base + s.offset for s in storages]
        _native.write_file(path, names, dtypes, shapes, nbytes, addresses, metadata, staged.job, requests)
    finally:
        staged.job.wait()


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
    for index, (storage, (entry, _, nbytes, _)) in enumerate(zip(plan.storages, storages)):
        if storage.nbytes != nbytes:
            raise StagerError(
                f"invalid stager file {os.fspath(path)}: storage {index} is {storage.nbytes} bytes in the tree "
                f"but its entry {entry!r} holds {nbytes}"
            )
    return file, meta, plan, storages


def load(path: str | os.PathLike, *, verify: bool = True, allow_pickle: bool = False) -> Any:
    """Reads a file written by :func:`save` and returns the exact state_dict (containers, strides,
    storage offsets, shared storages, leaf values), its tensors on the CPU.

    Every malformed input raises :class:`StagerError` saying what is wrong; with ``verify`` every
    buffer's crc32c is checked. Never unpickles unless ``allow_pickle=True``.
    """
    file, _, plan, _ = _open(path, allow_pickle)
    buffer = process_pool(False).acquire(plan.total_nbytes)
    file.read_into(buffer, [s.offset for s in plan.storages], verify)
    try:
        return plan.materialize(buffer)
    except StagerError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:
        raise StagerError(f"invalid stager file {os.fspath(path)}: cannot rebuild its tensors: {err}") from None


# ---- command line ------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return str(nbytes)


def inspect_command(path: str) -> int:
    """``stager inspect FILE``: keys, dtypes, shapes, sizes and metadata. Returns the exit code."""
    try:
        file, meta, plan, storages = _open(path)
    except StagerError as err:
        print(f"stager inspect: {err}", file=sys.stderr)
        return 1
    paths: dict[int, str] = {}
    _key_paths(meta["tree"], [], paths)
    print(f"{path}: stager file, format version {meta['version']}, {_size(file.file_size)}")
    print(f"  {len(plan.tensors)} tensors in {len(storages)} stored buffers, {_size(file.data_nbytes)} of data")
    print()
    print("tensors (key  dtype  shape  stride  offset  storage):")
    for index, tensor in enumerate(plan.tensors):
        key = paths.get(index, f"<tensor {index}>")
        print(
            f"  {key}  {str(tensor.dtype).removeprefix('torch.')}  {list(tensor.size)}  {list(tensor.stride)}"
            f"  {tensor.storage_offset}  #{tensor.storage_index}"
        )
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
    leaves = _leaves(meta["tree"], [])
    if leaves:
        print()
        print("non-tensor values:")
        for key, value in leaves[:200]:
            print(f"  {key}: {value}")
        if len(leaves) > 200:
            print(f"  ... {len(leaves) - 200} more")
    return 0


def _leaves(node: Any, path: list[str]) -> list[tuple[str, Any]]:
    kind = node.get("t")
    if kind in ("dict", "odict"):
        out = []
        for key, child in node["items"]:
            out += _leaves(child, path + [str(key.get("v"))])
        return out
    if kind in ("list", "tuple", "namedtuple"):
        out = []
        for index, child in enumerate(node["items"]):
            out += _leaves(child, path + [str(index)])
        return out
    if kind == "tensor":
        return []
    return [(".".join(path) or "<root>", node.get("v", kind))]


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
