"""The state_dict's shape as plain JSON, for files and for the wire, without pickle.

:func:`encode` turns a :class:`~stager.plan.StatePlan` into a JSON-able dict: the tree (containers
with their types, keys, non-tensor leaves), one entry per tensor (dtype, shape, stride, storage
offset, storage index) and one per storage (byte size). :func:`decode` validates such a dict, as
read from an untrusted file or peer, and returns a ``StatePlan`` whose storages are laid out in one
host buffer, ready for the bytes to be read in and :meth:`StatePlan.materialize` to rebuild the
exact state_dict (containers, strides, offsets, shared storages).

A DTensor is a ``tensor`` node for its local shard with a ``dtensor`` index into the top-level
``dtensors`` list, which (with ``meshes``) describes its placement (:mod:`stager.dtensor`).

Plain Python values (None, bool, int, float incl. nan/inf, complex, str, bytes, torch dtypes,
devices and sizes) are stored as JSON. Anything else is pickled only when the writer passes
``allow_pickle=True``, and unpickled only when the reader passes ``allow_pickle=True`` too.

The walkers over an encoded tree live here too: :func:`tensor_paths` (each tensor's key path),
:func:`dotted` (a key path as a file entry name), :func:`leaf_values` (the non-tensor leaves, for
``stager inspect``), and :func:`tensors_by_path` (the same walk over a live state_dict, for
matching received tensors to in-place targets).
"""

from __future__ import annotations

import base64
import collections
import math
import pickle
import weakref
from collections import OrderedDict
from typing import Any

import torch

from . import _native
from . import dtensor as _dtensor
from . import sharded as _sharded
from ._native import StagerError
from .json_checks import MAX_DIMS, expect, fail, float_field, int_field
from .plan import MAX_DEPTH, StatePlan, TensorPlan, gc_paused

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "MAX_DIMS",
    "MAX_INT_CHARS",
    "decode",
    "dict_tensor_items",
    "dotted",
    "encode",
    "leaf_values",
    "tensor_names",
    "tensor_paths",
    "tensors_by_path",
]

#: Version 2 writes the compact forms (a str key as a bare JSON string, a plain tensor place as a
#: bare integer, tensors and storages as arrays): about a third fewer header bytes per tensor,
#: which is what bounds a file of a million tensors. Both versions are read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)

# A tensor record's optional sixth element: bit flags.
_CONJ_BIT = 1
_NEG_BIT = 2

#: Every torch dtype by its short name ("float32", "bfloat16", "float8_e4m3fn", ...).
DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)
}

#: The longest int (as text) stored without pickle (``MAX_DIMS``, the most dimensions a tensor
#: may have, is :mod:`stager.json_checks`').
MAX_INT_CHARS = 64


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float_value(value: float) -> Any:
    return value if math.isfinite(value) else repr(value)  # "nan", "inf", "-inf"


