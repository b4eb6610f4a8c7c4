"""Transport: state_dicts over a ``torch.distributed`` process group, full duplex, bounded waits.

:class:`PGTransport` is a drop-in for ``torch.distributed.checkpoint._pg_transport.PGTransport``
(same constructor, ``send_checkpoint(dst_ranks, state_dict)``, ``recv_checkpoint(src_rank)``,
in-place receive into the tensors of the ``state_dict`` callable) built on the process group's
point-to-point ``send``/``recv``. What it does differently:

* **One pass, no pickle.** The dict is planned once (:mod:`stager.plan`); its structure travels as
  length-prefixed JSON from :func:`stager.tree.encode` and is validated by
  :func:`stager.tree.decode` on arrival. Views of one storage send that storage once and come back
  sharing one storage.
* **Buckets.** The storages' bytes are laid out as in the plan's host buffer and cut into
  *segments*: runs of small storages coalesced into one contiguous range (at least
  ``bucket_bytes``), and large storages sent straight from their own memory in chunks of at most
  ``chunk_bytes``. Sender and receiver derive the same segments from the metadata.
* **Straight into the pool.** Received bytes land in a buffer of the process-wide host pool (or,
  for in-place receives, in the target tensors' storages): no per-tensor allocation, no extra copy.
* **Many peers, full duplex.** :meth:`PGTransport.transfer` posts every receive and every send of
  a round at once (any number of destinations, each with its own state_dict or a shared one, and
  any number of sources), so all directions are on the wire together.
* **Bounded, interruptible, typed.** gloo's point-to-point works only complete when waited on, and
  a wait that times out breaks the whole group. So helper threads wait for the works (one per
  peer and direction, up to the deadline plus a grace) while the calling thread takes their
  completions in short slices against its own deadline: a peer that never answers is *known* to
  have timed out, without reading any message, and Ctrl-C raises ``KeyboardInterrupt`` at once.
  Every failure is a :class:`TransportError` (a :class:`~stager.StagerError`) with a ``kind``
  (:data:`TIMEOUT`, :data:`CONNECTION`, :data:`REMOTE`, :data:`UNSENDABLE`, :data:`PROTOCOL`,
  :data:`LOCAL`, :data:`BROKEN`) and the ``rank`` it concerns.
* **No failure waits for a timeout.** A state_dict that can't be sent (a leaf that needs pickle,
  an unsupported tensor) is announced in the fixed-size header every receiver posts first, with
  the key that failed; the receivers raise at once and nothing is left unmatched. A receiver whose
  own handling fails (a replica file that can't be written, an in-place target that doesn't fit)
  keeps receiving, so both sides stay in step, and reports the failure at the end.
* **Incremental** (``transfer(..., incremental=...)``, what ``ReplicationStager(skip_unchanged=True)``
  uses): a sender whose previous sending the holder still has sends only the storages that changed
  since, and the holder builds the new state_dict from its copy of the previous one plus those
  bytes. See :class:`Incremental` for who decides what, and when.
* **Counted.** :attr:`PGTransport.sent` and :attr:`PGTransport.received` count the bytes of every
  message by kind (:class:`WireBytes`: headers, metadata, state_dict bytes, all-gathers).
* **Broken stays broken.** After a timeout, a lost connection or an interrupt, point-to-point
  messages may still be in flight: every later call raises :data:`BROKEN` at once, saying the
  process group must be re-created (instead of repeating the first error).

Order of operations of one transfer (per peer): header (1 KiB: fields + an error message) →
metadata (JSON) [→ delta (JSON) when the holder takes an incremental send] → segments, each on its
own tag. Tags carry a per-peer sequence number, so a
failed transfer can never feed stale bytes into the next one. :meth:`PGTransport.allgather_bytes`
is the same machinery for the small all-gathers replication and restore agree through.

Thread Safety:
    One call at a time per transport object; the process group is used from the calling thread
    (and the helper threads that wait for its works).
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import torch

from . import _native, dtensor
from ._native import StagerError
from .engine import copy_engine, process_pool
from .options import default_num_threads
from .plan import StatePlan, StoragePlan, TensorPlan, gc_paused, plan_state_dict
from .tree import decode, dotted, encode, tensor_paths, tensors_by_path

__all__ = [
    "BROKEN", "CONNECTION", "LOCAL", "PROTOCOL", "REMOTE", "TIMEOUT", "UNSENDABLE",
    "Incremental", "Offer", "PGTransport", "Segment", "TransportError", "WireBytes", "segments_of",
]

# ---- errors ----------------------------------------------------------------------------------------

#: A peer (or the group, for an all-gather) did not answer before the deadline.
TIMEOUT = "timeout"
#: The backend reported a failure talking to a peer: it exited, crashed, or the link failed.
CONNECTION = "connection"
#: The peer announced that it could not send its state_dict (its message is in the error).
REMOTE = "remote"
#: This rank's state_dict can't be sent (a leaf that needs pickle, an unsupported tensor).
UNSENDABLE = "unsendable"
#: A peer sent something this version does not understand (mismatched versions, corruption).
PROTOCOL = "protocol"
#: This rank failed handling what it received (writing a replica, an in-place target that
#: doesn't fit); the transfer itself completed.
LOCAL = "local"
#: An earlier timeout, lost connection or interrupt left the group unusable.
BROKEN = "broken"
#: Kinds after which messages may still be in flight: the group can't be trusted any more.
FATAL_KINDS = frozenset({TIMEOUT, CONNECTION, PROTOCOL})


class TransportError(StagerError):
    """A failed transfer. ``kind`` says what failed (module constants), ``rank`` the peer it
    concerns (None for the group), ``message`` the reason without the kind-specific prefix."""

    def __init__(self, kind: str, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.rank = rank
        self.errno = None  # the attributes every StagerError carries
        self.cuda_code = None

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS


# ---- wire layout -------------------------------------------------------------------------------------

_MAGIC = 0x5354_4752  # "STGR"
_VERSION = 3
_HEADER_BYTES = 1024
# magic, version, status, meta_len, total_nbytes, bucket_bytes, chunk_bytes, nsegments, then for
# incremental sends: sending (this sending's id), base (the id of the earlier sending a delta is
# against, 0: none), delta_len (bytes of the delta message)
_HEADER_FIELDS = 11
_MESSAGE_AT = 128  # the error message (UTF-8) fills the rest of the header
_STATUS_OK = 0
_STATUS_ERROR = 1
_MAX_META_BYTES = 1 << 30
_MAX_DELTA_BYTES = 1 << 30

#: Small storages are coalesced into segments of at least this many bytes.
DEFAULT_BUCKET_BYTES = 4 << 20
#: Large storages are sent in chunks of at most this many bytes.
DEFAULT_CHUNK_BYTES = 16 << 20

_TAG_SEQ_SHIFT = 24
_TAG_SEQ_MOD = 64
_TAG_HEADER = 0
_TAG_META = 1
_TAG_DELTA = 2
_TAG_FIRST_SEGMENT = 3


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range ``[start, end)`` of the plan's buffer layout, sent as one message.

    ``direct`` segments are a chunk of the single storage ``first`` (``last == first + 1``);
    the others cover storages ``first .. last - 1`` entirely (plus alignment padding)."""

    start: int
    end: int
    first: int
    last: int
    direct: bool

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def segments_of(storages: list, bucket_bytes: int, chunk_bytes: int) -> list[Segment]:
    """Cuts the storages (``.offset``/``.nbytes`` in layout order) into segments; deterministic,
    so both ends of a transfer agree from the metadata alone."""
    out: list[Segment] = []
    group_first = -1
    group_start = group_end = 0

    def flush(upto: int) -> None:
        nonlocal group_first
        if group_first >= 0:
            out.append(Segment(group_start, group_end, group_first, upto, False))
            group_first = -1

    for index, storage in enumerate(storages):
        nbytes = storage.nbytes
        if not nbytes:
            continue
        if nbytes >= bucket_bytes:
            flush(index)
            pieces = max(1, math.ceil(nbytes / chunk_bytes))
            step = -(-nbytes // pieces)
            for begin in range(0, nbytes, step):
                out.append(Segment(storage.offset + begin, storage.offset + min(nbytes, begin + step),
                                   index, index + 1, True))
            continue
        if group_first < 0:
            group_first = index
            group_start = storage.offset
        group_end = storage.offset + nbytes
        if group_end - group_start >= bucket_bytes:
            flush(index + 1)
    flush(len(storages))
    return out


@dataclass
class WireBytes:
    """Bytes of the messages one transport sent (or received), by kind: ``header`` (the fixed
    1 KiB header per peer and transfer), ``metadata`` (the structure, and the delta of an
    incremental send), ``data`` (the state_dicts' storage bytes: segments) and ``control`` (this
    rank's share of the small all-gathers replication and restore agree through). Counted when
    posted."""

    header: int = 0
    metadata: int = 0
    data: int = 0
    control: int = 0

    @property
    def total(self) -> int:
        return self.header + self.metadata + self.data + self.control

    def copy(self) -> WireBytes:
        return WireBytes(self.header, self.metadata, self.data, self.control)

    def __sub__(self, other: WireBytes) -> WireBytes:
        return WireBytes(self.header - other.header, self.metadata - other.metadata, self.data - other.data,
                         self.control - other.control)


@dataclass
class Offer:
    """What an incremental sender announces for one state_dict.

    ``sending``: a nonzero id of this sending (a holder records it with its copy); ``base``: the
    id of the earlier sending that ``reuse`` refers to (0: none); ``base_storages``: how many
    storages that sending had; ``reuse``: storage index in this state_dict's plan → its index in
    the base, for every storage whose bytes the holder of the base already has (not sent again);
    ``check``: with the debug check (``STAGER_CHECK_UNCHANGED``), the crc32c of each reused source
    storage (in increasing order of ``reuse``'s keys; None where not computed), for the holder to
    compare with its copy."""

    sending: int
    base: int = 0
    base_storages: int = 0
    reuse: dict[int, int] | None = None
    check: list[int | None] | None = None


class Incremental(Protocol):
    """The policy behind an incremental transfer (``transfer(..., incremental=policy)``, which
    needs ``before_bulk``); both ends of every pair must use one. The transport asks:

    * sender, while planning: :meth:`plan` → the plan of the state_dict and its :class:`Offer`
      (the header then carries the sending id, and the base id when some storage is reused);
    * receiver, as each header lands: :meth:`announced` with the source's sending and base ids;
    * ``before_bulk`` runs (the policy's agreement: each holder says which bases it holds);
    * sender: :meth:`accepts` per destination → send only the changed storages (after the
      metadata, a delta message with the reuse map) or everything;
    * receiver: :meth:`base` per source → the storages of the base it said it holds (then the
      delta message is expected and the reused storages are taken from there), or None (a full
      receive). Both answers must follow from the same agreement, or the two ends fall out of
      step. :meth:`unusable` is told when a base did not fit what the sender described (the
      transfer then fails with :data:`LOCAL`, everything having been received);
    * receiver, once a state_dict from a source that announced a sending is built:
      :meth:`landed` with a :class:`ReceivedStorages` of it (what the next transfer's base is).
    """

    def plan(self, state_dict: Any) -> tuple[StatePlan, Offer | None]: ...

    def announced(self, src: int, sending: int, base: int) -> None: ...

    def accepts(self, dst: int, base: int) -> bool: ...

    def base(self, src: int, base: int) -> list[torch.UntypedStorage | None] | None: ...

    def unusable(self, src: int, reason: str) -> None: ...

    def landed(self, src: int, sending: int, storages: ReceivedStorages) -> None: ...


class ReceivedStorages:
    """The storages of a received state_dict, index = its sender's storage index, listed on first
    use (a base that is never offered costs nothing). Holds the received tensors, not the
    state_dict: what its owner later does to the dict's structure doesn't change them."""

    __slots__ = ("_count", "_list", "_tensor_storage", "_tensors")

    def __init__(self, tensors: list[Any], tensor_storage: list[int], count: int) -> None:
        self._tensors = tensors
        self._tensor_storage = tensor_storage
        self._count = count
        self._list: list[torch.UntypedStorage | None] | None = None

    def list(self) -> list[torch.UntypedStorage | None]:
        if self._list is None:
            out: list[torch.UntypedStorage | None] = [None] * self._count
            for tensor, index in zip(self._tensors, self._tensor_storage):
                if out[index] is None and tensor is not None:
                    out[index] = tensor.untyped_storage()
            self._list = out
            self._tensors = self._tensor_storage = []
        return self._list


def _delta_layout(plan: StatePlan, reuse: dict[int, int]) -> tuple[Any, list[StoragePlan]]:
    """The wire layout of an incremental send: the plan's table with the reused storages taking
    no room, and its storages with the reused ones at 0 bytes (no segment carries them)."""
    table = plan.table.reusing(sorted(reuse))
    storages = [
        StoragePlan(obj, address, 0 if index in reuse else nbytes, offset, device, users)
        for index, (obj, address, nbytes, offset, device, users) in enumerate(zip(
            table.storage_objects, table.storage_addresses, table.storage_nbytes, table.storage_offsets,
            table.storage_devices, table.storage_users))
    ]
    return table, storages


def _encode_delta(offer: Offer, table: Any, nsegments: int) -> bytes:
    """The delta message: the reuse map as runs ``[first index, first base index, length]``."""
    runs: list[list[int]] = []
    for index, base in sorted(offer.reuse.items()):
        if runs and runs[-1][0] + runs[-1][2] == index and runs[-1][1] + runs[-1][2] == base:
            runs[-1][2] += 1
        else:
            runs.append([index, base, 1])
    spec: dict[str, Any] = {"base_storages": offer.base_storages, "reuse": runs, "nbytes": table.total_nbytes,
                            "segments": nsegments}
    if offer.check is not None:
        spec["crc32c"] = offer.check
    return json.dumps(spec, separators=(",", ":")).encode()


def _decode_delta(raw: bytes, count: int) -> tuple[dict[int, int], int, int, int, list[int | None] | None]:
    """Validates a delta message for a plan of ``count`` storages; returns (reuse map,
    base_storages, nbytes, segments, crc32c list). Raises ValueError saying what is wrong."""
    spec = json.loads(raw)
    if not isinstance(spec, dict):
        raise ValueError("not an object")

    def integer(value: Any, what: str) -> int:
        if type(value) is not int or value < 0:
            raise ValueError(f"{what} must be a non-negative int, got {value!r}")
        return value

    base_storages = integer(spec.get("base_storages"), "base_storages")
    nbytes, nsegments = integer(spec.get("nbytes"), "nbytes"), integer(spec.get("segments"), "segments")
    runs = spec.get("reuse")
    if not isinstance(runs, list) or not runs:
        raise ValueError("reuse must be a non-empty list")
    reuse: dict[int, int] = {}
    bases: set[int] = set()
    for run in runs:
        if not isinstance(run, list) or len(run) != 3:
            raise ValueError(f"a reuse run must be [index, base index, length], got {run!r}")
        first, base, length = (integer(v, "a reuse run field") for v in run)
        if not length or first + length > count or base + length > base_storages:
            raise ValueError(f"reuse run {run!r} is out of range ({count} storages, {base_storages} in the base)")
        for k in range(length):
            if first + k in reuse or base + k in bases:
                raise ValueError(f"reuse run {run!r} names a storage twice")
            reuse[first + k] = base + k
            bases.add(base + k)
    check = spec.get("crc32c")
    if check is not None and (not isinstance(check, list) or len(check) != len(reuse)
                              or any(c is not None and (type(c) is not int or not 0 <= c < 1 << 32) for c in check)):
        raise ValueError("crc32c must be one crc (or null) per reused storage")
    return reuse, base_storages, nbytes, nsegments, check


def _as_timedelta(timeout: Any) -> timedelta:
    if isinstance(timeout, timedelta):
        if timeout.total_seconds() > 0:
            return timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return timedelta(seconds=timeout)
    raise StagerError(f"timeout must be a positive timedelta or number of seconds, got {timeout!r}")


def _storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# ---- bounded waits -------------------------------------------------------------------------------------


class _DeadlinePassed(Exception):
    pass


class _Waits:
    """Waits for a round's works on helper threads, against one deadline.

    One lane (thread) per key, e.g. per peer and direction: it waits its works in the order they
    were added, each with the time left until the deadline plus :attr:`GRACE_S` (so the calling
    thread, watching the deadline itself, always sees a timeout first), and reports each
    completion on one queue. :meth:`next` takes them in slices of :attr:`SLICE_S`, which is what
    lets ``KeyboardInterrupt`` through. Lanes outlive a failed round until their own waits end:
    they keep the works, and with them the buffers the backend may still write, alive."""

    GRACE_S = 2.0
    SLICE_S = 0.05

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._lanes: dict[Any, queue.SimpleQueue] = {}
        self.pending: dict[int, Any] = {}  # id → token, oldest first
        self._next_id = 0

    def add(self, lane: Any, work: Any, token: Any) -> None:
        inbox = self._lanes.get(lane)
        if inbox is None:
            inbox = self._lanes[lane] = queue.SimpleQueue()
            threading.Thread(target=self._lane, args=(inbox,), name="stager-transport-wait", daemon=True).start()
        ident = self._next_id
        self._next_id += 1
        self.pending[ident] = token
        inbox.put((ident, work))

    def _lane(self, inbox: queue.SimpleQueue) -> None:
        while True:
            item = inbox.get()
            if item is None:
                return
            ident, work = item
            try:
                left = self.deadline + self.GRACE_S - time.monotonic()
                work.wait(timedelta(seconds=max(left, 0.001)))
            except BaseException as err:
                self._done.put((ident, err))
            else:
                self._done.put((ident, None))
            del work, item

    def next(self) -> tuple[Any, BaseException | None]:
        """The next completed work's ``(token, error)``; raises _DeadlinePassed at the deadline."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed()
            try:
                ident, err = self._done.get(timeout=min(self.SLICE_S, left))
            except queue.Empty:
                continue
            return self.pending.pop(ident), err

    def oldest(self) -> Any:
        return next(iter(self.pending.values()), None)

    def close(self) -> None:
        for inbox in self._lanes.values():
            inbox.put(None)


# ---- one outgoing state_dict ----------------------------------------------------------------------


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
        copies = []
        device_copies = []
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


def _header(status: int, meta_len: int, total: int, nsegments: int, bucket: int = 0, chunk: int = 0,
            *, sending: int = 0, base: int = 0, delta_len: int = 0, message: str = "") -> torch.Tensor:
    header = torch.zeros(_HEADER_BYTES, dtype=torch.uint8)
    fields = torch.tensor([_MAGIC, _VERSION, status, meta_len, total, bucket, chunk, nsegments, sending, base,
                           delta_len], dtype=torch.int64)
    header[:_HEADER_FIELDS * 8] = fields.view(torch.uint8)
    text = message.encode("utf-8", errors="replace")[:_HEADER_BYTES - _MESSAGE_AT]
    if text:
        header[_MESSAGE_AT:_MESSAGE_AT + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return header


def _read_header(header: torch.Tensor) -> tuple[list[int], str]:
    fields = [int(v) for v in header[:_HEADER_FIELDS * 8].view(torch.int64).tolist()]
    message = header[_MESSAGE_AT:].numpy().tobytes().rstrip(b"\0").decode("utf-8", errors="replace")
    return fields, message


# ---- one incoming state_dict ------------------------------------------------------------------------


class _Incoming:
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
        self.plan: StatePlan | None = None
        self.meta: dict | None = None
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
        self.receive_buffer: Callable[[_Incoming], Any] | None = None

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
        self.base_problem = _base_problem(self.base_storages, reuse, base_count, nbytes, check)
        if self.base_problem is None:
            self.replacements = {index: self.base_storages[base] for index, base in reuse.items()}
        self.base_storages = None

    def read_metadata(self) -> None:
        total, bucket, chunk, nsegments = self._announced
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
        self.meta = meta
        self.plan = plan

    def prepare(self) -> list[torch.Tensor]:
        """The tensor each segment is received into (in place where possible, else the pool)."""
        plan = self.plan
        # DTensors are rebuilt on this rank's own meshes where it has one, else on a mesh rebuilt
        # over the group from the sender's description.
        dtensor.bind_meshes(plan, dtensor.receiver_meshes(self.transport.mesh, self.inplace, self.sent),
                            required=False, rebuild=self.transport._group_meshes)
        storages = plan.storages
        targets = {}
        if self.inplace is not None and not self.replacements:
            if self.strict:
                self.mismatch = _first_mismatch(plan, self.meta, self.inplace)
            if self.mismatch is None:
                targets = _inplace_targets(plan, self.meta, self.inplace, exact=self.strict)
        self.targets = targets
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


def _base_problem(base: list[torch.UntypedStorage | None], reuse: dict[int, int], base_count: int,
                  nbytes: list[int], check: list[int | None] | None) -> str | None:
    """Why the storages ``base`` can't stand in for the reused ones (None when they can)."""
    if len(base) != base_count:
        return f"the previous step held here has {len(base)} storages, the sender's {base_count}"
    for index, position in reuse.items():
        storage = base[position]
        if storage is None or storage.nbytes() != nbytes[index]:
            held = "none" if storage is None else f"{storage.nbytes()} bytes"
            return (f"storage {index} ({nbytes[index]} bytes) is storage {position} of the previous step, which holds "
                    f"{held} here")
    if check is not None:
        for (index, position), crc in zip(sorted(reuse.items()), check):
            held = _native.storage_crc32c(base[position])
            if crc is not None and crc != held:
                return (f"storage {index} ({nbytes[index]} bytes) was not sent as unchanged, but its bytes differ from "
                        f"the previous step's (crc32c {held:08x} held here, {crc:08x} at the sender): it changed "
                        "without a version-counter bump (a write through `.data`, a NumPy view or a C extension?), or "
                        "the replica held here was modified")
    return None


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


# ---- the transport --------------------------------------------------------------------------------------


#: Every live transport, so that :func:`_release_groups_at_exit` can drop their groups in time.
_LIVE_TRANSPORTS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _release_groups_at_exit() -> None:
    """Drops the process groups that transports (and the stagers holding them) still reference,
    while the interpreter is fully alive. Otherwise the last reference to a gloo group goes at
    interpreter finalization, after ``destroy_process_group()``: its worker threads then free the
    tensors of their last works (stager's tensors view Python-owned host buffers, whose release
    needs the GIL) while the interpreter is torn down, and the process aborts with "terminate called
    without an active exception" after a successful run."""
    for transport in list(_LIVE_TRANSPORTS):
        transport._pg = None
        transport._group_meshes.release()
    gc.collect()


class PGTransport:
    """Drop-in for ``torch.distributed.checkpoint._pg_transport.PGTransport``.

    Args:
        pg: the process group to communicate over (its point-to-point send/recv are used).
        timeout: bound on every call (``timedelta`` or seconds); a peer that doesn't make
            progress within it raises :class:`TransportError` (kind :data:`TIMEOUT`) naming it.
        device: where the wire tensors live; CPU (gloo) is the supported path.
        state_dict: optional callable returning a state_dict whose tensors receive in place
            (matched by key path; a storage of the same byte size receives the bytes directly).
        mesh: optional DeviceMesh (or list) received DTensors are rebuilt on; the meshes of
            in-place DTensor targets and of the DTensors this rank sends serve too. A DTensor
            whose mesh matches none of them comes back on a mesh rebuilt over ``pg`` with the
            sender's mesh shape, dim names and placements (:class:`stager.dtensor.GroupMeshes`),
            like PyTorch's; only one that can't be rebuilt there (its ranks are not in ``pg``
            and their number does not fit) is a :class:`~stager.LocalShard`.

    Thread Safety:
        Not thread-safe: one call at a time per object.
    """

    def __init__(self, pg: Any, timeout: timedelta, device: Any, state_dict: Callable[[], Any] | None = None,
                 *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 mesh: Any = None) -> None:
        self._pg = pg
        _LIVE_TRANSPORTS.add(self)
        self.mesh = mesh
        self._timeout = _as_timedelta(timeout)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._group_meshes = dtensor.GroupMeshes(pg, self._device.type)
        self._state_dict = state_dict
        if bucket_bytes <= 0 or chunk_bytes <= 0:
            raise StagerError("bucket_bytes and chunk_bytes must be positive")
        self.bucket_bytes = int(bucket_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._pool = process_pool()
        self._copier = copy_engine(default_num_threads())
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        self._broken: TransportError | None = None
        #: Bytes of the messages posted so far, by kind (see :class:`WireBytes`).
        self.sent = WireBytes()
        self.received = WireBytes()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def timeout(self) -> timedelta:
        return self._timeout

    @property
    def broken(self) -> TransportError | None:
        """The failure that made the group unusable, or None."""
        return self._broken

    def deadline(self) -> float:
        """``time.monotonic()`` at which a call starting now must have finished."""
        return time.monotonic() + self._timeout.total_seconds()

    def check_usable(self) -> None:
        """Raises :data:`BROKEN` when an earlier failure left the group unusable."""
        if self._pg is None:
            raise StagerError("this transport was released at interpreter exit")
        if self._broken is not None:
            raise TransportError(
                BROKEN,
                "the process group is unusable since an earlier failure left point-to-point messages in flight "
                f"({self._broken}); destroy it and create a new process group, and new stagers or transports on "
                "it (every rank must do the same)",
                self._broken.rank,
            )

    def _break(self, err: TransportError) -> TransportError:
        if self._broken is None:
            self._broken = err
        return err

    def _timeout_error(self, token: Any, started: float) -> TransportError:
        seconds = self._timeout.total_seconds()
        rank, what = (token[1], token[2]) if token is not None else (None, "waiting")
        who = f"rank {rank}" if rank is not None else "some rank of the group"
        waited = time.monotonic() - started
        return TransportError(
            TIMEOUT,
            f"{who} did not respond within the {seconds:g}s timeout while {what} (waited {waited:.1f}s; it "
            "stalled or died, the link to it is down, or it is not taking part in this call)", rank)

    def _connection_error(self, token: Any, err: BaseException) -> TransportError:
        rank, what = token[1], token[2]
        who = f"rank {rank}" if rank is not None else "the process group"
        return TransportError(
            CONNECTION,
            f"communication with {who} failed while {what} (it exited or crashed, or the link failed): "
            f"{_first_line(err)}", rank)

    # ---- low level -----------------------------------------------------------------------------
    @staticmethod
    def _tag(seq: int, index: int) -> int:
        return ((seq % _TAG_SEQ_MOD) << _TAG_SEQ_SHIFT) | index

    def _next(self, table: dict[int, int], rank: int) -> int:
        seq = table.get(rank, 0)
        table[rank] = seq + 1
        return seq

    def _post(self, waits: _Waits, op: str, tensor: torch.Tensor, peer: int, seq: int, index: int,
              token: tuple) -> None:
        try:
            if op == "send":
                work = self._pg.send([tensor], peer, self._tag(seq, index))
            else:
                work = self._pg.recv([tensor], peer, self._tag(seq, index))
        except Exception as err:  # gloo raises at once when the connection is already gone
            raise self._connection_error(token, err) from err
        waits.add((op, peer), work, token)
        counter = self.sent if op == "send" else self.received
        nbytes = tensor.numel() * tensor.element_size()
        if index == _TAG_HEADER:
            counter.header += nbytes
        elif index in (_TAG_META, _TAG_DELTA):
            counter.metadata += nbytes
        else:
            counter.data += nbytes

    # ---- PyTorch's interface -------------------------------------------------------------------
    def send_checkpoint(self, dst_ranks: list[int], state_dict: Any) -> None:
        """Sends ``state_dict`` to every rank in ``dst_ranks``; returns once all bytes are sent."""
        self.transfer({dst: state_dict for dst in dst_ranks}, [])

    def recv_checkpoint(self, src_rank: int) -> Any:
        """Receives a state_dict from ``src_rank`` (in place where the ``state_dict`` callable's
        tensors fit) and returns it."""
        inplace = self._state_dict() if self._state_dict is not None else None
        return self.transfer({}, [src_rank], inplace=inplace)[src_rank]

    def exchange(self, dst_rank: int | None, state_dict: Any, src_rank: int | None, **callbacks: Any) -> Any:
        """Sends ``state_dict`` to ``dst_rank`` while receiving one from ``src_rank`` (either may be
        None), both in flight at once; returns the received state_dict (or None).

        With both given, the headers go both ways before any bytes do: when either side can't
        send, both raise at once and nothing is left in flight (the peer must call exchange too)."""
        sends = {dst_rank: state_dict} if dst_rank is not None else {}
        inplace = self._state_dict() if self._state_dict is not None and src_rank is not None else None
        if dst_rank is not None and src_rank is not None:
            callbacks.setdefault("before_bulk", lambda error: None)
        received = self.transfer(sends, [src_rank] if src_rank is not None else [], inplace=inplace, **callbacks)
        return received.get(src_rank) if src_rank is not None else None

    # ---- one round, many peers -----------------------------------------------------------------
    def transfer(self, sends: dict[int, Any], recvs: Sequence[int], *, deadline: float | None = None,
                 inplace: Any = None, strict_inplace: bool = False,
                 before_bulk: Callable[[str | None], None] | None = None,
                 on_metadata: Callable[[_Incoming], Any] | None = None,
                 on_segment: Callable[[_Incoming, int], None] | None = None,
                 incremental: Incremental | None = None,
                 receive_buffer: Callable[[_Incoming], Any] | None = None) -> dict[int, Any]:
        """Sends ``sends[dst]`` to each ``dst`` while receiving one state_dict from each rank of
        ``recvs``, everything in flight at once; returns ``{src: received state_dict}``.

        Values of ``sends`` that are the same object are planned and packed once. ``inplace``:
        a state_dict whose tensors receive in place (every source's; with ``strict_inplace``
        a source whose storages don't all fit is received into fresh memory instead and the
        call fails with :data:`LOCAL`, naming the key; see :class:`_Incoming`).

        ``before_bulk(error)``, when given, runs once every header has gone out and come in (so
        every peer is known to be taking part, and what each source can send) and before any
        metadata or bytes are posted, with this rank's own reason it can't send (or None):
        replication agrees on the step there, and when it raises, the call raises that with
        nothing left in flight. ``on_metadata(incoming)`` runs once a source's
        structure is known, after its receives are posted; ``on_segment(incoming, i)`` as each of
        its segments lands (e.g. to persist it). An exception in a callback stops the callbacks
        of that source, the bytes are still received (both sides stay in step), and the call
        raises it (kind :data:`LOCAL`) at the end.

        ``incremental`` (with ``before_bulk``, where its agreement happens): the policy that
        decides which destinations get only the changed storages and which sources send only
        theirs (see :class:`Incremental`).

        ``receive_buffer(incoming)``, when given, may return the buffer a full (not in place,
        not incremental) receive lands in instead of a pool buffer (replication's named
        shared-memory segments); None takes one from the pool.

        Raises :class:`TransportError`: :data:`UNSENDABLE` (after telling the destinations),
        :data:`REMOTE` (a source told us it can't send), :data:`LOCAL`, or a fatal kind
        (:data:`TIMEOUT`, :data:`CONNECTION`, :data:`PROTOCOL`), after which the transport
        is broken. ``KeyboardInterrupt`` passes at once and breaks it too."""
        self.check_usable()
        if incremental is not None and before_bulk is None:
            raise StagerError("an incremental transfer needs before_bulk: the holders say there which bases they hold")
        started = time.monotonic()
        waits = _Waits(deadline if deadline is not None else self.deadline())
        problems: list[TransportError] = []  # non-fatal: reported once everything is in
        incomings: dict[int, _Incoming] = {}
        unsendable: _Outgoing | None = None
        try:
            for src in recvs:
                incoming = incomings[src] = _Incoming(self, src, self._next(self._recv_seq, src), inplace,
                                                      strict_inplace)
                incoming.receive_buffer = receive_buffer
                self._post(waits, "recv", incoming.header, src, incoming.seq, _TAG_HEADER,
                           ("header", src, f"waiting for the checkpoint header from rank {src}"))
            prepared: dict[int, _Outgoing] = {}
            outgoing_of: dict[int, _Outgoing] = {}
            for dst, state_dict in sends.items():
                outgoing = prepared.get(id(state_dict))
                if outgoing is None:
                    outgoing = prepared[id(state_dict)] = _Outgoing(self, state_dict, incremental)
                outgoing_of[dst] = outgoing
            unsendable = next((o for o in prepared.values() if o.error is not None), None)
            for incoming in incomings.values():
                incoming.sent = [o.plan for o in prepared.values() if o.plan is not None]
            seqs = {dst: self._next(self._send_seq, dst) for dst in outgoing_of}
            for dst, outgoing in outgoing_of.items():
                self._post(waits, "send", outgoing.header, dst, seqs[dst], _TAG_HEADER,
                           ("sent", dst, f"sending the checkpoint header to rank {dst}"))
            if before_bulk is not None:
                while waits.pending:  # every header out and in
                    self._handle(waits, incomings, problems, post_meta=False, incremental=incremental)
                before_bulk(unsendable.error if unsendable is not None else None)
                if problems or unsendable is not None:  # (before_bulk normally raised already)
                    self._raise(problems, unsendable, incomings)
                for src, incoming in incomings.items():
                    if not incoming.done:
                        if incremental is not None and incoming.base:
                            base = incremental.base(src, incoming.base)
                            if base is not None:
                                incoming.expect_delta(base)
                        self._post_meta(waits, incoming)
            self._post_bulk(waits, outgoing_of, seqs, incremental)
            while waits.pending:
                self._handle(waits, incomings, problems, post_meta=True, on_metadata=on_metadata,
                             on_segment=on_segment, incremental=incremental)
        except _DeadlinePassed:
            raise self._break(self._timeout_error(waits.oldest(), started)) from None
        except TransportError as err:
            if err.fatal:
                self._break(err)
            raise
        except KeyboardInterrupt:
            self._break(TransportError(BROKEN, "a call was interrupted (KeyboardInterrupt) with messages in flight"))
            raise
        finally:
            waits.close()
        self._raise(problems, unsendable, incomings)
        return {src: incoming.result for src, incoming in incomings.items()}

    def _post_meta(self, waits: _Waits, incoming: _Incoming) -> None:
        rank = incoming.rank
        self._post(waits, "recv", incoming.raw_meta, rank, incoming.seq, _TAG_META,
                   ("meta", rank, f"receiving checkpoint metadata from rank {rank}"))
        if incoming.raw_delta is not None:
            self._post(waits, "recv", incoming.raw_delta, rank, incoming.seq, _TAG_DELTA,
                       ("delta", rank, f"receiving the incremental checkpoint delta from rank {rank}"))

    def _post_bulk(self, waits: _Waits, outgoing_of: dict[int, _Outgoing], seqs: dict[int, int],
                   incremental: Incremental | None = None) -> None:
        """Metadata and segments to every destination (direct segments first: no copy to wait
        for); the delta and only the changed storages to those that hold the base."""
        payloads: dict[int, _Payload] = {}
        for dst, outgoing in outgoing_of.items():
            if outgoing.error is not None:
                continue
            delta = (outgoing.delta is not None and incremental is not None
                     and incremental.accepts(dst, outgoing.offer.base))
            payload = payloads[dst] = outgoing.payload(delta)
            what = ("sent", dst, f"sending checkpoint bytes to rank {dst}")
            self._post(waits, "send", outgoing.meta, dst, seqs[dst], _TAG_META,
                       ("sent", dst, f"sending checkpoint metadata to rank {dst}"))
            if delta:
                self._post(waits, "send", outgoing.delta_meta, dst, seqs[dst], _TAG_DELTA,
                           ("sent", dst, f"sending the incremental checkpoint delta to rank {dst}"))
            packed = set(payload.packed)
            for index, source in enumerate(payload.sources):
                if index not in packed:
                    self._post(waits, "send", source, dst, seqs[dst], _TAG_FIRST_SEGMENT + index, what)
        for dst, payload in payloads.items():
            if payload.packed:
                payload.wait_packed()
                what = ("sent", dst, f"sending checkpoint bytes to rank {dst}")
                for index in payload.packed:
                    self._post(waits, "send", payload.sources[index], dst, seqs[dst], _TAG_FIRST_SEGMENT + index,
                               what)

    def _handle(self, waits: _Waits, incomings: dict[int, _Incoming], problems: list[TransportError], *,
                post_meta: bool, on_metadata: Callable | None = None, on_segment: Callable | None = None,
                incremental: Incremental | None = None) -> None:
        """Takes the next completion and moves its transfer on."""
        token, err = waits.next()
        if err is not None:
            raise self._connection_error(token, err) from err
        kind, rank = token[0], token[1]
        if kind == "sent":
            return
        incoming = incomings[rank]
        if kind == "header":
            message = incoming.read_header()
            if message is not None:
                problems.append(TransportError(REMOTE, f"rank {rank} could not send its state_dict: {message}", rank))
            else:
                if incremental is not None and incoming.sending:
                    incremental.announced(rank, incoming.sending, incoming.base)
                if post_meta:
                    self._post_meta(waits, incoming)
        elif kind in ("meta", "delta"):
            if kind == "meta":
                incoming.read_metadata()
            incoming.parts -= 1
            if incoming.parts:
                return  # the other half (metadata or delta) is still on its way
            if incoming.raw_delta is not None:
                incoming.apply_delta()
                if incoming.base_problem is not None:
                    problems.append(TransportError(LOCAL, f"the state_dict from rank {rank} cannot be built from the "
                                                   f"previous step held here: {incoming.base_problem}", rank))
                    incoming.failed = True  # no callbacks: there will be no state_dict to persist
                    if incremental is not None:
                        incremental.unusable(rank, incoming.base_problem)
            views = incoming.prepare()
            for index, view in enumerate(views):
                segment = incoming.segments[index]
                self._post(waits, "recv", view, rank, incoming.seq, _TAG_FIRST_SEGMENT + index,
                           ("segment", rank, (f"receiving bytes {segment.start}..{segment.end} of "
                                              f"{incoming.plan.total_nbytes} from rank {rank}"), index))
            if on_metadata is not None:
                self._callback(incoming, problems, on_metadata, incoming)
            if not views:
                self._finish(incoming, incremental)
        else:  # a segment landed
            if on_segment is not None:
                self._callback(incoming, problems, on_segment, incoming, token[3])
            incoming.remaining -= 1
            if incoming.remaining == 0:
                self._finish(incoming, incremental)

    @staticmethod
    def _finish(incoming: _Incoming, incremental: Incremental | None) -> None:
        incoming.finish()
        if incremental is not None and incoming.storages is not None:
            incremental.landed(incoming.rank, incoming.sending, incoming.storages)

    @staticmethod
    def _raise(problems: list[TransportError], unsendable: _Outgoing | None,
               incomings: dict[int, _Incoming]) -> None:
        problems = list(problems)
        for src, incoming in incomings.items():
            if incoming.mismatch is not None:
                problems.append(TransportError(LOCAL, f"the state_dict from rank {src} cannot be received in place: "
                                               f"{incoming.mismatch}", src))
        if unsendable is not None:
            problems.insert(0, TransportError(UNSENDABLE, f"cannot send the state_dict: {unsendable.error}"))
        if not problems:
            return
        first = problems[0]
        if len(problems) > 1:
            first = TransportError(first.kind, "; ".join(str(p) for p in problems), first.rank)
        cause = unsendable.failure if unsendable is not None else next(
            (p.__cause__ for p in problems if p.__cause__ is not None), None)
        raise first from cause

    @staticmethod
    def _callback(incoming: _Incoming, problems: list[TransportError], fn: Callable, *args: Any) -> None:
        if incoming.failed:
            return
        try:
            fn(*args)
        except Exception as err:
            incoming.failed = True
            problem = TransportError(LOCAL, f"handling the state_dict from rank {incoming.rank} failed: "
                                     f"{err if isinstance(err, StagerError) else f'{type(err).__name__}: {err}'}",
                                     incoming.rank)
            problem.__cause__ = err
            problems.append(problem)

    # ---- small all-gathers ------------------------------------------------------------------------
    def allgather_bytes(self, payload: bytes, what: str, *, deadline: float | None = None) -> list[bytes]:
        """Every rank's ``payload``, in rank order (a collective: every rank of the group calls it),
        bounded like every transfer; ``what`` names the step in a timeout."""
        self.check_usable()
        started = time.monotonic()
        waits = _Waits(deadline if deadline is not None else self.deadline())
        size = self._pg.size()
        try:
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
            self._collective(waits, self._pg.allgather, [lengths], [torch.tensor([len(payload)], dtype=torch.int64)],
                             what)
            counts = [int(t.item()) for t in lengths]
            longest = max(counts)
            self.sent.control += 8 + longest
            self.received.control += size * (8 + longest)
            if not longest:
                return [b""] * size
            mine = torch.zeros(longest, dtype=torch.uint8)
            if payload:
                mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
            self._collective(waits, self._pg.allgather, [gathered], [mine], what)
            return [gathered[i][:counts[i]].numpy().tobytes() for i in range(size)]
        except _DeadlinePassed:
            raise self._break(self._timeout_error((None, None, what), started)) from None
        except TransportError as err:
            self._break(err)
            raise
        except KeyboardInterrupt:
            self._break(TransportError(BROKEN, f"a call was interrupted (KeyboardInterrupt) while {what}"))
            raise
        finally:
            waits.close()

    def _collective(self, waits: _Waits, op: Callable, outputs: Any, inputs: Any, what: str) -> None:
        token = ("collective", None, what)
        try:
            work = op(outputs, inputs)
        except Exception as err:
            raise self._connection_error(token, err) from err
        waits.add("collective", work, token)
        while waits.pending:
            token, err = waits.next()
            if err is not None:
                raise self._connection_error(token, err) from err
