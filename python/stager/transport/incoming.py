"""The incoming side: one receive in progress, header → metadata [→ delta] → segments, into the
pool, a buffer the caller chose, or the tensors of an in-place state_dict.

:class:`Incoming` is what the transport's callbacks get. What its users may read: ``rank``,
``plan`` and ``meta`` (once the metadata landed), ``buffer`` (where the segments land, once
prepared), ``replacements`` (the storages an incremental receive takes from its base), and the
storage-landed hook (:meth:`Incoming.on_storage_landed`), which says when each storage's bytes
are all in the buffer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.graph import increment_version

from .. import dtensor
from .._native import StagerError
from ..plan import StatePlan, TensorPlan, gc_paused
from ..tree import decode, dotted, tensor_paths, tensors_by_path
from .delta import ReceivedStorages, _base_problem, _decode_delta, _delta_layout
from .errors import PROTOCOL, TransportError
from .wire import (
    _HEADER_BYTES,
    _MAGIC,
    _MAX_DELTA_BYTES,
    _MAX_META_BYTES,
    _STATUS_OK,
    _VERSION,
    Segment,
    _read_header,
    _storage_bytes,
    segments_of,
)

if TYPE_CHECKING:
    from .pg import PGTransport

class Incoming:
    """One receive in progress: header → metadata → segments into the pool (or in place).

    ``inplace`` is a state_dict whose tensors receive the bytes where the key path and the
    storage size match. With ``strict`` (restore) every tensor must find one of the same dtype and
    shape, else nothing is received in place and :attr:`mismatch` says which key did not fit; and
    a storage is received in place only into a target that views it exactly as the sender's
    tensor does (the caller copies the others' values in afterwards).

    An incremental receive (:attr:`base_storages` set before the metadata is posted) also takes
    the delta message, switches to the delta layout (:meth:`apply_delta`) and builds the result
    with the reused storages taken from the base (:attr:`replacements`); in-place targets are
    not used then."""

    def __init__(self, transport: PGTransport, rank: int, seq: int, inplace: Any = None,
                 strict: bool = False) -> None:
        self.transport = transport
        self.rank = rank
        self.seq = seq
        self.inplace = inplace
        self.strict = strict
        self.header = torch.zeros(_HEADER_BYTES, dtype=torch.uint8)
        self.raw_meta: torch.Tensor | None = None
        self._plan: StatePlan | None = None
        self._meta: dict | None = None
        self.sent: list[StatePlan] = []  # what this rank sends in the same call (its own meshes)
        self.segments: list[Segment] = []
        self.targets: dict[int, torch.UntypedStorage] = {}
        self.buffer: Any = bytearray(0)
        self.views: list[torch.Tensor] = []
        self.remaining = 0
        self.mismatch: str | None = None
        self.result: Any = None
        self.done = False
        self.failed = False  # a callback failed: no more callbacks for this source
        self._announced = (0, 0, 0, 0)
        #: From the header: the id of this sending, of the base a delta is against, the delta's length.
        self.sending = 0
        self.base = 0
        self.delta_len = 0
        #: The base storages this rank holds for an incremental receive (None: a full receive).
        self.base_storages: list[torch.UntypedStorage | None] | None = None
        self.raw_delta: torch.Tensor | None = None
        self.parts = 1  # metadata messages still to land before the segments can be posted
        #: storage index → the base storage holding its bytes (incremental receives).
        self.replacements: dict[int, torch.UntypedStorage] = {}
        #: Why the base could not be used (the bytes are received all the same).
        self.base_problem: str | None = None
        #: Of a finished receive from a source that announced a sending: its storages.
        self.storages: ReceivedStorages | None = None
        #: Where a full receive lands instead of the pool (see PGTransport.transfer).
        self.receive_buffer: Callable[[Incoming], Any] | None = None
        self._storage_hooks: list[Callable[[int], None]] = []

    @property
    def plan(self) -> StatePlan:
        """The sender's plan, once its metadata landed (:meth:`read_metadata`)."""
        if self._plan is None:
            raise StagerError(f"the checkpoint metadata from rank {self.rank} has not landed yet")
        return self._plan

    @plan.setter
    def plan(self, plan: StatePlan) -> None:
        self._plan = plan

    @property
    def meta(self) -> dict:
        """The sender's decoded metadata (JSON), once it landed."""
        if self._meta is None:
            raise StagerError(f"the checkpoint metadata from rank {self.rank} has not landed yet")
        return self._meta

    def on_storage_landed(self, hook: Callable[[int], None]) -> None:
        """Calls ``hook(storage_index)`` once all the bytes of that storage of :attr:`plan` are
        in :attr:`buffer`, for each storage, in the transport's calling thread as the segment
        completing it lands (a storage of many chunks with its last chunk; small storages with
        the segment that carries them). Register it from ``on_metadata``, before any segment has
        landed. An exception from the hook is handled like one from a transfer callback: no
        more callbacks for this source, and the call raises :data:`LOCAL` at the end."""
        self._storage_hooks.append(hook)

    def segment_landed(self, index: int) -> None:
        """The transport's notice that segment ``index`` has landed: runs the storage hooks for
        the storages it completes."""
        if not self._storage_hooks:
            return
        segment = self.segments[index]
        if segment.direct:  # chunks of one storage land in order: the last one completes it
            storage = self.plan.storages[segment.first]
            completed = range(segment.first, segment.first + 1 if segment.end == storage.offset + storage.nbytes
                              else segment.first)
        else:
            completed = range(segment.first, segment.last)
        for storage_index in completed:
            for hook in self._storage_hooks:
                hook(storage_index)

    def read_header(self) -> str | None:
        """Checks the header; returns the peer's error message when it could not send (this
        transfer is then over), else None and the metadata receive is to be posted."""
        fields, message = _read_header(self.header)
        magic, version, status, meta_len, total, bucket, chunk, nsegments = fields[:8]
        if magic != _MAGIC or version != _VERSION:
            raise TransportError(PROTOCOL, f"rank {self.rank} sent an unknown checkpoint header (magic {magic:#x}, "
                                 f"version {version}; this stager speaks version {_VERSION}): mismatched stager "
                                 "versions?", self.rank)
        if status != _STATUS_OK:
            self.done = True
            return message or "no reason given"
        if not 0 < meta_len <= _MAX_META_BYTES:
            raise TransportError(PROTOCOL, f"rank {self.rank} sent a header with an invalid metadata length "
                                 f"{meta_len}", self.rank)
        sending, base, delta_len = fields[8:11]
        if sending < 0 or base < 0 or not 0 <= delta_len <= _MAX_DELTA_BYTES or (base != 0) != (delta_len != 0):
            raise TransportError(PROTOCOL, f"rank {self.rank} sent a header with invalid incremental fields "
                                 f"(sending {sending}, base {base}, delta length {delta_len})", self.rank)
        self.sending, self.base, self.delta_len = sending, base, delta_len
        self._announced = (total, bucket, chunk, nsegments)
        self.raw_meta = torch.empty(meta_len, dtype=torch.uint8)
        return None

    def expect_delta(self, base_storages: list[torch.UntypedStorage | None]) -> None:
        """This rank holds the base the source announced: take the delta message too."""
        self.base_storages = base_storages
        self.raw_delta = torch.empty(self.delta_len, dtype=torch.uint8)
        self.parts = 2

    def apply_delta(self) -> None:
        """Switches to the delta layout the sender announced (only the changed storages travel,
        packed as in its reusing table) and maps the reused storages to the base's. A delta
        that contradicts the metadata raises :data:`PROTOCOL` (the two ends would fall out of
        step); a base that does not fit it sets :attr:`base_problem` (reported as :data:`LOCAL`)."""
        plan = self.plan
        nbytes = plan.table.storage_nbytes
        assert self.raw_delta is not None and self.base_storages is not None, "apply_delta() without expect_delta()"
        base_storages = self.base_storages
        raw = self.raw_delta.numpy().tobytes()
        self.raw_delta = None
        try:
            reuse, base_count, total, nsegments, check = _decode_delta(raw, len(nbytes))
        except (ValueError, RecursionError) as err:
            raise TransportError(PROTOCOL, f"rank {self.rank} sent an invalid delta: {err}", self.rank) from err
        _, bucket, chunk, _ = self._announced
        table, storages = _delta_layout(plan, reuse)
        segments = segments_of(storages, bucket, chunk)
        if table.total_nbytes != total or len(segments) != nsegments:
            raise TransportError(PROTOCOL, f"rank {self.rank} sent an inconsistent delta ({total} bytes in "
                                 f"{nsegments} segments announced, its reuse map gives {table.total_nbytes} in "
                                 f"{len(segments)})", self.rank)
        plan.table = table
        plan._storages = None  # described by the new table from here on
        self.segments = segments
        self.base_problem = _base_problem(base_storages, reuse, base_count, nbytes, check)
        if self.base_problem is None:  # so every reused base storage is there (not None)
            self.replacements = {index: storage for index, base in reuse.items()
                                 if (storage := base_storages[base]) is not None}
        self.base_storages = None

    def read_metadata(self) -> None:
        total, bucket, chunk, nsegments = self._announced
        assert self.raw_meta is not None, "read_metadata() before read_header()"
        text = self.raw_meta.numpy().tobytes()
        self.raw_meta = None
        try:
            with gc_paused():
                meta = json.loads(text)
                plan = decode(meta)
        except (ValueError, RecursionError, StagerError) as err:
            raise TransportError(PROTOCOL, f"rank {self.rank} sent invalid checkpoint metadata: {err}", self.rank) from err
        if plan.total_nbytes != total or bucket <= 0 or chunk <= 0:
            raise TransportError(PROTOCOL, f"rank {self.rank} sent inconsistent checkpoint metadata "
                                 f"({total} bytes announced, {plan.total_nbytes} described)", self.rank)
        self.segments = segments_of(plan.storages, bucket, chunk)
        if len(self.segments) != nsegments:
            raise TransportError(PROTOCOL, f"rank {self.rank} announced {nsegments} segments, its metadata gives "
                                 f"{len(self.segments)}", self.rank)
        self._meta = meta
        self._plan = plan

    def prepare(self) -> list[torch.Tensor]:
        """The tensor each segment is received into (in place where possible, else the pool)."""
        plan = self.plan
        # DTensors are rebuilt on this rank's own meshes where it has one, else on a mesh rebuilt
        # over the group from the sender's description.
        dtensor.bind_meshes(plan, dtensor.receiver_meshes(self.transport.mesh, self.inplace, self.sent),
                            required=False, rebuild=self.transport._group_meshes)
        storages = plan.storages
        targets: dict[int, torch.UntypedStorage] = {}
        if self.inplace is not None and not self.replacements:
            if self.strict:
                self.mismatch = _first_mismatch(plan, self.meta, self.inplace)
            if self.mismatch is None:
                targets = _inplace_targets(plan, self.meta, self.inplace, exact=self.strict)
        self.targets = targets
        if targets:
            _bump_versions(self.inplace, targets)
        needs_buffer = any(not (seg.direct and seg.first in targets) for seg in self.segments)
        if needs_buffer and plan.total_nbytes:
            chosen = None
            if self.receive_buffer is not None and not targets and not self.replacements:
                chosen = self.receive_buffer(self)
            self.buffer = chosen if chosen is not None else self.transport._pool.acquire(plan.total_nbytes)
        views = []
        for segment in self.segments:
            if segment.direct and segment.first in targets:
                begin = segment.start - storages[segment.first].offset
                view = _storage_bytes(targets[segment.first])[begin:begin + segment.nbytes]
            else:
                view = torch.frombuffer(self.buffer, dtype=torch.uint8, count=segment.nbytes, offset=segment.start)
            views.append(view)
        self.views = views
        self.remaining = len(views)
        return views

    def finish(self) -> Any:
        """Builds the received state_dict once every segment has arrived."""
        plan = self.plan
        targets = self.targets
        if targets:
            direct = {s.first for s in self.segments if s.direct}
            for index, target in targets.items():
                storage = plan.storages[index]
                if index not in direct and storage.nbytes:
                    src = torch.frombuffer(self.buffer, dtype=torch.uint8, count=storage.nbytes, offset=storage.offset)
                    _storage_bytes(target).copy_(src)
        if self.base_problem is not None:
            self.done = True  # nothing to build: the transfer reports the problem
            return None
        tensors: list[Any] | None = [] if self.sending else None
        self.result = plan.materialize(self.buffer, {**self.replacements, **targets} or None, tensors)  # GC is off inside
        if tensors is not None:
            self.storages = ReceivedStorages(tensors, plan.table.tensor_storage, len(plan.table.storage_nbytes))
        self.done = True
        return self.result


def _inplace_targets(plan: StatePlan, meta: dict, inplace: Any, exact: bool = False) -> dict[int, torch.UntypedStorage]:
    """storage index → the storage of the in-place tensor at the same key path, where the sizes
    match and the tensor is a plain CPU tensor (like PyTorch: the whole storage is received).
    With ``exact`` the target must also view its storage as the sent tensor does (dtype, shape,
    stride, offset), so the target tensor itself holds the received values afterwards."""
    leaves = {path: dtensor.inplace_target(t) for path, t in tensors_by_path(inplace).items()}  # DTensor: its local
    targets: dict[int, torch.UntypedStorage] = {}
    used: set[int] = set()
    for index, path in tensor_paths(meta).items():
        tensor = leaves.get(path)
        if not isinstance(index, int) or not 0 <= index < len(plan.tensors) or tensor is None:
            continue
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu":
            continue
        tensor_plan = plan.tensors[index]
        storage_index = tensor_plan.storage_index
        if storage_index in targets:
            continue
        if exact and (tensor.dtype != tensor_plan.dtype or tuple(tensor.shape) != tuple(tensor_plan.size)
                      or tuple(tensor.stride()) != tuple(tensor_plan.stride)
                      or tensor.storage_offset() != tensor_plan.storage_offset
                      or tensor_plan.flags & (TensorPlan.CONJ | TensorPlan.NEG)
                      or tensor.is_conj() or tensor.is_neg()):
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() != plan.storages[storage_index].nbytes or storage.data_ptr() in used:
            continue
        used.add(storage.data_ptr())
        targets[storage_index] = storage
    return targets


def _bump_versions(inplace: Any, targets: dict[int, torch.UntypedStorage]) -> None:
    """Bumps the version counter of every tensor of ``inplace`` over a storage the receive writes
    (``targets``), as torch's own in-place writes do: the bytes land through raw views of the
    storages, which torch does not count, and ``skip_unchanged`` would otherwise take a storage
    rewritten here for unchanged. Done before the first byte lands, so a receive that fails half
    way leaves the counters moved too."""
    written = {storage.data_ptr() for storage in targets.values() if storage.nbytes()}
    tensors = [tensor for tensor in (dtensor.inplace_target(leaf) for leaf in tensors_by_path(inplace).values())
               if isinstance(tensor, torch.Tensor) and not tensor.is_inference() and tensor.nbytes
               and tensor.untyped_storage().data_ptr() in written]
    if tensors:
        increment_version(tensors)


def _first_mismatch(plan: StatePlan, meta: dict, inplace: Any) -> str | None:
    """Why ``inplace`` can't take the values of every tensor of ``plan`` (a tensor of the same
    dtype and shape at each key path), or None when it can."""
    leaves = {path: dtensor.inplace_target(t) for path, t in tensors_by_path(inplace).items()}  # DTensor: its local
    for index, path in sorted(tensor_paths(meta).items(), key=lambda item: item[0]):
        tensor_plan = plan.tensors[index]
        wanted = f"{str(tensor_plan.dtype).removeprefix('torch.')} {list(tensor_plan.size)}"
        target = leaves.get(path)
        if target is None:
            return f"key {dotted(path)} ({wanted}) has no tensor in the target state_dict"
        if target.dtype != tensor_plan.dtype or tuple(target.shape) != tuple(tensor_plan.size):
            return (f"key {dotted(path)} is {wanted} but the target holds "
                    f"{str(target.dtype).removeprefix('torch.')} {list(target.shape)}")
    return None