def encode(plan: StatePlan, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The JSON-able description of ``plan`` (call before ``materialize``, which spends it)."""
    with gc_paused():
        return _encode(plan, allow_pickle)


def _encode(plan: StatePlan, allow_pickle: bool) -> dict[str, Any]:
    tensor_at = {(id(parent), key): index for parent, key, index in plan.fills}
    dtensor_at = {(id(parent), key): index for parent, key, index in plan.dtensor_fills}
    sharded_at = {(id(parent), key): index for parent, key, index in plan.sharded_fills}
    object_at = {(id(parent), key): source for parent, key, source in plan.deferred.objects} if plan.deferred else {}
    tuple_type = {id(items): cls for _, _, items, cls in plan.tuples}
    tensor_where: dict[int, str] = {}
    dtensor_where: dict[int, str] = {}
    dtensor_nodes: list[dict] = []

    def leaf(value: Any, where: str) -> dict[str, Any]:
        cls = type(value)
        if value is None:
            return {"t": "none"}
        if cls is bool:
            return {"t": "bool", "v": value}
        if cls is int:
            if abs(value) < 2**53:
                return {"t": "int", "v": value}
            return _long_int(value, where, allow_pickle)
        if cls is float:
            return {"t": "float", "v": _float_value(value)}
        if cls is complex:
            return {"t": "complex", "v": [_float_value(value.real), _float_value(value.imag)]}
        if cls is str:
            return {"t": "str", "v": value}
        if cls is bytes:
            return {"t": "bytes", "v": base64.b64encode(value).decode()}
        if cls is torch.dtype:
            return {"t": "dtype", "v": _dtype_name(value)}
        if cls is torch.device:
            return {"t": "device", "v": str(value)}
        if cls is torch.Size and all(v >= 0 for v in value):
            return {"t": "size", "v": list(value)}
        if allow_pickle:
            return {"t": "pickle", "v": base64.b64encode(pickle.dumps(value)).decode()}
        raise StagerError(
            f"cannot store the {cls.__module__}.{cls.__qualname__} at {where} without pickle: "
            "pass allow_pickle=True to store it (and to load it back)"
        )

    open_containers: dict[int, str] = {}  # the containers being encoded: a cycle re-enters one

    def node(value: Any, parent: Any, key: Any, where: str, depth: int = 0) -> Any:
        index = tensor_at.get((id(parent), key))
        if index is not None:
            tensor_where.setdefault(index, where)
            return index
        if depth >= MAX_DEPTH:
            raise _too_deep(where)
        if dtensor_at:
            index = dtensor_at.get((id(parent), key))
            if index is not None:
                local = plan.dtensors[index][0]
                dtensor_where.setdefault(index, where)
                tensor_where.setdefault(local, where)
                item = {"t": "tensor", "i": local, "dtensor": index}
                dtensor_nodes.append(item)
                return item
        if sharded_at and (id(parent), key) in sharded_at:
            return _sharded_node(plan.sharded[sharded_at[(id(parent), key)]], where, tensor_where)
        if object_at and (id(parent), key) in object_at:  # an object holding tensors
            return leaf(object_at[(id(parent), key)], where)
        if isinstance(value, dict):
            kind = "odict" if isinstance(value, OrderedDict) else "dict"
            _enter(open_containers, value, where)
            out = {
                "t": kind,
                "items": [
                    [k if type(k) is str else leaf(k, where), node(v, value, k, f"{where}.{k}", depth + 1)]
                    for k, v in value.items()
                ],
            }
            del open_containers[id(value)]
            return out
        if type(value) is list:
            cls = tuple_type.get(id(value))
            _enter(open_containers, value, where)
            items = [node(v, value, i, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
            del open_containers[id(value)]
            if cls is None:
                return {"t": "list", "items": items}
            if hasattr(cls, "_fields"):
                _check_namedtuple(cls, where)
                return {"t": "namedtuple", "name": cls.__name__, "fields": list(cls._fields), "items": items}
            return {"t": "tuple", "items": items}
        return leaf(value, where)

    tree = node(plan.holder[0], plan.holder, 0, "root")
    if plan.opaque:
        _, index, opaque = plan.opaque[0]
        raise StagerError(
            f"cannot persist or send the {type(opaque).__name__} at {tensor_where.get(index, 'root')} "
            f"(layout {opaque.layout}, dtype {opaque.dtype}): only plain strided tensors and DTensors are supported"
        )
    tensors = []
    for index, tensor in enumerate(plan.tensors):
        if len(tensor.size) > MAX_DIMS:
            raise StagerError(
                f"cannot persist or send the tensor at {tensor_where.get(index, 'root')}: it has "
                f"{len(tensor.size)} dimensions, stager files and the wire hold at most {MAX_DIMS}"
            )
        shape = list(tensor.size)
        stride = list(tensor.stride)
        # [dtype, shape, stride (null: contiguous), storage offset, storage index (, flags)]
        entry = [_dtype_name(tensor.dtype), shape, None if stride == _contiguous_stride(shape) else stride,
                 tensor.storage_offset, tensor.storage_index]
        flags = (_CONJ_BIT if tensor.flags & TensorPlan.CONJ else 0) | (_NEG_BIT if tensor.flags & TensorPlan.NEG else 0)
        if flags:
            entry.append(flags)
        tensors.append(entry)
    meta = {
        "version": FORMAT_VERSION,
        "tree": tree,
        "tensors": tensors,
        "storages": [storage.nbytes for storage in plan.storages],
    }
    if plan.dtensors:
        # Each DTensor node refers to its layout: patch the record numbers into layout numbers.
        where = [dtensor_where.get(i, "root") for i in range(len(plan.dtensors))]
        layout_of, meta["dtensors"], meta["meshes"] = _dtensor.encode(plan.dtensors, where)
        for item in dtensor_nodes:
            item["dtensor"] = layout_of[item["dtensor"]]
    return meta


# ---- what the reader would refuse, refused before writing (kept apart from the walk above) -------


def _sharded_node(record: Any, where: str, tensor_where: dict[int, str]) -> dict[str, Any]:
    for index in record.tensors:
        tensor_where.setdefault(index, where)
    return _sharded.encode(record, where)


def _too_deep(where: str) -> StagerError:
    return StagerError(
        f"cannot persist or send the state_dict: {where} is nested {MAX_DEPTH} levels deep or more; "
        f"stager files and the wire hold at most {MAX_DEPTH} levels"
    )


def _enter(open_containers: dict[int, str], container: Any, where: str) -> None:
    """Marks ``container`` as being encoded; a container met again inside itself is a cycle,
    which the tree (and the reader) cannot hold."""
    outer = open_containers.get(id(container))
    if outer is not None:
        raise StagerError(
            f"cannot persist or send the state_dict: it contains a cycle: {where} is {outer} itself"
        )
    open_containers[id(container)] = where


def _long_int(value: int, where: str, allow_pickle: bool) -> dict[str, Any]:
    """An int of 2**53 or more as text (JSON numbers lose precision there); the reader takes at
    most ``MAX_INT_CHARS`` characters, so a longer one is pickled when allowed, else refused."""
    try:
        text = str(value)
    except ValueError:  # over Python's int-to-str digit limit
        text = None
    if text is not None and len(text) <= MAX_INT_CHARS:
        return {"t": "int", "v": text}
    if allow_pickle:
        return {"t": "pickle", "v": base64.b64encode(pickle.dumps(value)).decode()}
    raise StagerError(
        f"cannot store the int at {where} without pickle: it has {value.bit_length()} bits, more than "
        f"the {MAX_INT_CHARS} characters stager files and the wire hold (pass allow_pickle=True to store it)"
    )


_REBUILDABLE_NAMEDTUPLES: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _check_namedtuple(cls: type, where: str) -> None:
    """The reader rebuilds a namedtuple type from its name and fields: refuse one it could not."""
    ok = _REBUILDABLE_NAMEDTUPLES.get(cls)
    if ok is None:
        try:
            collections.namedtuple(cls.__name__, cls._fields)  # type: ignore[attr-defined,misc]
            ok = True
        except (TypeError, ValueError):
            ok = False
        _REBUILDABLE_NAMEDTUPLES[cls] = ok
    if not ok:
        raise StagerError(
            f"cannot persist or send the namedtuple {cls.__qualname__} at {where}: a reader cannot "
            f"rebuild a namedtuple named {cls.__name__!r} with fields {list(cls._fields)}"  # type: ignore[attr-defined]
        )


# ---- decoding (untrusted input) ----------------------------------------------------------------


def _contiguous_stride(shape: list[int]) -> list[int]:
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * max(shape[i + 1], 1)
    return stride


def _tensor_record(spec: Any, index: int) -> tuple:
    """The fields of one tensor entry (version 2's array or version 1's object) as the engine's
    ``TensorTable.from_layout`` takes them: (storage, dtype name, shape, stride or None for
    contiguous, offset, conj, neg). The engine checks their types and bounds."""
    if type(spec) is list:
        if len(spec) not in (5, 6):
            raise fail(f"tensor {index} must be [dtype, shape, stride, offset, storage(, flags)]")
        name, shape, stride, offset, storage = spec[:5]
        bits = spec[5] if len(spec) == 6 else 0
        expect(type(bits) is int and 0 <= bits <= _CONJ_BIT | _NEG_BIT, f"tensor {index} has bad flags {bits!r}")
        return storage, name, shape, stride, offset, bool(bits & _CONJ_BIT), bool(bits & _NEG_BIT)
    if type(spec) is dict:
        stride = spec.get("stride")
        expect(type(stride) is list, f"tensor {index} needs shape and stride lists")
        return (spec.get("storage"), spec.get("dtype"), spec.get("shape"), stride, spec.get("offset"),
                spec.get("conj") is True, spec.get("neg") is True)
    raise fail(f"tensor {index} must be an array or an object")


def decode(meta: Any, *, allow_pickle: bool = False, max_nbytes: int | None = None) -> StatePlan:
    """Validates ``meta`` (as produced by :func:`encode`) and returns a ``StatePlan`` whose
    storages are laid out in one buffer of ``plan.total_nbytes``; fill that buffer with the
    storages' bytes (each at ``storage.offset``) and call ``plan.materialize(buffer)``.

    ``max_nbytes`` bounds the total storage bytes (e.g. the size of the file they come from), so
    a hostile header cannot make the reader allocate absurd amounts of memory."""
    with gc_paused():
        return _decode(meta, allow_pickle, max_nbytes)


def _decode(meta: Any, allow_pickle: bool, max_nbytes: int | None) -> StatePlan:
    expect(isinstance(meta, dict), "top level must be an object")
    version = meta.get("version")
    expect(type(version) is int and version in _READABLE_VERSIONS,
            f"unsupported version {version!r} (this stager reads {', '.join(map(str, _READABLE_VERSIONS))})")
    storage_specs = meta.get("storages")
    tensor_specs = meta.get("tensors")
    expect(isinstance(storage_specs, list), "'storages' must be a list")
    expect(isinstance(tensor_specs, list), "'tensors' must be a list")
    plan = StatePlan()
    storage_nbytes = []
    for index, spec in enumerate(storage_specs):
        if type(spec) is int and spec >= 0:
            storage_nbytes.append(spec)
            continue
        expect(isinstance(spec, dict), f"storage {index} must be a byte count")
        storage_nbytes.append(int_field(spec.get("nbytes"), f"storage {index} nbytes"))
    total = sum(storage_nbytes)
    expect(max_nbytes is None or total <= max_nbytes,
            f"storages claim {total} bytes, more than the {max_nbytes} available")
    records = [_tensor_record(spec, i) for i, spec in enumerate(tensor_specs)]
    plan.table = _native.TensorTable.from_layout(storage_nbytes, records)
    count = len(tensor_specs)
    layouts: list = []
    if "dtensors" in meta or "meshes" in meta:
        layouts, plan.mesh_infos = _dtensor.decode(meta)
    dtensor_at: dict[tuple[int, int], int] = {}  # (local tensor, layout) -> DTensor record
    namedtuple_types: dict[tuple, type] = {}

    def leaf(item: dict, where: str) -> Any:
        expect(isinstance(item, dict), f"{where}: value must be an object")
        kind = item.get("t")
        value: Any = item.get("v")
        if kind == "none":
            return None
        if kind == "bool":
            expect(type(value) is bool, f"{where}: bad bool")
            return value
        if kind == "int":
            if isinstance(value, str):
                expect(len(value) <= 64 and value.lstrip("-").isdigit(), f"{where}: bad int")
                return int(value)
            return int_field(value, where, minimum=None)
        if kind == "float":
            return float_field(value, where)
        if kind == "complex":
            expect(isinstance(value, list) and len(value) == 2, f"{where}: bad complex")
            return complex(float_field(value[0], where), float_field(value[1], where))
        if kind == "str":
            expect(isinstance(value, str), f"{where}: bad str")
            return value
        if kind == "bytes":
            expect(isinstance(value, str), f"{where}: bad bytes")
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as err:
                raise fail(f"{where}: bad base64") from err
        if kind == "dtype":
            expect(value in DTYPES, f"{where}: unknown dtype {value!r}")
            return DTYPES[value]
        if kind == "device":
            expect(isinstance(value, str) and len(value) < 64, f"{where}: bad device")
            try:
                return torch.device(value)
            except RuntimeError as err:
                raise fail(f"{where}: bad device {value!r}") from err
        if kind == "size":
            expect(isinstance(value, list), f"{where}: bad size")
            return torch.Size([int_field(v, where) for v in value])
        if kind == "pickle":
            if not allow_pickle:
                raise StagerError(
                    f"the checkpoint holds a pickled value at {where}; refusing to unpickle it "
                    "(pass allow_pickle=True only for files you trust)"
                )
            expect(isinstance(value, str), f"{where}: bad pickle")
            return pickle.loads(base64.b64decode(value))
        raise fail(f"{where}: unknown node type {kind!r}")

    def node(item: Any, parent: Any, key: Any, where: str, depth: int) -> Any:
        if type(item) is int:  # version 2's plain tensor place
            expect(0 <= item < count, f"{where} refers to tensor {item} of {count}")
            plan.fills.append((parent, key, item))
            return None
        expect(isinstance(item, dict), f"{where}: node must be an object")
        expect(depth < MAX_DEPTH, f"{where}: tree nested deeper than {MAX_DEPTH}")
        kind = item.get("t")
        if kind == "tensor":
            index = int_field(item.get("i"), f"{where} tensor index")
            expect(index < count, f"{where} refers to tensor {index} of {count}")
            if "dtensor" in item:
                layout = int_field(item["dtensor"], f"{where} dtensor layout")
                expect(layout < len(layouts), f"{where} refers to dtensor layout {layout} of {len(layouts)}")
                number = dtensor_at.get((index, layout))
                if number is None:  # one DTensor per (local tensor, layout), as it was saved
                    number = dtensor_at[(index, layout)] = len(plan.dtensors)
                    plan.dtensors.append((index, layouts[layout]))
                    plan.dtensor_where.append(where)
                plan.dtensor_fills.append((parent, key, number))
                return None
            plan.fills.append((parent, key, index))
            return None
        if kind == "sharded":
            plan.sharded_fills.append((parent, key, len(plan.sharded)))
            plan.sharded.append(_sharded.decode(item, where, count, DTYPES))
            plan.sharded_where.append(where)
            return None
        if kind in ("dict", "odict"):
            entries = item.get("items")
            expect(isinstance(entries, list), f"{where}: items must be a list")
            mapping: dict = OrderedDict() if kind == "odict" else {}
            for entry in entries:
                expect(isinstance(entry, list) and len(entry) == 2, f"{where}: bad item")
                k = entry[0] if type(entry[0]) is str else leaf(entry[0], f"{where} key")
                try:
                    mapping[k] = node(entry[1], mapping, k, f"{where}.{k}", depth + 1)
                except TypeError as err:
                    raise fail(f"{where}: unhashable key") from err
            return mapping
        if kind in ("list", "tuple", "namedtuple"):
            entries = item.get("items")
            expect(isinstance(entries, list), f"{where}: items must be a list")
            items: list = []
            for i, entry in enumerate(entries):
                items.append(node(entry, items, i, f"{where}[{i}]", depth + 1))
            if kind == "list":
                return items
            cls: type = tuple
            if kind == "namedtuple":
                name, fields = item.get("name"), item.get("fields")
                expect(isinstance(name, str) and isinstance(fields, list) and len(fields) == len(items),
                        f"{where}: bad namedtuple")
                signature = (name, tuple(fields))
                if signature not in namedtuple_types:
                    try:
                        namedtuple_types[signature] = collections.namedtuple(name, fields)  # type: ignore[misc]
                    except (TypeError, ValueError) as err:
                        raise fail(f"{where}: bad namedtuple {name!r}") from err
                cls = namedtuple_types[signature]
            plan.tuples.append((parent, key, items, cls))
            return items
        return leaf(item, where)

    plan.holder[0] = node(meta.get("tree"), plan.holder, 0, "root", 0)
    return plan


# ---- walkers over an encoded tree (and over a live state_dict) -------------------------------


_NO_KEY = object()


def _json_key(entry: Any) -> Any:
    """The Python value of an encoded dict key usable in a key path, else ``_NO_KEY``."""
    if type(entry) is str:
        return entry
    if isinstance(entry, dict) and entry.get("t") in ("str", "int", "bool", "float"):
        value = entry.get("v")
        return int(value) if entry.get("t") == "int" and isinstance(value, str) else value
    return _NO_KEY


def tensor_paths(meta: dict) -> dict[int, tuple]:
    """tensor index → its key path (first occurrence) in the encoded tree ``meta``."""
    paths: dict[int, tuple] = {}

    def walk(node: Any, path: tuple) -> None:
        if type(node) is int:
            paths.setdefault(node, path)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("t")
        if kind == "tensor":
            index = node.get("i")
            if type(index) is int:
                paths.setdefault(index, path)
        elif kind in ("dict", "odict"):
            for item in node.get("items", []):
                if isinstance(item, list) and len(item) == 2:
                    key = _json_key(item[0])
                    if key is not _NO_KEY:
                        walk(item[1], path + (key,))
        elif kind in ("list", "tuple", "namedtuple"):
            for i, child in enumerate(node.get("items", [])):
                walk(child, path + (i,))

    with gc_paused():
        walk(meta.get("tree"), ())
    return paths


def dict_tensor_items(node: Any) -> list[tuple[str, int]]:
    """``(str key, tensor index)`` of each item of the encoded dict ``node`` whose value is a plain
    tensor place (either version's form); ``[]`` when ``node`` is not a dict."""
    if not isinstance(node, dict) or node.get("t") not in ("dict", "odict"):
        return []
    out = []
    for item in node.get("items", []):
        if not (isinstance(item, list) and len(item) == 2):
            continue
        key, value = _json_key(item[0]), item[1]
        if type(key) is not str:
            continue
        if type(value) is int:
            out.append((key, value))
        elif isinstance(value, dict) and value.get("t") == "tensor" and "dtensor" not in value:
            index = value.get("i")
            if type(index) is int:
                out.append((key, index))
    return out


def dotted(path: tuple) -> str:
    """A key path as a dotted name (``("model", "fc", "weight")`` → ``"model.fc.weight"``)."""
    return ".".join(str(part) for part in path)


def tensor_names(meta: dict, count: int) -> list[str | None]:
    """The dotted key path of each of ``count`` tensors (None for a tensor no key path reaches):
    the names a file gives the storages a single tensor covers."""
    paths = tensor_paths(meta)
    return [dotted(paths[i]) if i in paths else None for i in range(count)]


def leaf_values(meta: dict) -> list[tuple[str, Any]]:
    """``(dotted key path, stored value)`` of every non-tensor leaf of the encoded tree."""
    out: list[tuple[str, Any]] = []

    def walk(node: Any, path: list[str]) -> None:
        if type(node) is int:  # a tensor place
            return
        kind = node.get("t")
        if kind in ("dict", "odict"):
            for key, child in node["items"]:
                walk(child, path + [key if type(key) is str else str(key.get("v"))])
        elif kind in ("list", "tuple", "namedtuple"):
            for index, child in enumerate(node["items"]):
                walk(child, path + [str(index)])
        elif kind != "tensor":
            out.append((".".join(path) or "<root>", node.get("v", kind)))

    walk(meta["tree"], [])
    return out


def tensors_by_path(state_dict: Any, leaf_types: tuple[type, ...] = (torch.Tensor,)) -> dict[tuple, Any]:
    """key path → tensor, for every tensor leaf (an instance of ``leaf_types``) of a live
    state_dict (dicts, lists, tuples)."""
    out: dict[tuple, Any] = {}

    def walk(value: Any, path: tuple) -> None:
        if isinstance(value, leaf_types):
            out[path] = value
        elif isinstance(value, dict):
            for key, child in value.items():
                walk(child, path + (key,))
        elif isinstance(value, (list, tuple)):
            for i, child in enumerate(value):
                walk(child, path + (i,))

    walk(state_dict, ())
    return out
