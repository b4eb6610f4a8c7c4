"""Plan: the one pass stager makes over a state_dict in Python.

``plan_state_dict`` walks the tree once and produces a :class:`StatePlan`:

* a *skeleton*: the tree with every container rebuilt (same types, same keys) and every
  non-tensor leaf deep-copied, with the tensors' places recorded instead of filled;
* a ``stager._native.TensorTable`` (``plan.table``, built in Rust from the tensors in one call):
  one entry per distinct source storage (views of one storage share one entry), each placed in a
  single host buffer as ``rust/layout.rs`` says, and one per distinct tensor;
* :class:`StoragePlan` / :class:`TensorPlan` views of that table for the Python modules that need
  them (files, transport), built on first use.

Everything per byte happens afterwards in Rust (the copy engine, the writer, the transport), driven
by the table. :meth:`StatePlan.materialize` then builds the staged tensors over the host buffer:
each source storage gets its own CPU storage, so sharing is kept exactly.

A DTensor contributes its local tensor as a leaf like any other, plus a placement record
(:mod:`stager.dtensor`); the staged local tensor is wrapped back into a DTensor when the tree is
filled. Tensors found inside other objects (dataclasses, attributes of custom objects, a tensor's
own Python attributes) are leaves too: such objects are deep-copied once the staged tensors exist,
with every tensor inside replaced by its staged copy, so they come out detached and sharing holds.
"""

from __future__ import annotations

import copy
import copyreg
import gc
import os
import types
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch

from . import _native
from . import dtensor as _dtensor
from . import sharded as _sharded
from ._native import StagerError

#: The deepest nesting a tree may have (the root is depth 0): the reader refuses deeper trees, so
#: the writer refuses them too, before anything is written or sent (tree.py checks it).
MAX_DEPTH = 256

__all__ = ["ALIGNMENT", "PlanCache", "StatePlan", "StoragePlan", "TensorPlan", "gc_paused", "plan_state_dict"]

#: Alignment of every storage inside the host buffer, a file's data section and the wire layout
#: (defined once, in rust/layout.rs).
ALIGNMENT = _native.STORAGE_ALIGNMENT

_CPU = torch.device("cpu")

_IMMUTABLE_LEAVES = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        type(Ellipsis),
        torch.dtype,
        torch.device,
        torch.Size,
        torch.layout,
        torch.memory_format,
    }
)


class StoragePlan:
    """One distinct source storage and where its bytes go in the host buffer."""

    __slots__ = ("storage", "address", "nbytes", "offset", "device", "users")

    def __init__(self, storage: Any, address: int, nbytes: int, offset: int, device: Any, users: int) -> None:
        self.storage = storage  # the source UntypedStorage; None when described by metadata
        self.address = address
        self.nbytes = nbytes
        self.offset = offset
        self.device = device if device is not None else _CPU
        self.users = users

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


class TensorPlan:
    """One distinct tensor: how it views its storage."""

    __slots__ = ("storage_index", "dtype", "size", "stride", "storage_offset", "flags")

    # View flags (rust/layout.rs).
    WHOLE_STORAGE = _native.VIEW_WHOLE_STORAGE  # contiguous, offset 0, covers its storage exactly
    CONJ = _native.VIEW_CONJ
    NEG = _native.VIEW_NEG
    OPAQUE = _native.VIEW_OPAQUE  # not a plain strided tensor: staged through torch

    def __init__(self, storage_index: int, dtype: torch.dtype, size: torch.Size, stride: tuple,
                 storage_offset: int, flags: int) -> None:
        self.storage_index = storage_index
        self.dtype = dtype
        self.size = size
        self.stride = stride
        self.storage_offset = storage_offset
        self.flags = flags


