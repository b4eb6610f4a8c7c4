"""ShardedTensor leaves (FSDP1's ``SHARDED_STATE_DICT``): carried the way PyTorch's PGTransport
carries them.

A ShardedTensor is its local shards (plain tensors the engine stages, sends and writes like any
other leaf) plus its metadata: each local shard's offsets and sizes, and the global
``ShardedTensorMetadata`` (global size, tensor properties, every rank's shard). The plan records
one :class:`ShardedRecord` per distinct ShardedTensor; the tree describes it as plain JSON
(:func:`encode`, :func:`decode`, no pickle). :func:`build_all` rebuilds the ShardedTensors over
the staged or received local tensors as PyTorch's receive does: the sender's shard offsets and
sizes, placed on this rank (``rank:<this rank>/<device>``), under the sender's global metadata
(``ShardedTensor._init_from_local_shards_and_global_metadata``). That needs
``torch.distributed`` to be initialized, as every ShardedTensor does; without it (a file loaded
outside a job) the key is named in a StagerError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ._native import StagerError
from .json_checks import fail, is_int_list

__all__ = ["ShardedRecord", "build_all", "decode", "encode", "record_of"]

_MAX_SHARDS = 1 << 20
_PLACEMENT = re.compile(r"rank:\d{1,9}/[A-Za-z0-9_:.\-]{1,64}")
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}


@dataclass(slots=True)
class ShardedRecord:
    """One ShardedTensor of a plan: its local shards' tensor indices with their ``(offsets,
    sizes)``, and the global ``ShardedTensorMetadata``."""

    tensors: list[int]
    local: list[tuple[list[int], list[int]]]
    metadata: Any


def record_of(value: Any, tensor_slot: Any) -> ShardedRecord:
    """The record of live ShardedTensor ``value``; ``tensor_slot(t)`` makes ``t`` a plan leaf."""
    shards = value.local_shards()
    return ShardedRecord([tensor_slot(shard.tensor) for shard in shards],
                         [(list(shard.metadata.shard_offsets), list(shard.metadata.shard_sizes)) for shard in shards],
                         value.metadata())


def build_all(staged: list[Any], records: list[ShardedRecord], where: list[str]) -> list[Any]:
    """One ShardedTensor per record over the staged local tensors (see the module doc)."""
    if not records:
        return []
    import torch.distributed as dist
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    out = []
    for number, record in enumerate(records):
        key = where[number] if number < len(where) else "root"
        if not dist.is_available() or not dist.is_initialized():
            raise StagerError(f"cannot rebuild the ShardedTensor at {key}: a ShardedTensor needs torch.distributed "
                              "to be initialized (init_process_group) where it is loaded or received")
        rank = dist.get_rank()
        locals_ = [staged[index] for index in record.tensors]
        properties = record.metadata.tensor_properties
        if locals_ and properties.pin_memory != locals_[0].is_pinned():  # host buffers may be pinned
            properties = TensorProperties(properties.dtype, properties.layout, properties.requires_grad,
                                          properties.memory_format, locals_[0].is_pinned(), properties.strides)
        metadata = ShardedTensorMetadata(record.metadata.shards_metadata, record.metadata.size, properties)
        try:
            shards = [Shard(tensor=tensor, metadata=ShardMetadata(shard_offsets=list(offsets), shard_sizes=list(sizes),
                                                                  placement=f"rank:{rank}/{tensor.device.type}"))
                      for tensor, (offsets, sizes) in zip(locals_, record.local)]
            out.append(ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata))
        except (ValueError, RuntimeError, TypeError, AssertionError, IndexError) as err:
            raise StagerError(f"cannot rebuild the ShardedTensor at {key}: {err}") from None
    return out


# ---- JSON ----------------------------------------------------------------------------------------


def encode(record: ShardedRecord, where: str) -> dict[str, Any]:
    """The tree node of a ShardedTensor (without pickle)."""
    meta = record.metadata
    properties = meta.tensor_properties
    formats = {value: name for name, value in _MEMORY_FORMATS.items()}
    if properties.memory_format not in formats or properties.layout != torch.strided:
        raise StagerError(f"cannot persist or send the ShardedTensor at {where}: its layout {properties.layout} / "
                          f"memory format {properties.memory_format} has no description")
    shards = []
    for shard in meta.shards_metadata:
        placement = str(shard.placement)
        if not _PLACEMENT.fullmatch(placement):
            raise StagerError(f"cannot persist or send the ShardedTensor at {where}: shard placement {placement!r} "
                              "is not of the form rank:<n>/<device>")
        shards.append([list(shard.shard_offsets), list(shard.shard_sizes), placement])
    return {
        "t": "sharded",
        "local": [[index, offsets, sizes] for index, (offsets, sizes) in zip(record.tensors, record.local)],
        "size": list(meta.size),
        "dtype": str(properties.dtype).removeprefix("torch."),
        "requires_grad": bool(properties.requires_grad),
        "pin_memory": bool(properties.pin_memory),
        "memory_format": formats[properties.memory_format],
        "strides": list(properties.strides) if properties.strides is not None else None,
        "shards": shards,
    }


def _fail(where: str, reason: str) -> StagerError:
    return fail(f"{where}: ShardedTensor {reason}")


def _ints(value: Any, where: str, what: str, ndim: int | None = None) -> list[int]:
    if not is_int_list(value, length=ndim):
        raise _fail(where, f"{what} must be a list of {ndim if ndim is not None else 'at most 64'} integers >= 0")
    return value


def decode(item: dict, where: str, count: int, dtypes: dict[str, torch.dtype]) -> ShardedRecord:
    """Validates a ``sharded`` tree node (untrusted input); ``count``: the plan's tensors."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    size = _ints(item.get("size"), where, "size")
    ndim = len(size)
    name: Any = item.get("dtype")
    dtype = dtypes.get(name) if type(name) is str else None
    if dtype is None:
        raise _fail(where, f"has unknown dtype {name!r}")
    format_name: Any = item.get("memory_format")
    memory_format = _MEMORY_FORMATS.get(format_name)
    if memory_format is None:
        raise _fail(where, f"has unknown memory_format {format_name!r}")
    flags: list[Any] = [item.get("requires_grad"), item.get("pin_memory")]
    if not all(type(flag) is bool for flag in flags):
        raise _fail(where, "requires_grad and pin_memory must be booleans")
    strides = item.get("strides")
    if strides is not None:
        strides = tuple(_ints(strides, where, "strides", ndim))
    local, shards = item.get("local"), item.get("shards")
    if type(local) is not list or type(shards) is not list or not shards or len(shards) > _MAX_SHARDS \
            or len(local) > len(shards):
        raise _fail(where, "needs lists of local shards and of (at least one) global shards")
    tensors, pieces = [], []
    for entry in local:
        if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not int or not 0 <= entry[0] < count:
            raise _fail(where, f"local shard {entry!r} must be [tensor index < {count}, offsets, sizes]")
        tensors.append(entry[0])
        pieces.append((_ints(entry[1], where, "shard offsets", ndim), _ints(entry[2], where, "shard sizes", ndim)))
    described = []
    for entry in shards:
        if type(entry) is not list or len(entry) != 3 or type(entry[2]) is not str or not _PLACEMENT.fullmatch(entry[2]):
            raise _fail(where, "global shards must be [offsets, sizes, 'rank:<n>/<device>']")
        try:
            described.append(ShardMetadata(shard_offsets=_ints(entry[0], where, "shard offsets", ndim),
                                           shard_sizes=_ints(entry[1], where, "shard sizes", ndim), placement=entry[2]))
        except (ValueError, RuntimeError, TypeError) as err:
            raise _fail(where, f"shard {entry!r}: {err}") from None
    properties = TensorProperties(dtype, torch.strided, flags[0], memory_format, flags[1], strides)
    return ShardedRecord(tensors, pieces, ShardedTensorMetadata(described, torch.Size(size), properties))
