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
* **Broken stays broken.** After a timeout, a lost connection or an interrupt, point-to-point
  messages may still be in flight: every later call raises :data:`BROKEN` at once, saying the
  process group must be re-created (instead of repeating the first error).

Order of operations of one transfer (per peer): header (1 KiB: fields + an error message) →
metadata (JSON) → segments, each on its own tag. Tags carry a per-peer sequence number, so a
failed transfer can never feed stale bytes into the next one. :meth:`PGTransport.allgather_bytes`
is the same machinery for the small all-gathers replication and restore agree through.

Thread Safety:
    One call at a time per transport object; the process group is used from the calling thread
    (and the helper threads that wait for its works).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from . import _native, dtensor
from ._native import StagerError
from .engine import copy_engine, process_pool
from .options import default_num_threads
from .plan import StatePlan, TensorPlan, gc_paused, plan_state_dict
from .tree import decode, dotted, encode, tensor_paths, tensors_by_path

__all__ = [
    "BROKEN", "CONNECTION", "LOCAL", "PROTOCOL", "REMOTE", "TIMEOUT", "UNSENDABLE",
    "PGTransport", "Segment", "TransportError", "segments_of",
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
_VERSION = 2
_HEADER_BYTES = 1024
_HEADER_FIELDS = 8  # magic, version, status, meta_len, total_nbytes, bucket_bytes, chunk_bytes, nsegments
_MESSAGE_AT = 64  # the error message (UTF-8) fills the rest of the header
_STATUS_OK = 0
_STATUS_ERROR = 1
_MAX_META_BYTES = 1 << 30

#: Small storages are coalesced into segments of at least this many bytes.
DEFAULT_BUCKET_BYTES = 4 << 20
#: Large storages are sent in chunks of at most this many bytes.
DEFAULT_CHUNK_BYTES = 16 << 20

_TAG_SEQ_SHIFT = 24
_TAG_SEQ_MOD = 64
_TAG_HEADER = 0
_TAG_META = 1
_TAG_FIRST_SEGMENT = 2


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


class _Outgoing:
    """Everything one send of a state_dict needs: header, metadata, segments and their sources.

    Planned and packed once, however many destinations it goes to."""

    def __init__(self, transport: PGTransport, state_dict: Any) -> None:
        self.error: str | None = None
        self.failure: BaseException | None = None
        self.keep: list[Any] = []
        self.segments: list[Segment] = []
        self.packed: list[int] = []
        self.sources: list[torch.Tensor | None] = []
        self.job: Any = None
        self.meta: torch.Tensor | None = None
        plan = None
        try:
            with gc_paused():
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
        self.segments = segments = segments_of(plan.storages, bucket, chunk)
        self.header = _header(_STATUS_OK, len(meta), plan.total_nbytes, len(segments), bucket, chunk)
        self.meta = torch.frombuffer(bytearray(meta), dtype=torch.uint8) if meta else None
        # Sources: direct segments of CPU storages go from the storage itself; everything else is
        # packed (copy engine for CPU storages, torch copies for device ones) into a pool buffer.
        storages = plan.storages
        self.sources = [None] * len(segments)
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

    @staticmethod
    def _describe(err: Exception, plan: StatePlan | None, state_dict: Any) -> str:
        text = f"{type(err).__name__}: {err}" if not isinstance(err, StagerError) else str(err)
        if plan is not None and plan.opaque:  # name the key of the tensor that can't travel
            where = _path_of(state_dict, plan.opaque[0][2])
            if where is not None and where not in text:
                text = f"{text} (at {where})"
        return text

    def wait_packed(self) -> None:
        if self.job is not None:
            self.job.wait()
            self.job = None


def _header(status: int, meta_len: int, total: int, nsegments: int, bucket: int = 0, chunk: int = 0,
            *, message: str = "") -> torch.Tensor:
    header = torch.zeros(_HEADER_BYTES, dtype=torch.uint8)
    fields = torch.tensor([_MAGIC, _VERSION, status, meta_len, total, bucket, chunk, nsegments], dtype=torch.int64)
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
    tensor does (the caller copies the others' values in afterwards)."""

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

    def read_header(self) -> str | None:
        """Checks the header; returns the peer's error message when it could not send (this
        transfer is then over), else None and the metadata receive is to be posted."""
        (magic, version, status, meta_len, total, bucket, chunk, nsegments), message = _read_header(self.header)
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
        self._announced = (total, bucket, chunk, nsegments)
        self.raw_meta = torch.empty(meta_len, dtype=torch.uint8)
        return None

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
        # DTensors are rebuilt on this rank's own meshes where it has one, else LocalShards.
        dtensor.bind_meshes(plan, dtensor.receiver_meshes(self.transport.mesh, self.inplace, self.sent),
                            required=False)
        storages = plan.storages
        targets = {}
        if self.inplace is not None:
            if self.strict:
                self.mismatch = _first_mismatch(plan, self.meta, self.inplace)
            if self.mismatch is None:
                targets = _inplace_targets(plan, self.meta, self.inplace, exact=self.strict)
        self.targets = targets
        needs_buffer = any(not (seg.direct and seg.first in targets) for seg in self.segments)
        if needs_buffer and plan.total_nbytes:
            self.buffer = self.transport._pool.acquire(plan.total_nbytes)
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
        self.result = plan.materialize(self.buffer, targets or None)  # GC is off inside
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
            whose mesh matches none of them is returned as a :class:`~stager.LocalShard`.

    Thread Safety:
        Not thread-safe: one call at a time per object.
    """

    def __init__(self, pg: Any, timeout: timedelta, device: Any, state_dict: Callable[[], Any] | None = None,
                 *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 mesh: Any = None) -> None:
        self._pg = pg
        self.mesh = mesh
        self._timeout = _as_timedelta(timeout)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
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
                 on_segment: Callable[[_Incoming, int], None] | None = None) -> dict[int, Any]:
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

        Raises :class:`TransportError`: :data:`UNSENDABLE` (after telling the destinations),
        :data:`REMOTE` (a source told us it can't send), :data:`LOCAL`, or a fatal kind
        (:data:`TIMEOUT`, :data:`CONNECTION`, :data:`PROTOCOL`), after which the transport
        is broken. ``KeyboardInterrupt`` passes at once and breaks it too."""
        self.check_usable()
        started = time.monotonic()
        waits = _Waits(deadline if deadline is not None else self.deadline())
        problems: list[TransportError] = []  # non-fatal: reported once everything is in
        incomings: dict[int, _Incoming] = {}
        unsendable: _Outgoing | None = None
        try:
            for src in recvs:
                incoming = incomings[src] = _Incoming(self, src, self._next(self._recv_seq, src), inplace,
                                                      strict_inplace)
                self._post(waits, "recv", incoming.header, src, incoming.seq, _TAG_HEADER,
                           ("header", src, f"waiting for the checkpoint header from rank {src}"))
            prepared: dict[int, _Outgoing] = {}
            outgoing_of: dict[int, _Outgoing] = {}
            for dst, state_dict in sends.items():
                outgoing = prepared.get(id(state_dict))
                if outgoing is None:
                    outgoing = prepared[id(state_dict)] = _Outgoing(self, state_dict)
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
                    self._handle(waits, incomings, problems, post_meta=False)
                before_bulk(unsendable.error if unsendable is not None else None)
                if problems or unsendable is not None:  # (before_bulk normally raised already)
                    self._raise(problems, unsendable, incomings)
                for incoming in incomings.values():
                    if not incoming.done:
                        self._post_meta(waits, incoming)
            self._post_bulk(waits, outgoing_of, seqs)
            while waits.pending:
                self._handle(waits, incomings, problems, post_meta=True, on_metadata=on_metadata,
                             on_segment=on_segment)
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

    def _post_bulk(self, waits: _Waits, outgoing_of: dict[int, _Outgoing], seqs: dict[int, int]) -> None:
        """Metadata and segments to every destination (direct segments first: no copy to wait for)."""
        for dst, outgoing in outgoing_of.items():
            if outgoing.error is not None:
                continue
            what = ("sent", dst, f"sending checkpoint bytes to rank {dst}")
            self._post(waits, "send", outgoing.meta, dst, seqs[dst], _TAG_META,
                       ("sent", dst, f"sending checkpoint metadata to rank {dst}"))
            packed = set(outgoing.packed)
            for index, source in enumerate(outgoing.sources):
                if index not in packed:
                    self._post(waits, "send", source, dst, seqs[dst], _TAG_FIRST_SEGMENT + index, what)
        for dst, outgoing in outgoing_of.items():
            if outgoing.error is None and outgoing.packed:
                outgoing.wait_packed()
                what = ("sent", dst, f"sending checkpoint bytes to rank {dst}")
                for index in outgoing.packed:
                    self._post(waits, "send", outgoing.sources[index], dst, seqs[dst], _TAG_FIRST_SEGMENT + index,
                               what)

    def _handle(self, waits: _Waits, incomings: dict[int, _Incoming], problems: list[TransportError], *,
                post_meta: bool, on_metadata: Callable | None = None, on_segment: Callable | None = None) -> None:
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
            elif post_meta:
                self._post_meta(waits, incoming)
        elif kind == "meta":
            incoming.read_metadata()
            views = incoming.prepare()
            for index, view in enumerate(views):
                segment = incoming.segments[index]
                self._post(waits, "recv", view, rank, incoming.seq, _TAG_FIRST_SEGMENT + index,
                           ("segment", rank, (f"receiving bytes {segment.start}..{segment.end} of "
                                              f"{incoming.plan.total_nbytes} from rank {rank}"), index))
            if on_metadata is not None:
                self._callback(incoming, problems, on_metadata, incoming)
            if not views:
                incoming.finish()
        else:  # a segment landed
            if on_segment is not None:
                self._callback(incoming, problems, on_segment, incoming, token[3])
            incoming.remaining -= 1
            if incoming.remaining == 0:
                incoming.finish()

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
