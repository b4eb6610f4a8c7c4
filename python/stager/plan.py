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
"""

from __future__ import annotations

import copy
import gc
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import _native

__all__ = ["ALIGNMENT", "StatePlan", "StoragePlan", "TensorPlan", "gc_paused", "plan_state_dict"]

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
                    staged_tensors: list | None = None) -> Any:
        """Builds the staged tree over ``buffer`` (a host buffer of at least ``total_nbytes``).

        The tensors alias the buffer: it must hold the copied bytes before anyone reads them.
        Each source storage becomes one CPU storage, so views that shared a storage still do.
        ``replacements`` (storage index → storage of the same size) makes that storage's tensors
        view the given storage instead (in-place receives, reused bytes). ``staged_tensors``, when
        given, receives the staged tensors in table order.
        """
        with gc_paused():
            staged = self.table.materialize(buffer, replacements)
            if staged_tensors is not None:
                staged_tensors.extend(staged)
            for index in self.table.opaque:
                staged[index] = _stage_opaque(self.leaves[index])
            return self.fill(staged)

    def fill(self, staged: list[Any]) -> Any:
        """Puts ``staged[i]`` in tensor i's places, converts tuples, returns the root."""
        for parent, key, index in self.fills:
            parent[key] = staged[index]
        for parent, key, items, tuple_type in self.tuples:
            parent[key] = _make_tuple(tuple_type, items)
        root = self.holder[0]
        # The plan is spent: drop references to the sources and the staged tree.
        self.holder = [None]
        self.fills = []
        self.tuples = []
        self.leaves = []
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
        return defaultdict(mapping.default_factory)
    clone = copy.copy(mapping)  # keeps a subclass's own attributes
    clone.clear()
    return clone


def plan_state_dict(state_dict: Any, *, track_versions: bool = False) -> StatePlan:
    """Walks ``state_dict`` once and returns its :class:`StatePlan`; ``track_versions`` also
    records each tensor's version counter (incremental staging)."""
    plan = StatePlan()
    tensor_index: dict[int, int] = {}
    memo: dict[int, Any] = {}  # id(container) -> its skeleton; deepcopy memo for other leaves
    keep: list[Any] = []  # keeps memo'd sources alive so their ids stay unique during the walk
    leaves = plan.leaves
    fills = plan.fills
    Tensor = torch.Tensor
    immutable = _IMMUTABLE_LEAVES

    def add_tensor(value: torch.Tensor, parent: Any, key: Any) -> None:
        """Records one tensor leaf; it is filled in at ``parent[key]`` after the copy."""
        index = tensor_index.get(id(value))
        if index is None:
            index = tensor_index[id(value)] = len(leaves)
            leaves.append(value)
        fills.append((parent, key, index))

    def visit(value: Any, parent: Any, key: Any) -> Any:
        cls = type(value)
        if cls in immutable:
            return value
        if cls is Tensor or isinstance(value, Tensor):
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
                if type(v) is Tensor:  # the common leaf, without a call to visit
                    skeleton[k] = None
                    add_tensor(v, skeleton, k)
                else:
                    skeleton[k] = visit(v, skeleton, k)
            return skeleton
        if cls is list:
            seen = memo.get(id(value))
            if seen is not None:
                return seen
            skeleton = []
            memo[id(value)] = skeleton
            keep.append(value)
            for i, v in enumerate(value):
                skeleton.append(visit(v, skeleton, i))
            return skeleton
        if isinstance(value, tuple):
            items: list[Any] = []
            for i, v in enumerate(value):
                items.append(visit(v, items, i))
            plan.tuples.append((parent, key, items, cls))
            return items
        return copy.deepcopy(value, memo)

    with gc_paused():
        try:
            plan.holder[0] = visit(state_dict, plan.holder, 0)
            # Every per-tensor query (storage, address, size, view) in one call, outside the interpreter.
            plan.table = _native.describe_tensors(leaves, track_versions)
        finally:
            # `visit` refers to itself through its closure: break that cycle now, or the skeleton
            # (and later the staged tensors, and with them the pool buffer) waits for the cyclic GC.
            visit = add_tensor = None  # type: ignore[assignment]
    return plan