class StatePlan:
    """The result of one pass over a state_dict. See the module docstring.

    ``table`` (a ``stager._native.TensorTable``) holds the flat description the engine works
    from; ``storages`` and ``tensors`` present it as Python objects for the modules that need
    them (files, transport), built on first use.
    """

    def __init__(self) -> None:
        self.holder: list[Any] = [None]  # the root lives in holder[0], so it too can be filled
        self.leaves: list[torch.Tensor] = []  # distinct source tensors; tensor index = position
        self.fills: list[tuple[Any, Any, int]] = []  # (parent, key, tensor index)
        self.tuples: list[tuple[Any, Any, list, type]] = []  # (parent, key, items, tuple type), post-order
        # DTensors: (local tensor index, placement) per distinct DTensor, and their places.
        self.dtensors: list[tuple[int, Any]] = []
        self.dtensor_fills: list[tuple[Any, Any, int]] = []
        #: Decoded plans: the meshes described (``dtensor.MeshInfo``) and the reader's own meshes
        #: to rebuild DTensors on (``dtensor.bind_meshes``); without them, LocalShards.
        self.mesh_infos: list[Any] = []
        self.mesh_binding: Any = None
        self.dtensor_where: list[str] = []  # decoded plans: each DTensor's first key, for errors
        # ShardedTensors (``sharded.ShardedRecord`` per distinct one), their places, and (decoded
        # plans) each one's first key.
        self.sharded: list[Any] = []
        self.sharded_fills: list[tuple[Any, Any, int]] = []
        self.sharded_where: list[str] = []
        #: Objects holding tensors, deep-copied after staging (see :class:`_DeferredCopies`).
        self.deferred: _DeferredCopies | None = None
        self.table: Any = None
        self._storages: list[StoragePlan] | None = None
        self._tensors: list[TensorPlan] | None = None

    @property
    def total_nbytes(self) -> int:
        return self.table.total_nbytes

    @property
    def storages(self) -> list[StoragePlan]:
        if self._storages is None:
            table = self.table
            self._storages = [
                StoragePlan(*fields)
                for fields in zip(
                    table.storage_objects, table.storage_addresses, table.storage_nbytes,
                    table.storage_offsets, table.storage_devices, table.storage_users,
                )
            ]
        return self._storages

    @property
    def tensors(self) -> list[TensorPlan]:
        if self._tensors is None:
            table = self.table
            self._tensors = [
                TensorPlan(*fields)
                for fields in zip(
                    table.tensor_storage, table.tensor_dtypes, table.tensor_shapes,
                    table.tensor_strides, table.tensor_offsets, table.tensor_flags,
                )
            ]
        return self._tensors

    @property
    def device_storages(self) -> list[tuple[int, StoragePlan]]:
        """``(index, storage)`` of the storages that live on an accelerator (copied by the device
        path, not the copy engine)."""
        if not any(device is not None for device in self.table.storage_devices):
            return []
        return [(index, storage) for index, storage in enumerate(self.storages) if not storage.is_cpu]

    @property
    def opaque(self) -> list[tuple[None, int, torch.Tensor]]:
        """Tensors that are not plain strided tensors: (None, tensor index, tensor)."""
        return [(None, index, self.leaves[index]) for index in self.table.opaque]

    def materialize(self, buffer: Any, replacements: dict[int, torch.UntypedStorage] | None = None,
                    staged_tensors: list | None = None, previous: list | None = None) -> Any:
        """Builds the staged tree over ``buffer`` (a host buffer of at least ``total_nbytes``).

        The tensors alias the buffer: it must hold the copied bytes before anyone reads them.
        Each source storage becomes one CPU storage, so views that shared a storage still do.
        ``replacements`` (storage index → storage of the same size) makes that storage's tensors
        view the given storage instead (in-place receives, reused bytes). ``staged_tensors``, when
        given, receives the staged tensors in table order. ``previous`` (an earlier result's
        ``staged_tensors`` for a table like this one) lets the tensors of replaced storages be
        aliases of the earlier ones where those still fit (``TensorTable.materialize``).
        """
        with gc_paused():
            staged = self.table.materialize(buffer, replacements, previous)
            if staged_tensors is not None:
                staged_tensors.extend(staged)
            for index in self.table.opaque:
                staged[index] = _stage_opaque(self.leaves[index])
            return self.fill(staged)

    def fill(self, staged: list[Any]) -> Any:
        """Puts ``staged[i]`` in tensor i's places, converts tuples, returns the root."""
        for parent, key, index in self.fills:
            parent[key] = staged[index]
        wrapped: list[Any] = []
        if self.dtensors:
            wrapped = _dtensor.wrap_all(staged, self.dtensors, self.mesh_binding, self.dtensor_where)
            for parent, key, index in self.dtensor_fills:
                parent[key] = wrapped[index]
        if self.sharded:
            _fill_sharded(self, staged)
        if self.deferred is not None:
            self.deferred.run(staged, wrapped)
        for parent, key, items, tuple_type in self.tuples:
            parent[key] = _make_tuple(tuple_type, items)
        root = self.holder[0]
        # The plan is spent: drop references to the sources and the staged tree.
        self.holder = [None]
        self.fills = []
        self.dtensor_fills = []
        self.sharded_fills = []
        self.tuples = []
        self.leaves = []
        self.deferred = None
        return root


