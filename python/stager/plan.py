"""Plan: the one pass stager makes over a state_dict in Python.

``plan_state_dict`` walks the tree once and produces a :class:`StatePlan`:

* a *skeleton*: the tree with every container rebuilt (same types, same keys) and every
  non-tensor leaf deep-copied, with the tensors' places recorded instead of filled;
* one :class:`StoragePlan` per distinct source storage (views of one storage share one entry),
  each with its place in a single host buffer, 64-byte aligned;
* one :class:`TensorPlan` per distinct tensor: dtype, size, stride, storage offset.

Everything per byte happens afterwards in Rust (the copy engine, the writer, the transport), driven
by the plan's flat lists. :meth:`StatePlan.materialize` then builds the staged tensors over the host
buffer: each source storage gets its own CPU storage, so sharing is kept exactly.
"""

from __future__ import annotations

import copy
import gc
from collections import OrderedDict, defaultdict
from typing import Any

import torch

from ._native import StagerError

__all__ = ["ALIGNMENT", "StatePlan", "StoragePlan", "TensorPlan", "plan_state_dict"]

#: Alignment of every storage inside the host buffer (a cache line; enough for any dtype).
ALIGNMENT = 64

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

    def __init__(self, storage: torch.UntypedStorage, device: torch.device, offset: int) -> None:
        self.storage = storage
        self.address = storage.data_ptr()
        self.nbytes = storage.nbytes()
        self.offset = offset
        self.device = device
        self.users = 0

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


class TensorPlan:
    """One distinct tensor: how to view its storage."""

    __slots__ = ("storage_index", "dtype", "size", "stride", "storage_offset", "numel", "flags")

    # flags
    WHOLE_STORAGE = 1  # contiguous, offset 0, covers its storage exactly
    CONJ = 2
    NEG = 4

    def __init__(self, tensor: torch.Tensor, storage_index: int, storage_nbytes: int) -> None:
        self.storage_index = storage_index
        self.dtype = dtype = tensor.dtype
        self.size = tensor.shape
        self.stride = tensor.stride()
        self.storage_offset = offset = tensor.storage_offset()
        self.numel = tensor.numel()
        flags = 0
        if offset == 0 and storage_nbytes and tensor.nbytes == storage_nbytes and tensor.is_contiguous():
            flags = TensorPlan.WHOLE_STORAGE
        if dtype.is_complex:
            if tensor.is_conj():
                flags |= TensorPlan.CONJ
            if tensor.is_neg():
                flags |= TensorPlan.NEG
        self.flags = flags


class StatePlan:
    """The result of one pass over a state_dict. See the module docstring."""

    def __init__(self) -> None:
        self.holder: list[Any] = [None]  # the root lives in holder[0], so it too can be filled
        self.storages: list[StoragePlan] = []
        self.tensors: list[TensorPlan] = []
        # Tensors that can't be staged by copying their storage's bytes (tensor subclasses,
        # sparse or quantized layouts): (parent, key, tensor), staged through torch.
        self.opaque: list[tuple[Any, Any, torch.Tensor]] = []
        self.fills: list[tuple[Any, Any, int]] = []  # (parent, key, tensor index)
        self.tuples: list[tuple[Any, Any, list, type]] = []  # (parent, key, items, tuple type), post-order
        self.total_nbytes = 0
        # The copy engine's arguments for every CPU storage, gathered during the walk:
        # source addresses, offsets in the host buffer, byte counts, and the storages themselves
        # (which keep the sources alive while the copies run).
        self.cpu_addresses: list[int] = []
        self.cpu_offsets: list[int] = []
        self.cpu_nbytes: list[int] = []
        self.cpu_sources: list[torch.UntypedStorage] = []
        self.device_storages: list[StoragePlan] = []

    @property
    def cpu_storages(self) -> list[StoragePlan]:
        return [s for s in self.storages if s.is_cpu]

    def materialize(self, buffer: Any) -> Any:
        """Builds the staged tree over ``buffer`` (a host buffer of at least ``total_nbytes``).

        The tensors alias the buffer: it must hold the copied bytes before anyone reads them.
        Each source storage becomes one CPU storage, so views that shared a storage still do.
        """
        gc_was_enabled = gc.isenabled()
        gc.disable()  # see plan_state_dict
        try:
            return self._materialize(buffer)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _materialize(self, buffer: Any) -> Any:
        storages = self.storages
        bases: list[torch.Tensor | None] = [None] * len(storages)
        frombuffer = torch.frombuffer
        uint8 = torch.uint8
        staged: list[torch.Tensor] = []
        append = staged.append
        for plan in self.tensors:
            storage = storages[plan.storage_index]
            if plan.flags == TensorPlan.WHOLE_STORAGE and storage.users == 1:
                tensor = frombuffer(buffer, dtype=plan.dtype, count=plan.numel, offset=storage.offset)
                if len(plan.size) != 1:
                    tensor = tensor.view(plan.size)
                append(tensor)
                continue
            base = bases[plan.storage_index]
            if base is None:
                if storage.nbytes:
                    base = frombuffer(buffer, dtype=uint8, count=storage.nbytes, offset=storage.offset)
                else:
                    base = torch.empty(0, dtype=uint8)
                bases[plan.storage_index] = base
            tensor = torch.empty(0, dtype=plan.dtype).set_(
                base.untyped_storage(), plan.storage_offset, plan.size, plan.stride
            )
            if plan.flags & TensorPlan.CONJ:
                tensor = tensor.conj()
            if plan.flags & TensorPlan.NEG:
                tensor = tensor._neg_view()
            append(tensor)
        return self.fill(staged)

    def fill(self, staged: list[Any]) -> Any:
        """Puts ``staged[i]`` in tensor i's places, converts tuples, returns the root."""
        for parent, key, index in self.fills:
            parent[key] = staged[index]
        for parent, key, tensor in self.opaque:
            parent[key] = _stage_opaque(tensor)
        for parent, key, items, tuple_type in self.tuples:
            parent[key] = _make_tuple(tuple_type, items)
        root = self.holder[0]
        # The plan is spent: drop references to the sources and the staged tree.
        self.holder = [None]
        self.fills = []
        self.opaque = []
        self.tuples = []
        return root


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


