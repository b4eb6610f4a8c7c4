"""PGTransport: rounds of sends and receives over a process group's point-to-point ``send``/``recv``,
every direction in flight at once, each wait bounded (see the package doc of :mod:`stager.transport`).
"""

from __future__ import annotations

import atexit
import gc
import time
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from .. import dtensor
from .._native import StagerError
from ..engine import copy_engine, process_pool
from ..options import default_num_threads
from .delta import Incremental
from .errors import BROKEN, CONNECTION, LOCAL, REMOTE, TIMEOUT, UNSENDABLE, TransportError, _first_line
from .incoming import Incoming
from .outgoing import _Outgoing, _Payload
from .waits import _as_timedelta, _DeadlinePassed, _Waits
from .wire import (
    _TAG_DELTA,
    _TAG_FIRST_SEGMENT,
    _TAG_HEADER,
    _TAG_META,
    _TAG_SEQ_MOD,
    _TAG_SEQ_SHIFT,
    DEFAULT_BUCKET_BYTES,
    DEFAULT_CHUNK_BYTES,
    WireBytes,
)

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

    def _post(self, waits: _Waits, op: str, tensor: torch.Tensor | None, peer: int, seq: int, index: int,
              token: tuple) -> None:
        # Every message is posted once its buffer exists (a payload's sources once packed, an
        # incoming's metadata buffer once its header was read): None here is a bug of the caller.
        assert tensor is not None, f"no buffer for message {index} to rank {peer}"
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
                 on_metadata: Callable[[Incoming], Any] | None = None,
                 on_segment: Callable[[Incoming, int], None] | None = None,
                 incremental: Incremental | None = None,
                 receive_buffer: Callable[[Incoming], Any] | None = None) -> dict[int, Any]:
        """Sends ``sends[dst]`` to each ``dst`` while receiving one state_dict from each rank of
        ``recvs``, everything in flight at once; returns ``{src: received state_dict}``.

        Values of ``sends`` that are the same object are planned and packed once. ``inplace``:
        a state_dict whose tensors receive in place (every source's; with ``strict_inplace``
        a source whose storages don't all fit is received into fresh memory instead and the
        call fails with :data:`LOCAL`, naming the key; see :class:`Incoming`).

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
        incomings: dict[int, Incoming] = {}
        unsendable: _Outgoing | None = None
        try:
            for src in recvs:
                incoming = incomings[src] = Incoming(self, src, self._next(self._recv_seq, src), inplace,
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

    def _post_meta(self, waits: _Waits, incoming: Incoming) -> None:
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
            offer = outgoing.offer
            delta = (outgoing.delta is not None and offer is not None and incremental is not None
                     and incremental.accepts(dst, offer.base))
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

    def _handle(self, waits: _Waits, incomings: dict[int, Incoming], problems: list[TransportError], *,
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
            self._callback(incoming, problems, incoming.segment_landed, token[3])
            incoming.remaining -= 1
            if incoming.remaining == 0:
                self._finish(incoming, incremental)

    @staticmethod
    def _finish(incoming: Incoming, incremental: Incremental | None) -> None:
        incoming.finish()
        if incremental is not None and incoming.storages is not None:
            incremental.landed(incoming.rank, incoming.sending, incoming.storages)

    @staticmethod
    def _raise(problems: list[TransportError], unsendable: _Outgoing | None,
               incomings: dict[int, Incoming]) -> None:
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
    def _callback(incoming: Incoming, problems: list[TransportError], fn: Callable, *args: Any) -> None:
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
            token, failure = waits.next()
            if failure is not None:
                raise self._connection_error(token, failure) from failure