@contextmanager
def gc_paused() -> Iterator[None]:
    """Cyclic GC off while walking or building big trees and metadata: they allocate tens of
    thousands of objects, none of them garbage, and GC passes over them would cost more than
    the work itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _make_tuple(tuple_type: type, items: list) -> tuple:
    if tuple_type is tuple:
        return tuple(items)
    if hasattr(tuple_type, "_fields"):  # namedtuple
        return tuple_type(*items)
    return tuple_type(items)


def _stage_opaque(tensor: torch.Tensor) -> torch.Tensor:
    """Stages a tensor whose bytes are not one strided storage (subclass, sparse, quantized)."""
    return tensor.detach().to("cpu", copy=True)


def _empty_like_mapping(mapping: dict) -> dict:
    cls = type(mapping)
    if cls is dict:
        return {}
    if cls is OrderedDict:
        return OrderedDict()
    if cls is defaultdict:
        return defaultdict(cast(defaultdict, mapping).default_factory)
    clone = copy.copy(mapping)  # keeps a subclass's own attributes
    clone.clear()
    return clone


class _DeferredCopies:
    """Objects that hold tensors (dataclasses, custom objects, a tensor's own attributes), copied
    once the staged tensors exist: ``copy.deepcopy`` with a memo that maps every source tensor
    inside them to its staged copy, so those come out detached and shared like any other leaf,
    and the objects keep whatever else deepcopy gives them."""

    def __init__(self, root: Any, memo: dict, keep: list) -> None:
        self.root = root  # only to name a key path in errors
        self.memo = memo  # the walk's memo: containers already rebuilt, objects already copied
        self.keep = keep
        self.seeds: list[tuple[int, bool, int]] = []  # (id(source), is a DTensor, index)
        self.objects: list[tuple[Any, Any, Any]] = []  # (parent, key, source object)
        self.attributes: list[tuple[bool, int, Any]] = []  # (is a DTensor, index, source tensor)

    def run(self, staged: list[Any], wrapped: list[Any]) -> None:
        memo = self.memo
        for source_id, is_dtensor, index in self.seeds:
            memo[source_id] = wrapped[index] if is_dtensor else staged[index]
        for is_dtensor, index, source in self.attributes:
            target = wrapped[index] if is_dtensor else staged[index]
            target.__dict__.update(self.copy(_own_attributes(source), source))
        for parent, key, source in self.objects:
            parent[key] = self.copy(source, source)

    def copy(self, value: Any, source: Any) -> Any:
        try:
            return copy.deepcopy(value, self.memo)
        except Exception as err:
            raise _uncopyable(self.root, source, err) from err


def _own_attributes(tensor: Any) -> dict | None:
    """A tensor's Python attributes worth keeping (``t.my_attr = ...``), else None. ``_is_param``
    marks an nn.Parameter: staged tensors are plain, so it is left behind."""
    attributes = tensor.__dict__
    if not attributes or (len(attributes) == 1 and "_is_param" in attributes):
        return None
    return {k: v for k, v in attributes.items() if k != "_is_param"}


#: Types deepcopy returns as they are: nothing inside them is staged.
_ATOMIC_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
                 types.CodeType, weakref.ref, property)
_PLAIN_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
_FLAT_BUFFERS = frozenset({bytearray, memoryview})


def _tensors_inside(value: Any) -> dict[int, torch.Tensor]:
    """Every tensor reachable from ``value`` the way deepcopy reaches it (containers, then each
    object's ``__reduce_ex__`` arguments and state), by id. An object that cannot be reduced shows
    nothing; deepcopy then decides what becomes of it."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [value]
    while stack:
        value = stack.pop()
        cls = type(value)
        if cls in _IMMUTABLE_LEAVES or issubclass(cls, _ATOMIC_TYPES) or cls in _FLAT_BUFFERS:
            continue
        if isinstance(value, torch.Tensor):
            found[id(value)] = value
            continue
        if cls.__module__ == "numpy" and getattr(getattr(value, "dtype", None), "hasobject", True) is False:
            continue  # a numpy array or scalar of numbers: reducing it would copy its bytes
        if id(value) in seen:
            continue
        seen.add(id(value))
        if cls in _PLAIN_CONTAINERS:
            if cls is dict:
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
            continue
        try:
            reductor = copyreg.dispatch_table.get(cls)
            reduced = reductor(value) if reductor is not None else value.__reduce_ex__(4)
        except Exception:
            continue
        if isinstance(reduced, tuple):
            for part in reduced[1:]:
                if part is None:
                    continue
                if isinstance(part, Iterator):
                    try:
                        part = list(part)
                    except Exception:
                        continue
                stack.append(part)
    return found


def key_path(root: Any, target: Any) -> str:
    """Where ``target`` (by identity) sits in ``root``, as errors name it: ``root.model.w[0]``;
    objects' attributes count as keys. Only for error messages: a walk of its own."""
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, "root")]
    while stack:
        value, where = stack.pop()
        if value is target:
            return where
        if id(value) in seen or type(value) in _IMMUTABLE_LEAVES:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}") for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif not isinstance(value, torch.Tensor) and hasattr(value, "__dict__"):
            try:
                stack.extend((v, f"{where}.{k}") for k, v in vars(value).items())
            except TypeError:
                pass
    return "root"