_QUANTIZED_DTYPES = frozenset(
    getattr(torch, name) for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if hasattr(torch, name)
)


def plan_state_dict(state_dict: Any) -> StatePlan:
    """Walks ``state_dict`` once and returns its :class:`StatePlan`."""
    plan = StatePlan()
    storage_index: dict[int, int] = {}
    tensor_index: dict[int, int] = {}
    memo: dict[int, Any] = {}  # id(container) -> its skeleton; deepcopy memo for other leaves
    keep: list[Any] = []  # keeps memo'd sources alive so their ids stay unique during the walk
    storages = plan.storages
    tensors = plan.tensors
    fills = plan.fills
    cpu_addresses, cpu_offsets, cpu_nbytes, cpu_sources = (
        plan.cpu_addresses, plan.cpu_offsets, plan.cpu_nbytes, plan.cpu_sources
    )
    offset = 0
    Tensor = torch.Tensor
    Parameter = torch.nn.Parameter
    strided = torch.strided
    cpu = torch.device("cpu")
    immutable = _IMMUTABLE_LEAVES
    quantized = _QUANTIZED_DTYPES

    def add_tensor(value: torch.Tensor, parent: Any, key: Any) -> None:
        """Records one tensor leaf; it is filled in at ``parent[key]`` after the copy."""
        nonlocal offset
        index = tensor_index.get(id(value))
        if index is None:
            cls = type(value)
            if (cls is not Tensor and cls is not Parameter) or value.layout is not strided or value.dtype in quantized:
                plan.opaque.append((parent, key, value))
                return
            is_cpu = value.is_cpu
            if not is_cpu and value.is_meta:
                raise StagerError(
                    f"cannot stage a meta tensor (no data) at key {key!r}: materialize it before checkpointing"
                )
            storage = value.untyped_storage()
            sindex = storage_index.get(storage._cdata)
            if sindex is None:
                sindex = len(storages)
                storage_index[storage._cdata] = sindex
                splan = StoragePlan(storage, cpu if is_cpu else value.device, offset)
                storages.append(splan)
                if is_cpu:
                    cpu_addresses.append(splan.address)
                    cpu_offsets.append(offset)
                    cpu_nbytes.append(splan.nbytes)
                    cpu_sources.append(storage)
                else:
                    plan.device_storages.append(splan)
                offset += -(-splan.nbytes // ALIGNMENT) * ALIGNMENT
            else:
                splan = storages[sindex]
            splan.users += 1
            index = len(tensors)
            tensor_index[id(value)] = index
            keep.append(value)
            tensors.append(TensorPlan(value, sindex, splan.nbytes))
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

    # The walk allocates a few objects per tensor; cyclic GC passes over a big tree would
    # triple its cost, and nothing it creates is cyclic garbage.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        plan.holder[0] = visit(state_dict, plan.holder, 0)
    finally:
        # `visit` refers to itself through its closure: break that cycle now, or the skeleton
        # (and later the staged tensors, and with them the pool buffer) waits for the cyclic GC.
        del visit, add_tensor
        if gc_was_enabled:
            gc.enable()
    plan.total_nbytes = offset
    return plan
