"""Transport: a state_dict over a ``torch.distributed`` process group, full duplex, bounded waits.

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
* **Straight into the pool.** Received bytes land in a buffer of stager's host pool (or, for
  in-place receives, in the target tensors' storages): no per-tensor allocation, no extra copy.
* **Full duplex.** :meth:`PGTransport.exchange` posts every receive and every send at once, so
  both directions of a swap are on the wire together.
* **Bounded.** Every wait honours ``timeout``: a partner that exits, crashes or stalls raises
  :class:`~stager.StagerError` naming that rank, never hangs and never leaks a raw backend error.

Order of operations of one transfer (per peer): header (fixed int64 tensor) → metadata (JSON) →
segments, each on its own tag. Tags carry a per-peer sequence number, so a failed transfer can
never feed stale bytes into the next one.

Thread Safety:
    One transfer at a time per transport object; the process group is used from the calling thread.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from . import _native
from ._native import StagerError
from .engine import copy_engine, process_pool
from .options import default_num_threads
from .plan import StatePlan, gc_paused, plan_state_dict
from .tree import decode, encode, tensor_paths, tensors_by_path

__all__ = ["PGTransport", "Segment", "segments_of"]

_MAGIC = 0x5354_4752  # "STGR"
_VERSION = 1
_HEADER_LEN = 8  # magic, version, status, meta_len, total_nbytes, bucket_bytes, chunk_bytes, nsegments
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
_TAG_ACK = (1 << _TAG_SEQ_SHIFT) - 1


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
        return timeout
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return timedelta(seconds=timeout)
    raise StagerError(f"timeout must be a timedelta or a positive number of seconds, got {timeout!r}")


def _storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of ``storage`` (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Peer:
    """Wraps waits on one peer's works: bounded, and every failure is a StagerError naming it."""

    def __init__(self, transport: "PGTransport", rank: int, role: str) -> None:
        self.transport = transport
        self.rank = rank
        self.role = role  # "partner", "source", "destination"

    def fail(self, what: str, err: BaseException | None) -> StagerError:
        seconds = self.transport._timeout.total_seconds()
        text = str(err) if err is not None else ""
        if "Timed out" in text or "timeout" in text.lower() or "timed out" in text.lower():
            reason = (f"rank {self.rank} did not respond within the {seconds:g}s timeout while {what} "
                      f"(it stalled, died, or is not taking part in this checkpoint)")
        elif "closed" in text.lower() or "reset" in text.lower() or "broken pipe" in text.lower():
            reason = f"rank {self.rank} closed the connection while {what} (it exited or crashed)"
        else:
            first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            reason = f"communication with rank {self.rank} failed while {what}: {first_line[:300]}"
        return StagerError(f"replication with {self.role} rank {self.rank} failed: {reason}")

    def wait(self, work: Any, what: str) -> None:
        try:
            work.wait(self.transport._timeout)
        except StagerError:
            raise
        except Exception as err:  # gloo raises RuntimeError / DistBackendError; never leak them
            raise self.fail(what, err) from err


class _Outgoing:
    """Everything one send of a state_dict needs: header, metadata, segments and their sources."""

    def __init__(self, transport: "PGTransport", state_dict: Any) -> None:
        self.error: str | None = None
        self.keep: list[Any] = []
        try:
            with gc_paused():
                plan = plan_state_dict(state_dict)
                meta = json.dumps(encode(plan), separators=(",", ":"), allow_nan=False).encode()
        except Exception as err:  # tell the receiver at once instead of letting it time out
            self.error = f"{type(err).__name__}: {err}"
            self.failure = err
            message = self.error.encode()[:65536]
            self.header = self._header(_STATUS_ERROR, len(message), 0, 0)
            self.meta = torch.frombuffer(bytearray(message), dtype=torch.uint8) if message else None
            self.plan = None
            self.segments: list[Segment] = []
            return
        self.plan = plan
        bucket, chunk = transport.bucket_bytes, transport.chunk_bytes
        self.segments = segments = segments_of(plan.storages, bucket, chunk)
        self.header = self._header(_STATUS_OK, len(meta), plan.total_nbytes, len(segments), bucket, chunk)
        self.meta = torch.frombuffer(bytearray(meta), dtype=torch.uint8) if meta else None
        # Sources: direct segments of CPU storages go from the storage itself; everything else is
        # packed (copy engine for CPU storages, torch copies for device ones) into a pool buffer.
        storages = plan.storages
        self.sources: list[torch.Tensor | None] = [None] * len(segments)
        packed: list[int] = []
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
                packed.append(index)
                pack_nbytes += -(-segment.nbytes // 64) * 64
        self.packed = packed
        self.job = None
        if packed:
            buffer = transport._pool.acquire(pack_nbytes)
            self.keep.append(buffer)
            copies, owners = [], []
            device_copies = []
            for index in packed:
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
                        copies.append((len(copies), storage.address + begin, target, nbytes))
                        owners.append(storage.storage)
                    else:
                        device_copies.append((storage, begin, nbytes, target))
            if copies:
                self.job = _native.Completion(len(copies))
                transport._copier.submit(buffer, self.job, copies, owners)
            for storage, begin, nbytes, target in device_copies:
                dst = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=target)
                dst.copy_(_storage_bytes(storage.storage)[begin:begin + nbytes])

    @staticmethod
    def _header(status: int, meta_len: int, total: int, nsegments: int,
                bucket: int = 0, chunk: int = 0) -> torch.Tensor:
        return torch.tensor([_MAGIC, _VERSION, status, meta_len, total, bucket, chunk, nsegments],
                            dtype=torch.int64)