def _uncopyable(root: Any, value: Any, err: BaseException) -> StagerError:
    cls = type(value)
    return StagerError(
        f"cannot stage the {cls.__module__}.{cls.__qualname__} at {key_path(root, value)}: "
        f"copying it failed ({type(err).__name__}: {err})"
    )


def _refuse_sharded_tensor(root: Any, value: Any) -> StagerError:
    return StagerError(
        f"cannot stage the ShardedTensor at {key_path(root, value)}: ShardedTensor is not supported "
        "(use DTensor, e.g. FSDP2 / torch.distributed.tensor)"
    )


class PlanCache:
    """The last table one stager described, reused while it still describes the tensors.

    A training loop stages the same tensor objects with the same shapes every step, so the
    per-tensor description (storage, address, size, view: the largest per-tensor cost of a
    stage) is the same too. The next stage's leaves are checked against it in one Rust call
    (``TensorTable.revalidated``: the same live tensor objects in the same order, with the same
    dtype, shape, stride, data pointer and storage size); anything else describes them afresh
    and replaces the entry. One entry per stager, holding weak references and no source memory.
    The tree itself is walked every stage (the skeleton is the result), so containers, keys and
    non-tensor leaves are always current.
    """

    __slots__ = ("table", "hits", "misses", "last_hit", "enabled")

    def __init__(self) -> None:
        #: ``STAGER_PLAN_CACHE=0`` describes every stage afresh (A/B timing, debugging).
        self.enabled = os.environ.get("STAGER_PLAN_CACHE", "1") != "0"
        self.table: Any = None
        self.hits = 0
        self.misses = 0
        #: Whether the last description came from the cache (the same tensor order as before).
        self.last_hit = False

    def describe(self, leaves: list[torch.Tensor], track_versions: bool, root: Any) -> Any:
        if not self.enabled:
            self.misses += 1
            return _describe_tensors(leaves, track_versions, root)
        cached = self.table
        if cached is not None:
            try:
                table = cached.revalidated(leaves, track_versions)
            except Exception:  # a tensor whose metadata cannot be read: the full path says why
                table = None
            if table is not None:
                self.hits += 1
                self.last_hit = True
                return table
        self.table = None
        self.last_hit = False
        self.misses += 1
        table = _describe_tensors(leaves, track_versions, root, cacheable=True)
        self.table = table.without_storages()
        return table

    def clear(self) -> None:
        self.table = None
        self.last_hit = False


