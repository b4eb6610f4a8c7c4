"""The outgoing side: one state_dict planned, encoded and packed once for all its destinations.

:class:`_Outgoing` holds the header, the metadata and the payloads (:class:`_Payload`: each
segment's source tensor, packed into a pool buffer where the storage can't be sent from its own
memory). With an incremental :class:`~stager.transport.delta.Offer` it has a delta payload too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from .. import _native
from .._native import StagerError
from ..plan import StatePlan, StoragePlan, gc_paused, plan_state_dict
from ..tree import encode
from .delta import Incremental, Offer, _delta_layout, _encode_delta
from .wire import _STATUS_ERROR, _STATUS_OK, Segment, _header, _storage_bytes, segments_of

if TYPE_CHECKING:
    from .pg import PGTransport

def _path_of(tree: Any, target: Any, path: str = "root", depth: int = 0) -> str | None:
    """The key path of object ``target`` inside ``tree`` (for error messages)."""
    if tree is target:
        return path
    if depth > 64:
        return None
    if isinstance(tree, dict):
        items: Any = ((f"{path}.{k}", v) for k, v in tree.items())
    elif isinstance(tree, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(tree))
    else:
        return None
    for where, value in items:
        found = _path_of(value, target, where, depth + 1)
        if found is not None:
            return found
    return None


class _Payload:
    """The bytes of one wire layout of a state_dict: its segments and the tensor each is sent from.

    Direct segments of CPU storages go from the storage itself; everything else is packed (copy
    engine for CPU storages, torch copies for device ones) into a pool buffer, started at once."""

    def __init__(self, transport: PGTransport, storages: list[StoragePlan], segments: list[Segment]) -> None:
        self.segments = segments
        self.keep: list[Any] = []
        self.packed: list[int] = []
        self.sources: list[torch.Tensor | None] = [None] * len(segments)
        self.job: Any = None
        pack_nbytes = 0
        pack_at: dict[int, int] = {}
        for index, segment in enumerate(segments):
            storage = storages[segment.first]
            if segment.direct and storage.is_cpu:
                base = _storage_bytes(storage.storage)
                begin = segment.start - storage.offset
                self.sources[index] = base[begin:begin + segment.nbytes]
            else:
                pack_at[index] = pack_nbytes
                self.packed.append(index)
                pack_nbytes += -(-segment.nbytes // _native.STORAGE_ALIGNMENT) * _native.STORAGE_ALIGNMENT
        if not self.packed:
            return
        buffer = transport._pool.acquire(pack_nbytes)
        self.keep.append(buffer)
        copies: list[tuple[int, torch.UntypedStorage, int, int, int]] = []  # (index, source, begin, at, nbytes)
        device_copies: list[tuple[StoragePlan, int, int, int]] = []  # (source, begin, nbytes, at)
        for index in self.packed:
            segment = segments[index]
            where = pack_at[index]
            self.sources[index] = torch.frombuffer(buffer, dtype=torch.uint8, count=segment.nbytes, offset=where)
            if segment.direct:
                parts = [(segment.first, segment.start - storages[segment.first].offset, segment.nbytes, where)]
            else:
                parts = [(i, 0, storages[i].nbytes, where + storages[i].offset - segment.start)
                         for i in range(segment.first, segment.last) if storages[i].nbytes]
            for storage_index, begin, nbytes, target in parts:
                storage = storages[storage_index]
                if storage.is_cpu:
                    copies.append((len(copies), storage.storage, begin, target, nbytes))
                else:
                    device_copies.append((storage, begin, nbytes, target))
        if copies:
            self.job = _native.Completion(len(copies))
            transport._copier.submit(buffer, self.job, copies)
        for storage, begin, nbytes, target in device_copies:
            dst = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=target)
            dst.copy_(_storage_bytes(storage.storage)[begin:begin + nbytes])

    def wait_packed(self) -> None:
        if self.job is not None:
            self.job.wait()
            self.job = None


class _Outgoing:
    """Everything one send of a state_dict needs: header, metadata, segments and their sources.

    Planned once, however many destinations it goes to. With an incremental :class:`Offer` that
    reuses storages there are two payloads: the delta (packed at once: most holders take it) and
    the full one (packed only when some destination declines the delta)."""

    def __init__(self, transport: PGTransport, state_dict: Any, incremental: Incremental | None = None) -> None:
        self.error: str | None = None
        self.failure: BaseException | None = None
        self.transport = transport
        self.offer: Offer | None = None
        self.delta: _Payload | None = None
        self.delta_meta: torch.Tensor | None = None
        self._full: _Payload | None = None
        self.meta: torch.Tensor | None = None
        plan = None
        try:
            with gc_paused():
                if incremental is not None:
                    plan, self.offer = incremental.plan(state_dict)
                else:
                    plan = plan_state_dict(state_dict)
                meta = json.dumps(encode(plan), separators=(",", ":"), allow_nan=False).encode()
        except Exception as err:
            self.error = self._describe(err, plan, state_dict)
            self.failure = err
            self.header = _header(_STATUS_ERROR, 0, 0, 0, message=self.error)
            self.plan = None
            return
        self.plan = plan
        bucket, chunk = transport.bucket_bytes, transport.chunk_bytes
        self.segments = segments_of(plan.storages, bucket, chunk)
        offer = self.offer
        sending = offer.sending if offer is not None else 0
        base = delta_len = 0
        if offer is not None and offer.reuse and offer.base:
            table, storages = _delta_layout(plan, offer.reuse)
            delta_segments = segments_of(storages, bucket, chunk)
            raw = _encode_delta(offer, table, len(delta_segments))
            self.delta_meta = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            self.delta = _Payload(transport, storages, delta_segments)
            base, delta_len = offer.base, len(raw)
        self.header = _header(_STATUS_OK, len(meta), plan.total_nbytes, len(self.segments), bucket, chunk,
                              sending=sending, base=base, delta_len=delta_len)
        self.meta = torch.frombuffer(bytearray(meta), dtype=torch.uint8) if meta else None
        if self.delta is None:
            self._full = _Payload(transport, plan.storages, self.segments)

    def payload(self, delta: bool) -> _Payload:
        """The delta payload, or the full one (packed on first use)."""
        if delta and self.delta is not None:
            return self.delta
        if self._full is None:
            assert self.plan is not None, "a send that failed to plan has no payload (its header says so)"
            self._full = _Payload(self.transport, self.plan.storages, self.segments)
        return self._full

    @staticmethod
    def _describe(err: Exception, plan: StatePlan | None, state_dict: Any) -> str:
        text = f"{type(err).__name__}: {err}" if not isinstance(err, StagerError) else str(err)
        if plan is not None and plan.opaque:  # name the key of the tensor that can't travel
            where = _path_of(state_dict, plan.opaque[0][2])
            if where is not None and where not in text:
                text = f"{text} (at {where})"
        return text