class _Incoming:
    """One receive in progress: header → metadata → segments into the pool (or in place)."""

    def __init__(self, transport: "PGTransport", peer: _Peer, seq: int,
                 inplace: Any = None) -> None:
        self.transport = transport
        self.peer = peer
        self.seq = seq
        self.inplace = inplace
        self.header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        self.header_work = transport._recv(self.header, peer.rank, seq, _TAG_HEADER, peer)
        self.works: list[Any] = []
        self.plan: StatePlan | None = None
        self.meta: dict | None = None

    def read_metadata(self) -> None:
        peer = self.peer
        peer.wait(self.header_work, f"waiting for the checkpoint header from rank {peer.rank}")
        magic, version, status, meta_len, total, bucket, chunk, nsegments = (int(v) for v in self.header.tolist())
        if magic != _MAGIC or version != _VERSION:
            raise StagerError(f"rank {peer.rank} sent an unknown checkpoint header "
                              f"(magic {magic:#x}, version {version}): mismatched stager versions?")
        if not 0 <= meta_len <= _MAX_META_BYTES:
            raise StagerError(f"rank {peer.rank} sent a header with an invalid metadata length {meta_len}")
        raw = torch.empty(meta_len, dtype=torch.uint8)
        if meta_len:
            work = self.transport._recv(raw, peer.rank, self.seq, _TAG_META, peer)
            peer.wait(work, f"receiving checkpoint metadata from rank {peer.rank}")
        text = raw.numpy().tobytes()
        if status != _STATUS_OK:
            raise StagerError(f"rank {peer.rank} could not send its state_dict: "
                              f"{text.decode(errors='replace')}")
        try:
            with gc_paused():
                meta = json.loads(text)
                plan = decode(meta)
        except (ValueError, RecursionError) as err:
            raise StagerError(f"rank {peer.rank} sent invalid checkpoint metadata: {err}") from err
        if plan.total_nbytes != total or bucket <= 0 or chunk <= 0:
            raise StagerError(f"rank {peer.rank} sent inconsistent checkpoint metadata "
                              f"({total} bytes announced, {plan.total_nbytes} described)")
        self.segments = segments_of(plan.storages, bucket, chunk)
        if len(self.segments) != nsegments:
            raise StagerError(f"rank {peer.rank} announced {nsegments} segments, metadata gives {len(self.segments)}")
        self.meta = meta
        self.plan = plan

    def post(self) -> None:
        """Posts a receive for every segment (into the pool buffer, or in place)."""
        plan = self.plan
        storages = plan.storages
        self.targets = targets = _inplace_targets(plan, self.meta, self.inplace) if self.inplace is not None else {}
        needs_buffer = any(not (seg.direct and seg.first in targets) for seg in self.segments)
        if needs_buffer and plan.total_nbytes:
            self.buffer = self.transport._pool.acquire(plan.total_nbytes)
        else:
            self.buffer = bytearray(0)
        self.views: list[torch.Tensor] = []
        for index, segment in enumerate(self.segments):
            if segment.direct and segment.first in targets:
                begin = segment.start - storages[segment.first].offset
                view = _storage_bytes(targets[segment.first])[begin:begin + segment.nbytes]
            else:
                view = torch.frombuffer(self.buffer, dtype=torch.uint8, count=segment.nbytes, offset=segment.start)
            self.views.append(view)
            self.works.append(self.transport._recv(view, self.peer.rank, self.seq, _TAG_FIRST_SEGMENT + index, self.peer))

    def wait_segment(self, index: int) -> None:
        segment = self.segments[index]
        self.peer.wait(self.works[index], f"receiving bytes {segment.start}..{segment.end} of "
                                          f"{self.plan.total_nbytes} from rank {self.peer.rank}")

    def finish(self) -> Any:
        """Builds the received state_dict once every segment has arrived."""
        plan = self.plan
        targets = self.targets
        if not targets:
            return plan.materialize(self.buffer)  # GC is off inside
        direct = {s.first for s in self.segments if s.direct}
        for index, target in targets.items():
            storage = plan.storages[index]
            if index not in direct and storage.nbytes:
                src = torch.frombuffer(self.buffer, dtype=torch.uint8, count=storage.nbytes, offset=storage.offset)
                _storage_bytes(target).copy_(src)
        return plan.materialize(self.buffer, targets)