def plan_state_dict(state_dict: Any, *, track_versions: bool = False, cache: PlanCache | None = None) -> StatePlan:
    """Walks ``state_dict`` once and returns its :class:`StatePlan`; ``track_versions`` also
    records each tensor's version counter (incremental staging); ``cache`` reuses the previous
    description of the same tensors (:class:`PlanCache`)."""
    plan = StatePlan()
    tensor_index: dict[int, int] = {}
    dtensor_index: dict[int, int] = {}
    sharded_index: dict[int, int] = {}
    memo: dict[int, Any] = {}  # id(container) -> its skeleton; deepcopy memo for other leaves
    keep: list[Any] = []  # keeps memo'd sources alive so their ids stay unique during the walk
    leaves = plan.leaves
    fills = plan.fills
    dtensors = plan.dtensors
    dtensor_fills = plan.dtensor_fills
    Tensor = torch.Tensor
    immutable = _IMMUTABLE_LEAVES
    dtensor_type = _dtensor.DTENSOR
    dtensor_types = (dtensor_type, _dtensor.LocalShard) if dtensor_type is not None else ()
    sharded_types = (_dtensor.SHARDED_TENSOR,) if _dtensor.SHARDED_TENSOR is not None else ()

    def deferred() -> _DeferredCopies:
        if plan.deferred is None:
            plan.deferred = _DeferredCopies(state_dict, memo, keep)
        return plan.deferred

    def tensor_slot(value: torch.Tensor) -> int:
        """The index of tensor ``value`` (a new leaf the first time it is seen)."""
        index = tensor_index.get(id(value))
        if index is None:
            index = tensor_index[id(value)] = len(leaves)
            leaves.append(value)
            if value.__dict__:
                keep_attributes(index, value)
        return index

    def keep_attributes(index: int, value: torch.Tensor) -> None:
        """A tensor's own Python attributes are copied onto its staged tensor (tensors in them too)."""
        if _own_attributes(value) is not None:
            deferred().attributes.append((False, index, value))
            stage_inside(value.__dict__)

    def dtensor_slot(value: Any) -> int:
        """The index of DTensor (or LocalShard) ``value``: its local tensor is a leaf."""
        index = dtensor_index.get(id(value))
        if index is not None:
            return index
        index = dtensor_index[id(value)] = len(dtensors)
        if type(value) is dtensor_type:
            local = value._local_tensor
            local_index = tensor_index.get(id(local))
            if local_index is None:
                local_index = tensor_slot(local)
            dtensors.append((local_index, value._spec))
            if value.__dict__ and _own_attributes(value) is not None:
                deferred().attributes.append((True, index, value))
                stage_inside(value.__dict__)
        else:
            dtensors.append((tensor_slot(_dtensor.local_tensor_of(value)), _dtensor.placement_of(value)))
        return index

    def stage_inside(value: Any) -> bool:
        """Makes every tensor inside ``value`` a leaf; True if there was one."""
        inside = _tensors_inside(value)
        for tensor in inside.values():
            if isinstance(tensor, dtensor_types):
                deferred().seeds.append((id(tensor), True, dtensor_slot(tensor)))
            elif isinstance(tensor, sharded_types):
                raise _refuse_sharded_tensor(state_dict, tensor)
            else:
                deferred().seeds.append((id(tensor), False, tensor_slot(tensor)))
        return bool(inside)

    def add_tensor(value: torch.Tensor, parent: Any, key: Any) -> None:
        """Records one tensor leaf; it is filled in at ``parent[key]`` after the copy."""
        index = tensor_index.get(id(value))
        if index is None:  # tensor_slot, inlined: this is the hot path
            index = tensor_index[id(value)] = len(leaves)
            leaves.append(value)
            if value.__dict__:
                keep_attributes(index, value)
        fills.append((parent, key, index))

    def visit(value: Any, parent: Any, key: Any) -> Any:
        cls = type(value)
        if cls in immutable:
            return value
        if cls is Tensor or isinstance(value, Tensor):
            if isinstance(value, dtensor_types):
                dtensor_fills.append((parent, key, dtensor_slot(value)))
            elif isinstance(value, sharded_types):
                plan.sharded_fills.append((parent, key, _sharded_slot(plan, sharded_index, value, tensor_slot)))
            else:
                add_tensor(value, parent, key)
            return None
        if isinstance(value, dict):
            seen = memo.get(id(value))
            if seen is not None:
                return seen
            skeleton = _empty_like_mapping(value)
            memo[id(value)] = skeleton
            keep.append(value)
            for k, v in value.items():
                if type(v) is Tensor:  # the common leaves: add_tensor, inlined (no call per tensor)
                    skeleton[k] = None
                    index = tensor_index.get(id(v))
                    if index is None:
                        index = tensor_index[id(v)] = len(leaves)
                        leaves.append(v)
                        if v.__dict__:
                            keep_attributes(index, v)
                    fills.append((skeleton, k, index))
                elif type(v) is dtensor_type:  # FSDP2's leaves: dtensor_slot, inlined
                    skeleton[k] = None
                    index = dtensor_index.get(id(v))
                    if index is None:
                        if v.__dict__:
                            index = dtensor_slot(v)
                        else:
                            local = v._local_tensor
                            local_index = tensor_index.get(id(local))
                            if local_index is None:
                                local_index = tensor_index[id(local)] = len(leaves)
                                leaves.append(local)
                                if local.__dict__:
                                    keep_attributes(local_index, local)
                            index = dtensor_index[id(v)] = len(dtensors)
                            dtensors.append((local_index, v._spec))
                    dtensor_fills.append((skeleton, k, index))
                else:
                    skeleton[k] = visit(v, skeleton, k)
            return skeleton
        if cls is list:
            seen = memo.get(id(value))
            if seen is not None:
                return seen
            items_skeleton: list[Any] = []
            memo[id(value)] = items_skeleton
            keep.append(value)
            for i, v in enumerate(value):
                items_skeleton.append(visit(v, items_skeleton, i))
            return items_skeleton
        if isinstance(value, tuple):
            items: list[Any] = []
            for i, v in enumerate(value):
                items.append(visit(v, items, i))
            plan.tuples.append((parent, key, items, cls))
            return items
        if cls is _dtensor.LocalShard:
            dtensor_fills.append((parent, key, dtensor_slot(value)))
            return None
        if id(value) not in memo and stage_inside(value):
            deferred().objects.append((parent, key, value))
            return None
        try:
            return copy.deepcopy(value, memo)
        except Exception as err:
            raise _uncopyable(state_dict, value, err) from err

    with gc_paused():
        try:
            plan.holder[0] = visit(state_dict, plan.holder, 0)
            # Every per-tensor query (storage, address, size, view) in one call, outside the interpreter.
            if cache is not None:
                plan.table = cache.describe(leaves, track_versions, state_dict)
            else:
                plan.table = _describe_tensors(leaves, track_versions, state_dict)
        except RecursionError:
            raise _nested_too_deeply(state_dict) from None
        finally:
            # `visit` refers to itself through its closure: break that cycle now, or the skeleton
            # (and later the staged tensors, and with them the pool buffer) waits for the cyclic GC.
            visit = add_tensor = tensor_slot = keep_attributes = dtensor_slot = stage_inside = deferred = None  # type: ignore[assignment]
    return plan


# ---- refusals that name the key (kept apart from the walk above) ---------------------------------


def _describe_tensors(leaves: list[torch.Tensor], track_versions: bool, root: Any, cacheable: bool = False) -> Any:
    """``_native.describe_tensors``; a tensor it refuses (a view reaching past its storage) is
    named by its key path."""
    try:
        return _native.describe_tensors(leaves, track_versions, cacheable)
    except StagerError as err:
        index = getattr(err, "tensor_index", None)
        if type(index) is not int or not 0 <= index < len(leaves):
            raise
        raise StagerError(f"cannot stage the tensor at {_tensor_key(root, leaves[index])}: {err}") from None


def _tensor_key(root: Any, tensor: torch.Tensor) -> str:
    """The key path of ``tensor`` in ``root``, or of the DTensor (or LocalShard) whose local
    tensor it is."""
    local_types = (_dtensor.LocalShard,) + ((_dtensor.DTENSOR,) if _dtensor.DTENSOR is not None else ())
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, "root")]
    while stack:
        value, where = stack.pop()
        if value is tensor or (isinstance(value, local_types) and _dtensor.local_tensor_of(value) is tensor):
            return where
        if id(value) in seen or type(value) in _IMMUTABLE_LEAVES or isinstance(value, torch.Tensor):
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((v, f"{where}.{k}") for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif hasattr(value, "__dict__"):
            try:
                stack.extend((v, f"{where}.{k}") for k, v in vars(value).items())
            except TypeError:
                pass
    return "root"


def _nested_too_deeply(root: Any) -> StagerError:
    """The StagerError for a state_dict whose walk ran out of Python's recursion limit, naming
    the deepest key path (shortened: a 100,000-level path would be megabytes of message)."""
    path, depth = _deepest_path(root)
    shown = "".join(path) if len(path) <= 12 else "".join(path[:8]) + "..." + "".join(path[-3:])
    return StagerError(
        f"cannot stage the state_dict: it is nested {depth} containers deep at root{shown}, more than "
        "Python's recursion limit allows (stager files and the wire hold at most "
        f"{MAX_DEPTH} levels)"
    )


def _deepest_path(root: Any) -> tuple[list[str], int]:
    """The key path (one ``.key`` / ``[i]`` part per level) to the deepest container of
    ``root`` (dicts, lists, tuples), without recursion; each container is entered once."""
    best: tuple[int, int] = (0, -1)  # (depth, node)
    nodes: list[tuple[int, str]] = []  # (parent node, key part)
    seen: set[int] = set()
    stack: list[tuple[Any, int, int]] = [(root, 0, -1)]
    while stack:
        value, depth, node = stack.pop()
        if not isinstance(value, (dict, list, tuple)) or id(value) in seen:
            continue
        seen.add(id(value))
        if depth > best[0]:
            best = (depth, node)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        is_dict = isinstance(value, dict)
        for key, child in items:
            if isinstance(child, (dict, list, tuple)):
                nodes.append((node, f".{key}" if is_dict else f"[{key}]"))
                stack.append((child, depth + 1, len(nodes) - 1))
    path: list[str] = []
    node = best[1]
    while node >= 0:
        node, part = nodes[node]
        path.append(part)
    path.reverse()
    return path, best[0]


# ---- ShardedTensor leaves (kept apart from the walk above) ---------------------------------------


def _sharded_slot(plan: StatePlan, index_of: dict[int, int], value: Any, tensor_slot: Any) -> int:
    """The index of ShardedTensor ``value`` in ``plan.sharded``; its local shards become leaves."""
    index = index_of.get(id(value))
    if index is None:
        index = index_of[id(value)] = len(plan.sharded)
        plan.sharded.append(_sharded.record_of(value, tensor_slot))
    return index


def _fill_sharded(plan: StatePlan, staged: list[Any]) -> None:
    """Puts the rebuilt ShardedTensors in their places (see :mod:`stager.sharded`)."""
    where = plan.sharded_where or [_sharded_key(plan, number) for number in range(len(plan.sharded))]
    built = _sharded.build_all(staged, plan.sharded, where)
    for parent, key, index in plan.sharded_fills:
        parent[key] = built[index]
    plan.sharded = []


def _sharded_key(plan: StatePlan, number: int) -> str:
    """Names ShardedTensor ``number`` of a staging plan (which keeps no key paths) by its key."""
    for _, key, index in plan.sharded_fills:
        if index == number:
            return f"key {key!r}"
    return "root"