def _inplace_targets(plan: StatePlan, meta: dict, inplace: Any) -> dict[int, torch.UntypedStorage]:
    """storage index → the storage of the in-place tensor at the same key path, where the sizes
    match and the tensor is a plain CPU tensor (like PyTorch: the whole storage is received)."""
    leaves = tensors_by_path(inplace)
    targets: dict[int, torch.UntypedStorage] = {}
    used: set[int] = set()
    for index, path in tensor_paths(meta).items():
        tensor = leaves.get(path)
        if not isinstance(index, int) or not 0 <= index < len(plan.tensors) or tensor is None:
            continue
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != "cpu":
            continue
        storage_index = plan.tensors[index].storage_index
        if storage_index in targets:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() != plan.storages[storage_index].nbytes or storage.data_ptr() in used:
            continue
        used.add(storage.data_ptr())
        targets[storage_index] = storage
    return targets


class PGTransport:
    """Drop-in for ``torch.distributed.checkpoint._pg_transport.PGTransport``.

    Args:
        pg: the process group to communicate over (its point-to-point send/recv are used).
        timeout: bound on every wait (``timedelta`` or seconds); a peer that doesn't make
            progress within it raises :class:`~stager.StagerError` naming that peer.
        device: where the wire tensors live; CPU (gloo) is the supported path.
        state_dict: optional callable returning a state_dict whose tensors receive in place
            (matched by key path; a storage of the same byte size receives the bytes directly).

    Thread Safety:
        Not thread-safe: one transfer at a time per object.
    """

    def __init__(self, pg: Any, timeout: timedelta, device: Any, state_dict: Callable[[], Any] | None = None,
                 *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self._pg = pg
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

    # ---- low level -----------------------------------------------------------------------------
    @staticmethod
    def _tag(seq: int, index: int) -> int:
        return ((seq % _TAG_SEQ_MOD) << _TAG_SEQ_SHIFT) | index

    def _send(self, tensor: torch.Tensor, dst: int, seq: int, index: int, peer: _Peer) -> Any:
        try:
            return self._pg.send([tensor], dst, self._tag(seq, index))
        except Exception as err:
            raise peer.fail("sending", err) from err

    def _recv(self, tensor: torch.Tensor, src: int, seq: int, index: int, peer: _Peer) -> Any:
        try:
            return self._pg.recv([tensor], src, self._tag(seq, index))
        except Exception as err:
            raise peer.fail("receiving", err) from err

    def _next(self, table: dict[int, int], rank: int) -> int:
        seq = table.get(rank, 0)
        table[rank] = seq + 1
        return seq

    def _post_sends(self, outgoing: _Outgoing, dst: int, peer: _Peer) -> list[tuple[Any, str]]:
        seq = self._next(self._send_seq, dst)
        works = [(self._send(outgoing.header, dst, seq, _TAG_HEADER, peer), "sending the checkpoint header")]
        if outgoing.meta is not None:
            works.append((self._send(outgoing.meta, dst, seq, _TAG_META, peer), "sending checkpoint metadata"))
        if outgoing.error is not None:
            return works
        packed = set(outgoing.packed)
        for index, source in enumerate(outgoing.sources):  # direct segments first: no copy to wait for
            if index not in packed:
                works.append((self._send(source, dst, seq, _TAG_FIRST_SEGMENT + index, peer), "sending checkpoint bytes"))
        if outgoing.packed:
            if outgoing.job is not None:
                outgoing.job.wait()
            for index in outgoing.packed:
                works.append((self._send(outgoing.sources[index], dst, seq, _TAG_FIRST_SEGMENT + index, peer),
                              "sending checkpoint bytes"))
        return works

    # ---- PyTorch's interface -------------------------------------------------------------------
    def send_checkpoint(self, dst_ranks: list[int], state_dict: Any) -> None:
        """Sends ``state_dict`` to every rank in ``dst_ranks``; returns once all bytes are sent."""
        outgoing = _Outgoing(self, state_dict)
        pending = []
        for dst in dst_ranks:
            peer = _Peer(self, dst, "destination")
            pending.extend((peer, work, what) for work, what in self._post_sends(outgoing, dst, peer))
        for peer, work, what in pending:
            peer.wait(work, what)
        if outgoing.error is not None:
            raise StagerError(f"cannot send the state_dict: {outgoing.error}") from outgoing.failure

    def recv_checkpoint(self, src_rank: int) -> Any:
        """Receives a state_dict from ``src_rank`` (in place where the ``state_dict`` callable's
        tensors fit) and returns it."""
        return self.exchange(None, None, src_rank)

    # ---- full duplex -----------------------------------------------------------------------------
    def exchange(self, dst_rank: int | None, state_dict: Any, src_rank: int | None, *,
                 on_metadata: Callable[[_Incoming], Any] | None = None,
                 on_segment: Callable[[_Incoming, int], None] | None = None,
                 confirm: Callable[[Any], None] | None = None) -> Any:
        """Sends ``state_dict`` to ``dst_rank`` while receiving one from ``src_rank`` (either may be
        None), both directions in flight at once. Returns the received state_dict (or None).

        ``on_metadata(incoming)`` runs once the received structure is known, before any bytes
        arrive; ``on_segment(incoming, i)`` runs as each segment lands (e.g. to persist it).

        With ``confirm`` (both ranks given, and the peers exchanging with ``confirm`` too), the
        transfer is acknowledged end to end: ``confirm(received)`` runs once everything arrived
        (e.g. to make the replica durable), its success or failure is sent back to ``src_rank``,
        and this call returns only after ``dst_rank`` acknowledged, so success means the
        destination holds (and has persisted) this rank's state_dict."""
        same = dst_rank is not None and dst_rank == src_rank
        incoming = None
        if src_rank is not None:
            peer = _Peer(self, src_rank, "partner" if same else "source")
            inplace = self._state_dict() if self._state_dict is not None else None
            incoming = _Incoming(self, peer, self._next(self._recv_seq, src_rank), inplace)
        sends: list[tuple[_Peer, Any, str]] = []
        outgoing = None
        acknowledged = confirm is not None and dst_rank is not None and src_rank is not None
        if acknowledged:
            ack_in = torch.zeros(2, dtype=torch.int64)
            ack_seq = self._send_seq.get(dst_rank, 0)  # the sequence number of the send below
            ack_peer = _Peer(self, dst_rank, "partner" if same else "destination")
            ack_work = self._recv(ack_in, dst_rank, ack_seq, _TAG_ACK, ack_peer)
        if dst_rank is not None:
            outgoing = _Outgoing(self, state_dict)
            dpeer = _Peer(self, dst_rank, "partner" if same else "destination")
            sends = [(dpeer, work, what) for work, what in self._post_sends(outgoing, dst_rank, dpeer)]
            if outgoing.error is not None:  # the partner learns it from the header; then fail here
                for peer, work, what in sends:
                    peer.wait(work, what)
                raise StagerError(f"cannot send the state_dict: {outgoing.error}") from outgoing.failure
        result = None
        if incoming is not None:
            incoming.read_metadata()
            incoming.post()
            if on_metadata is not None:
                on_metadata(incoming)
            for index in range(len(incoming.segments)):
                incoming.wait_segment(index)
                if on_segment is not None:
                    on_segment(incoming, index)
        if incoming is not None:
            result = incoming.finish()
        if acknowledged:
            status, failure = _STATUS_OK, None
            try:
                confirm(result)
            except BaseException as err:  # tell the source, then fail here
                status, failure = _STATUS_ERROR, err
            ack_out = torch.tensor([_MAGIC, status], dtype=torch.int64)
            sends.append((incoming.peer, self._send(ack_out, src_rank, incoming.seq, _TAG_ACK, incoming.peer),
                          "acknowledging the replica"))
            if failure is not None:
                for peer, work, what in sends[-1:]:
                    peer.wait(work, what)
                raise failure
        for peer, work, what in sends:
            peer.wait(work, what)
        if acknowledged:
            ack_peer.wait(ack_work, f"waiting for rank {dst_rank} to acknowledge this rank's state_dict")
            magic, status = (int(v) for v in ack_in.tolist())
            if magic != _MAGIC or status != _STATUS_OK:
                raise StagerError(f"replication with {ack_peer.role} rank {dst_rank} failed: rank {dst_rank} "
                                  "received this rank's state_dict but could not keep it (see that rank's error)")
        return result

