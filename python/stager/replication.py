"""Replication: each rank's state_dict held, in memory and on disk, by ranks on other nodes.

:class:`ReplicationStager` is a drop-in for PyTorch's ``_ReplicationStager``: ``stage(sd)`` sends
``sd`` to this rank's holders over the process group and returns the state_dict it received from
its first source (the input itself when no process group is initialized). It differs in what
PyTorch leaves out:

* **placement** (:mod:`stager.placement`): ``replicas=k`` holders per rank on ``k`` failure domains
  other than its own (``ranks_per_node``, default torchrun's ``LOCAL_WORLD_SIZE``, or 1 rank per
  domain when that default puts the whole group on one node); with
  ``replicas=1`` and ``topology="pairs"`` PyTorch's partner ``(rank + world // 2) % world``
  whenever it lies on another node, the ring ``r → r + 1`` for odd sizes; every world size ≥ 2;
  an impossible placement raises :class:`~stager.StagerError` before anything is sent;
* the exchange is full duplex, bucketed and concurrent over all holders and sources
  (:class:`stager.transport.PGTransport`);
* every received replica is persisted in ``storage_dir`` (``persist_format="stager"``: a
  checksummed, safetensors-compatible ``.stager`` file that :func:`stager.load` reads, written as
  its bytes arrive; ``"torch"``: PyTorch's ``.pt``; None: memory only), and ``keep_own=True``
  persists this rank's own state_dict there too;
* every copy records its owner, holder, world size and ``step`` (``.stager``: header metadata;
  ``.pt``: a ``stager_replica.json`` record in the zip archive, which ``torch.load`` ignores);
* **generations**: a crash at any instant of ``stage()``, on any rank, leaves a step whose copies
  every rank can restore (the previous one at worst), see below;
* a failure on any rank (a leaf that can't be sent, a peer that dies or stalls, a full disk)
  raises a :class:`~stager.StagerError` on every rank, within the timeout, and leaves no partial
  file; :meth:`ReplicationStager.restore` turns the copies back into every rank's state.

**Files** (``h`` the holder, ``o`` the owner, ``ext`` ``stager`` or ``pt``):

* ``rank_{h}_replica_partner_{o}.{ext}``: the newest copy (``o == h`` is the own copy of
  ``keep_own``);
* ``rank_{h}_replica_partner_{o}.previous.{ext}``: the kept previous generation;
* ``rank_{h}_replica_partner_{o}.{ext}.{pid}.pending.tmp`` (and the writers' own temp files
  under it): a copy being written; never read, removed by the next stage of that rank.

**Order of operations of one stage()**, every rank:

1. plan this rank's state_dict; post the headers to the holders and from the sources (a header
   says whether its sender can send, and names the key that can't travel);
2. once every header is through (every peer is taking part), one all-gather agrees on the step
   (the given ``step``, else one more than the newest step any rank has seen), the settings,
   and who may fail: any rank's error raises the same StagerError on every rank, before a byte
   of state_dict is sent;
3. every metadata message and segment is posted at once; each replica streams into its pending
   file as it lands (the own copy is written meanwhile); each is fsynced;
4. a second all-gather: every rank says whether it holds all its copies durably; if any does
   not, every rank removes its pending files and raises the same error;
5. publish: per copy, the previous generation to keep is renamed aside (rename, directory fsync),
   then the pending file over the newest name (rename, directory fsync).

A replica of step ``s`` is therefore removed only when every holder has ``s + 1`` durably
(step 4), and every holder has published ``s`` before any rank takes part in step 4 of ``s + 1``.
The generation kept aside at step 5 is the newest step older than the new one that the
all-gather of step 2 found complete (every owner held by some rank), else the newest older one;
so a crash inside step 5 on any subset of ranks leaves that step restorable on every rank. At
most two generations per copy are kept; copies of a newer step than the one being published
(from an abandoned timeline) are dropped.

**Incremental** (``skip_unchanged=True``): a holder that already has this owner's previous step
receives only the storages that changed since (the rule of :mod:`stager.incremental`: same
storage object, address, size and version counters at the sender), and builds the new step from
its copy of the previous one plus those bytes; it still persists a complete, self-contained copy
file through the normal atomic path, which :func:`stager.load` and ``restore()`` read like any
other. The protocol, inside the order of operations above (:class:`_Deltas`):

* every sending has a random id; the sender's header carries it, and, when some storage is
  unchanged since its last *committed* sending, that sending's id as the base (nothing else: the
  reuse map waits for the holder's answer). A holder records the id with its copy (in memory, and
  in the file: ``stager.replica.sending``);
* in the step-2 all-gather each holder says, per source that offered a base, whether it holds
  that very sending: in memory from its previous stage(), else in its copy file (read and every
  checksum verified first). A holder that restarted with a damaged or missing file, or one that
  holds another sending, says nothing: its source sends it everything, without an error;
* to a holder that holds the base, the sender sends the metadata, then a delta message (the
  reuse map as runs of ``[index, base index, length]``, a few bytes per run), then only the
  changed storages' bytes, packed as in its reusing table: unchanged storages cost no bytes on
  the wire. The holder takes the reused storages from its base (no copy: the new replica shares
  their memory with the previous one, so treat received replicas as read-only) and checks their
  sizes (and, with ``STAGER_CHECK_UNCHANGED=1`` on the sender, their crc32c);
* the sender's tracker and the holders' bases move on only when the step is committed; after a
  failed stage the sender sends everything once (the holders keep their previous bases).

:attr:`ReplicationStager.last_sent` / :attr:`~ReplicationStager.last_received` count the bytes of
the latest stage() on the wire (:class:`stager.transport.WireBytes`).

In memory, the stager also keeps the replicas of its newest step (for a survivor's
:meth:`~ReplicationStager.restore` without reading the disk; with ``persist_format=None`` they
are the only copies, kept until the next step is committed everywhere). ``close()`` drops them.

**Surviving a restart** (``survive_restart=True``, :mod:`stager.segments`): each replica is
received straight into a named shared-memory segment (the transport's ``receive_buffer``; an
incremental receive, which builds on the previous step's memory, is copied into one), and the
own copy of ``keep_own`` is staged into one and written to disk from there. The segments of
a stage are published (checksummed, renamed) in step 4, before the vote, and removed again if
the vote fails; after the commit each (holder, owner) keeps this step and the one older step
``safe`` names, and once every rank is in the next stage (step 2) generations older than the
newest restorable step are removed, so at most two exist while a third arrives. A segment that
cannot be created (shared memory full, directory missing) fails the stage on every rank; the
previous generation stays.

:func:`stager.find_replicas` lists the copies in a directory and :func:`stager.recover` loads
the newest copy of a given rank (:mod:`stager.replica_files`: the copy files' names, records and
loading).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
from collections.abc import Sequence
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import AsyncStager

from . import _native, files, recovery, segments
from ._native import StagerError
from .incremental import CHECK_ENV, UnchangedStorages
from .placement import Placement, default_ranks_per_node, place
from .plan import StatePlan, plan_state_dict
from .replica_files import (
    _TEMP,
    EXTENSIONS,
    StreamingReplica,
    _metadata,
    _pending_path,
    _pid_alive,
    _record,
    _remove_quietly,
    _scan,
    _sending_of,
    _write_copy,
    load_replica,
    read_record,
    replica_path,
)
from .transport import BROKEN, Offer, PGTransport, ReceivedStorages, TransportError, WireBytes, _as_timedelta

__all__ = ["ReplicationStager"]

# ---- incremental replication -------------------------------------------------------------------------


def _storages_of(state_dict: Any) -> list[Any]:
    """The storages of a received (or loaded) state_dict, in the order of its sender's plan: a
    fresh result of the same tree has its tensors and storages in the same order."""
    return plan_state_dict(state_dict).table.storage_objects


class _Base:
    """A holder's copy of one sending: its id and its storages (index = the sender's; a
    :class:`~stager.transport.ReceivedStorages` lists them when first needed)."""

    __slots__ = ("sending", "_storages")

    def __init__(self, sending: int, storages: list[Any] | ReceivedStorages) -> None:
        self.sending = sending
        self._storages = storages

    @property
    def storages(self) -> list[Any]:
        if isinstance(self._storages, ReceivedStorages):
            self._storages = self._storages.list()
        return self._storages


class _Deltas:
    """``ReplicationStager(skip_unchanged=True)``: the :class:`stager.transport.Incremental`
    policy of its transfers, and what it keeps between stages.

    As a sender: an :class:`~stager.incremental.UnchangedStorages` tracker of the last committed
    sending (each storage recorded with its index there) and that sending's id. As a holder: per
    source, the id and storages of the copy of its last committed sending (:class:`_Base`). The
    protocol is in the module doc.

    Thread Safety:
        Used by one stage() at a time (its stager's).
    """

    def __init__(self) -> None:
        self.tracker = UnchangedStorages()
        self.sent = 0  # id of the sending the tracker describes (0: none)
        self.bases: dict[int, _Base] = {}
        self.begin()

    def begin(self) -> None:
        """A new stage: forgets the previous stage's offer, announcements and claims."""
        self._plan: StatePlan | None = None
        self._offer: Offer | None = None
        self._announced: dict[int, tuple[int, int]] = {}  # src → (sending, base)
        self._claimed: dict[int, _Base] = {}
        self._accepted: set[int] = set()
        self._landed: dict[int, _Base] = {}

    # ---- the transport's questions (stager.transport.Incremental) ------------------------------
    def plan(self, state_dict: Any) -> tuple[StatePlan, Offer]:
        plan = plan_state_dict(state_dict, track_versions=True)
        reuse = self.tracker.unchanged(plan) if self.sent else {}
        check = None
        if reuse and os.environ.get(CHECK_ENV, "") not in ("", "0"):
            sources, devices = plan.table.storage_objects, plan.table.storage_devices
            check = [_native.storage_crc32c(sources[i]) if devices[i] is None else None for i in sorted(reuse)]
        offer = Offer(secrets.randbits(62) | 1, self.sent if reuse else 0, self.tracker.storage_count,
                      reuse or None, check)
        self._plan, self._offer = plan, offer
        return plan, offer

    def announced(self, src: int, sending: int, base: int) -> None:
        self._announced[src] = (sending, base)

    def accepts(self, dst: int, base: int) -> bool:
        return bool(base) and dst in self._accepted

    def base(self, src: int, base: int) -> list[Any] | None:
        claim = self._claimed.get(src)
        return claim.storages if claim is not None and claim.sending == base else None

    def unusable(self, src: int, reason: str) -> None:
        self._claimed.pop(src, None)  # not kept after this (failing) stage: the next one sends everything

    def landed(self, src: int, sending: int, storages: ReceivedStorages) -> None:
        self._landed[src] = _Base(sending, storages)

    # ---- the stager's steps ---------------------------------------------------------------------
    def sending_of(self, src: int) -> int:
        """The id of the sending ``src`` announced in this stage (0: none)."""
        return self._announced.get(src, (0, 0))[0]

    def claim(self, storage_dir: str, rank: int, persist_format: str | None) -> dict[str, int]:
        """Before the agreement: ``{src: base}`` for every source whose offered base this holder
        has intact, in memory or in its copy file (every checksum verified). Bases of no use in
        this stage are dropped (their memory is free for the full receive)."""
        claims: dict[str, int] = {}
        for src, (_, base) in self._announced.items():
            if not base:
                continue
            held = self.bases.get(src)
            if held is None or held.sending != base:
                held = self._from_disk(storage_dir, rank, src, base, persist_format)
            if held is not None:
                self._claimed[src] = held
                claims[str(src)] = base
        self.bases = {}
        return claims

    @staticmethod
    def _from_disk(storage_dir: str, rank: int, src: int, base: int, persist_format: str | None) -> _Base | None:
        """The copy of sending ``base`` in this holder's files of ``src`` (newest or kept previous
        generation), read with every checksum verified; None when missing, other or damaged."""
        if persist_format is None:
            return None
        for previous in (False, True):
            path = replica_path(storage_dir, rank, src, persist_format, previous=previous)
            try:
                if _sending_of(path) != base:
                    continue
                return _Base(base, _storages_of(load_replica(path, verify=True)))
            except (StagerError, OSError):
                continue  # missing or damaged: the sender sends everything
        return None

    def agreed(self, blobs: list[bytes], rank: int) -> None:
        """After the agreement: the destinations that hold this rank's offered base."""
        offer = self._offer
        if offer is None or not offer.base:
            return
        for dst, record in enumerate(_parse(blobs, "agreement")):
            bases = record.get("bases")
            if isinstance(bases, dict) and bases.get(str(rank)) == offer.base:
                self._accepted.add(dst)

    def commit(self, received: dict[int, Any]) -> None:
        """The stage is committed everywhere: the tracker describes this sending, and the copies
        received in it (``received``, src → state_dict) are the bases of the next stage."""
        if self._plan is not None and self._offer is not None:
            self.tracker.remember(self._plan)
            self.sent = self._offer.sending
        self.bases = {src: base for src, base in self._landed.items() if received.get(src) is not None}
        self.begin()

    def abandon(self) -> None:
        """The stage failed: the next one sends everything (whatever made this one fail, e.g. a
        write the version counter missed, found by the holder's check, is not repeated); the
        holders keep their bases of the last committed stage."""
        self.tracker.forget()
        self.sent = 0
        self.bases.update(self._claimed)
        self.begin()

    def close(self) -> None:
        self.tracker.forget()
        self.sent = 0
        self.bases = {}
        self.begin()


# ---- the stager ---------------------------------------------------------------------------------


class _Copy:
    """One copy this rank writes in a stage: where it goes and what it records."""

    __slots__ = ("final", "owner", "pending", "persist_format", "previous", "record", "state_dict", "writer")

    def __init__(self, storage_dir: str, holder: int, owner: int, persist_format: str, record: dict[str, int]) -> None:
        self.owner = owner
        self.persist_format = persist_format
        self.final = replica_path(storage_dir, holder, owner, persist_format)
        self.previous = replica_path(storage_dir, holder, owner, persist_format, previous=True)
        self.pending = _pending_path(self.final)
        self.record = record
        self.writer: StreamingReplica | None = None
        self.state_dict: Any = None


class ReplicationStager(AsyncStager):
    """Drop-in for ``torch.distributed.checkpoint.staging._ReplicationStager``.

    ``stage(state_dict)`` sends ``state_dict`` to this rank's holders, receives the state_dicts
    it holds, persists them (see ``persist_format``) and returns the one of its first source;
    without an initialized process group (or with one rank) it returns ``state_dict`` itself. A
    successful ``stage()`` means every rank holds all its copies of this step durably. The order
    of operations is in the module doc. ``should_synchronize_after_execute`` is False, like
    PyTorch's.

    Args:
        pg: process group (default: the default group at stage time).
        timeout: bound on each call; a peer that doesn't make progress within it raises
            :class:`~stager.StagerError` naming it where it is known.
        device: device of the wire tensors (CPU for gloo).
        storage_dir: where copies are persisted (default: a new temp directory, like PyTorch).
        topology: ``"pairs"`` (PyTorch's partner; a ring for odd world sizes) or ``"ring"``.
        persist_format: ``"stager"`` (``.stager``, :func:`stager.save`'s format, written while
            the bytes arrive), ``"torch"`` (``.pt`` via ``torch.save``) or None (memory only).
        replicas: holders per rank, each on another failure domain (:mod:`stager.placement`).
        ranks_per_node: ranks per failure domain (default: ``LOCAL_WORLD_SIZE``, else 1; a default
            that puts the whole group on one node means one rank per domain, see :meth:`placement`).
        keep_own: also persist this rank's own state_dict in ``storage_dir`` (so a node that
            survives restores its ranks from local disk).
        skip_unchanged: send a holder that has this rank's previous step only the storages that
            changed since (see the module doc); its copy file is still complete. Received replicas
            then share the bytes of unchanged storages with the previous ones: treat them as
            read-only.
        survive_restart: keep the replicas this rank holds (and, with ``keep_own``, its own
            copy) in named shared memory that outlives the process (:mod:`stager.segments`):
            the buffers they are received or staged into are the segments, and ``restore()`` in
            a restarted process takes them before any file. Free them with
            :func:`stager.release_shared_memory` at the end of the job.

    Thread Safety:
        One ``stage()``/``restore()`` at a time; every rank of the group must call them the same
        number of times, in the same order.
    """

    _synchronize_after_execute: bool = False

    def __init__(self, pg: Any = None, timeout: timedelta = timedelta(minutes=30), device: Any = "cpu",
                 storage_dir: str | None = None, *, topology: str = "pairs",
                 persist_format: str | None = "stager", replicas: int = 1, ranks_per_node: int | None = None,
                 keep_own: bool = False, skip_unchanged: bool = False, survive_restart: bool = False) -> None:
        if topology not in ("pairs", "ring"):
            raise StagerError(f"topology must be 'pairs' or 'ring', got {topology!r}")
        if persist_format is not None and persist_format not in EXTENSIONS:
            raise StagerError(f"persist_format must be 'stager', 'torch' or None, got {persist_format!r}")
        if type(replicas) is not int or replicas < 1:
            raise StagerError(f"replicas must be a positive int, got {replicas!r}")
        self._ranks_per_node_given = ranks_per_node is not None
        if ranks_per_node is None:
            ranks_per_node = default_ranks_per_node()
        if type(ranks_per_node) is not int or ranks_per_node < 1:
            raise StagerError(f"ranks_per_node must be a positive int or None, got {ranks_per_node!r}")
        if type(keep_own) is not bool:
            raise StagerError(f"keep_own must be a bool, got {keep_own!r}")
        if keep_own and persist_format is None:
            raise StagerError("keep_own=True persists this rank's own state_dict: it needs a persist_format")
        if type(skip_unchanged) is not bool:
            raise StagerError(f"skip_unchanged must be a bool, got {skip_unchanged!r}")
        if type(survive_restart) is not bool:
            raise StagerError(f"survive_restart must be a bool, got {survive_restart!r}")
        self._pg = pg
        self._timeout = _as_timedelta(timeout)
        self._device = torch.device(device)
        self._topology = topology
        self._persist_format = persist_format
        self._replicas = replicas
        self._ranks_per_node = ranks_per_node
        self._keep_own = keep_own
        if storage_dir is None:
            storage_dir = tempfile.mkdtemp(prefix="replication_stager_")
        self._storage_dir = os.fspath(storage_dir)
        # Replicas are persisted there: a read-only one fails now, naming it, not at the first stage.
        files.make_directory(self._storage_dir, "storage_dir", writable=persist_format is not None)
        self._transport: PGTransport | None = None
        #: owner → (step, world_size, state_dict): the replicas of the newest committed step.
        self._memory: dict[int, tuple[int, int, Any]] = {}
        #: (rank, persist_format) the file index below describes
        self._index_key: tuple[int, str] | None = None
        #: owner → {"final": record | None, "previous": record | None}: this rank's copy files.
        self._index: dict[int, dict[str, dict[str, int] | None]] = {}
        #: the newest step this stager or its storage_dir has seen (0: none)
        self._newest_step: int | None = None
        #: skip_unchanged: the sender's tracker and the holder's bases (see _Deltas)
        self._deltas = _Deltas() if skip_unchanged else None
        #: survive_restart: owner → {step: published segment} this rank holds (at most two steps)
        self._survive = survive_restart
        self._segments: dict[int, dict[int, segments.SegmentCopy]] = {}
        #: survive_restart: segments of dropped generations, reused by this stage's copies
        self._spares: list[str] = []
        #: Bytes the latest stage() sent and received, by kind.
        self.last_sent = WireBytes()
        self.last_received = WireBytes()
        #: Of the latest restore(): the step, the rank that served this rank's copy, its tier
        #: ("memory", "shm" or "disk") and where it was ("memory", a segment or a file path).
        self.last_restore: dict[str, Any] | None = None

    # ---- PyTorch's names ------------------------------------------------------------------------
    @property
    def storage_dir(self) -> str:
        return self._storage_dir

    def _get_persisted_path(self, current_rank: int, partner_rank: int) -> str:
        """Where ``current_rank`` persists the newest copy of ``partner_rank``'s state_dict."""
        return replica_path(self._storage_dir, current_rank, partner_rank, self._persist_format or "stager")

    # ---- placement ------------------------------------------------------------------------------
    def placement(self, world_size: int) -> Placement:
        """Where every rank's copies go in a group of ``world_size`` (StagerError when impossible).

        A default ``ranks_per_node`` (``LOCAL_WORLD_SIZE``) that puts the whole group on one node
        (a single-node torchrun job) leaves nothing to spread over: every rank is then its own
        failure domain, like PyTorch's pairs. A ``ranks_per_node`` passed explicitly is held to."""
        ranks_per_node = self._ranks_per_node
        if not self._ranks_per_node_given and ranks_per_node >= world_size:
            ranks_per_node = 1
        return place(world_size, self._replicas, ranks_per_node, self._topology)

    def peers(self, rank: int, world_size: int) -> tuple[int, int | None]:
        """``(first holder, first source)`` of ``rank``."""
        placement = self.placement(world_size)
        return placement.holders[rank][0], placement.first_source(rank)

    # ---- helpers ----------------------------------------------------------------------------------
    def _group(self, pg: Any = None) -> Any:
        if pg is not None:
            return pg
        if self._pg is not None:
            return self._pg
        return dist.distributed_c10d._get_default_group()

    def _transport_for(self, pg: Any) -> PGTransport:
        if self._transport is None or self._transport._pg is not pg:
            self._transport = PGTransport(pg, self._timeout, self._device)
        self._transport.check_usable()
        return self._transport

    def _load_index(self, rank: int) -> None:
        """Reads this rank's copy files (and the newest step of the directory) once per rank."""
        fmt = self._persist_format
        if fmt is None:
            return
        if self._index_key == (rank, fmt):  # forget files removed behind our back (a few stats)
            for owner, slots in self._index.items():
                for name, record in slots.items():
                    path = replica_path(self._storage_dir, rank, owner, fmt, previous=name == "previous")
                    if record is not None and not os.path.exists(path):
                        slots[name] = None
            return
        index: dict[int, dict[str, dict[str, int] | None]] = {}
        newest = self._newest_step or 0
        for entry, match in _scan(self._storage_dir):
            try:
                record = read_record(entry.path)
            except StagerError:
                record = None
            if record is not None:
                newest = max(newest, record["step"])
            if int(match.group(1)) != rank or match.group(4) != EXTENSIONS[fmt][1:]:
                continue
            slot = index.setdefault(int(match.group(2)), {"final": None, "previous": None})
            slot["previous" if match.group(3) else "final"] = record
        self._index, self._index_key, self._newest_step = index, (rank, fmt), newest

    def _held(self, world_size: int, rank: int = 0) -> dict[str, list[int]]:
        """owner → steps this rank holds of it (for this world size), for the agreement."""
        held: dict[str, list[int]] = {}
        if self._persist_format is None:
            for owner, (step, world, _) in self._memory.items():
                if world == world_size:
                    held[str(owner)] = [step]
        for owner, slots in self._index.items():
            steps = [r["step"] for r in slots.values() if r is not None and r["world_size"] == world_size]
            if steps:
                held[str(owner)] = steps
        if self._survive:
            for owner, steps in self._segment_steps(world_size, rank).items():
                held[str(owner)] = sorted(set(held.get(str(owner), [])) | set(steps))
        return held

    def _segment_steps(self, world_size: int, rank: int) -> dict[int, list[int]]:
        """owner → steps of the published segments this rank holds (records read, data not)."""
        steps: dict[int, list[int]] = {}
        for segment in segments.find_segments(self._storage_dir):
            if segment.holder != rank:
                continue
            try:
                record = segments.read_segment_record(segment.path)
            except StagerError:
                continue
            if record["world_size"] == world_size and record["owner"] == segment.owner:
                steps.setdefault(segment.owner, []).append(record["step"])
        return steps

    def _sweep_temps(self, rank: int) -> None:
        """Removes this rank's replication temp files left by failed stages or dead processes."""
        me = os.getpid()
        try:
            names = os.listdir(self._storage_dir)
        except OSError:
            return
        for name in names:
            match = _TEMP.match(name)
            if match and int(match.group(1)) == rank:
                pid = int(match.group(2))
                if pid == me or not _pid_alive(pid):
                    _remove_quietly(os.path.join(self._storage_dir, name))

    # ---- stage ---------------------------------------------------------------------------------------
    def stage(self, state_dict: Any, *, step: int | None = None) -> Any:
        """Replicates ``state_dict`` to its holders; returns the state_dict of this rank's first
        source (``state_dict`` itself without a group, or when this rank holds nobody's).
        ``step`` labels the copies (default: one more than the newest step seen)."""
        if step is not None and (type(step) is not int or step < 0):
            raise StagerError(f"step must be a non-negative int or None, got {step!r}")
        if not dist.is_initialized():
            return state_dict
        pg = self._group()
        rank, world = pg.rank(), pg.size()
        if world < 2:
            self._stage_alone(state_dict, rank, step)
            return state_dict
        placement = self.placement(world)  # before anything is sent
        transport = self._transport_for(pg)
        sent, received = transport.sent.copy(), transport.received.copy()
        deltas = self._deltas
        if deltas is not None:
            deltas.begin()
        try:
            return self._replicate(state_dict, step, rank, world, placement, transport)
        except BaseException:
            if deltas is not None:
                deltas.abandon()
            raise
        finally:
            self.last_sent, self.last_received = transport.sent - sent, transport.received - received
            self._release_spares()

    def _replicate(self, state_dict: Any, step: int | None, rank: int, world: int, placement: Placement,
                   transport: PGTransport) -> Any:
        """stage() in a group of two or more: the order of operations of the module doc."""
        fmt = self._persist_format
        deltas = self._deltas
        self._load_index(rank)
        dsts, srcs = placement.holders[rank], placement.sources[rank]
        deadline = transport.deadline()
        agreed: dict[str, Any] = {}
        copies: dict[int, _Copy] = {}
        own: dict[str, Any] = {}
        shm: dict[int, segments.SegmentCopy] = {}  # survive_restart: owner → segment of this stage
        shm_errors: list[BaseException] = []

        def agree(local_error: str | None) -> None:
            proposal = step if step is not None else (self._newest_step or 0) + 1
            bases = deltas.claim(self._storage_dir, rank, fmt) if deltas is not None else {}
            record = {"error": local_error, "step": proposal, "explicit": step is not None,
                      "config": [world, self._replicas, placement.ranks_per_node, self._topology, fmt, self._keep_own],
                      "held": self._held(world, rank), "bases": bases}
            blobs = transport.allgather_bytes(json.dumps(record).encode(), "agreeing on the step to replicate",
                                              deadline=deadline)
            agreed.update(_agree(blobs, world))
            if self._survive:
                self._drop_segments_before(rank, agreed["safe"])
            if deltas is not None:
                deltas.agreed(blobs, rank)
            chosen = agreed["step"]
            if self._survive:
                segments.sweep_temps(self._storage_dir, rank)
            if fmt is not None:
                self._sweep_temps(rank)
                for src in srcs:
                    sending = deltas.sending_of(src) if deltas is not None else 0
                    copies[src] = _Copy(self._storage_dir, rank, src, fmt, _record(src, rank, world, chosen, sending))
                if self._keep_own:
                    own_copy = copies[rank] = _Copy(self._storage_dir, rank, rank, fmt,
                                                    _record(rank, rank, world, chosen))
                    own_shm = (self._storage_dir, rank, shm, self._spare()) if self._survive else None
                    own["thread"] = _start_own_copy(state_dict, own_copy, fmt, own, own_shm)
                self._memory.clear()  # the files hold the older generation: don't keep two in memory too

        def receive_buffer(incoming: Any) -> Any:
            # survive_restart: the replica is received straight into its named segment.
            src = incoming.rank
            sending = deltas.sending_of(src) if deltas is not None else 0
            try:
                copy = segments.SegmentCopy(self._storage_dir, rank, src, agreed["step"], incoming.plan,
                                            incoming.meta, _record(src, rank, world, agreed["step"], sending),
                                            pinned=self._device.type == "cuda", recycle=self._spare())
            except StagerError as err:
                shm_errors.append(err)  # reported in the vote; the bytes still land (in the pool)
                return None
            shm[src] = copy
            return copy.buffer

        def on_metadata(incoming: Any) -> None:
            # An incremental receive holds only the changed storages in its buffer: its copy is
            # written whole from the received state_dict once it is complete (_persist).
            if fmt == "stager" and not incoming.replacements:
                copy = copies[incoming.rank]
                copy.writer = StreamingReplica(copy.pending, incoming, _metadata(copy.record))

        local_error: BaseException | None = None
        received: dict[int, Any] = {}
        try:
            received = transport.transfer({dst: state_dict for dst in dsts}, srcs, deadline=deadline,
                                          before_bulk=agree, on_metadata=on_metadata,
                                          incremental=deltas,
                                          receive_buffer=receive_buffer if self._survive else None)
        except TransportError as err:
            if err.fatal or err.kind == BROKEN or not agreed:
                self._abandon(copies, own, shm)
                raise
            local_error = err  # the transfer completed: tell everyone in the vote
        except BaseException:
            self._abandon(copies, own, shm)
            raise
        if local_error is None and shm_errors:
            local_error = shm_errors[0]
        if local_error is None:
            try:
                self._persist(copies, received, own)
                if self._survive:
                    self._publish_segments(shm, received, srcs, rank, world, agreed["step"])
            except Exception as err:
                local_error = err
        try:
            votes = transport.allgather_bytes(json.dumps({"error": None if local_error is None else str(local_error)})
                                              .encode(), "confirming every rank holds its copies", deadline=deadline)
        except BaseException:
            self._abandon(copies, own, shm)
            if local_error is not None:
                raise local_error from None
            raise
        failed = _failures(votes)
        if failed:
            self._abandon(copies, own, shm)
            raise StagerError(f"replication of step {agreed['step']} failed, nothing was committed: {failed}") \
                from local_error
        chosen = agreed["step"]
        if fmt is not None:
            self._publish(copies, chosen, agreed["safe"])
        if self._survive:
            self._keep_segments(shm, rank, chosen, agreed["safe"])
        if deltas is not None:
            deltas.commit(received)
        self._memory = {src: (chosen, world, received[src]) for src in srcs}
        self._newest_step = max(self._newest_step or 0, chosen)
        first = placement.first_source(rank)
        return received[first] if first is not None else state_dict

    def _stage_alone(self, state_dict: Any, rank: int, step: int | None) -> None:
        """One rank: nothing to replicate; with keep_own the own copy is still written."""
        if not self._keep_own:
            return
        fmt = self._persist_format
        if fmt is None:  # the constructor refuses keep_own without a format
            raise StagerError("keep_own=True needs a persist_format")
        self._load_index(rank)
        self._sweep_temps(rank)
        chosen = step if step is not None else (self._newest_step or 0) + 1
        copy = _Copy(self._storage_dir, rank, rank, fmt, _record(rank, rank, 1, chosen))
        shm: dict[int, segments.SegmentCopy] = {}
        if self._survive:
            segments.sweep_temps(self._storage_dir, rank)
        try:
            source = state_dict
            if self._survive:
                shm[rank], source = segments.stage_into_segment(state_dict, self._storage_dir, rank, rank, chosen,
                                                                copy.record)
            _write_copy(source, copy.pending, fmt, copy.record)
            for segment in shm.values():
                segment.publish()
        except BaseException:
            _remove_quietly(copy.pending)
            for segment in shm.values():
                segment.abort()
            raise
        held = self._held(1, rank).get(str(rank), [])
        safe = max((s for s in held if s < chosen), default=None)
        self._publish({rank: copy}, chosen, safe)
        if shm:
            self._keep_segments(shm, rank, chosen, safe)
        self._newest_step = max(self._newest_step or 0, chosen)

    def _persist(self, copies: dict[int, _Copy], received: dict[int, Any], own: dict[str, Any]) -> None:
        """Makes every copy of this stage durable under its pending name."""
        errors = []
        for owner, copy in copies.items():
            if owner in received:
                try:
                    if copy.writer is not None:
                        writer, copy.writer = copy.writer, None
                        writer.commit()
                    else:
                        _write_copy(received[owner], copy.pending, copy.persist_format, copy.record)
                except Exception as err:
                    errors.append(err)
        thread = own.get("thread")
        if thread is not None:
            thread.join()
            if own.get("error") is not None:
                errors.append(own["error"])
        if errors:
            raise errors[0] if len(errors) == 1 else StagerError("; ".join(str(e) for e in errors))

    def _publish_segments(self, shm: dict[int, segments.SegmentCopy], received: dict[int, Any], srcs: Sequence[int],
                          rank: int, world: int, step: int) -> None:
        """survive_restart, before the vote: every copy of this stage published in shared memory.
        A replica that could not land in its segment (an incremental receive builds on the
        previous step's memory) is copied into one here."""
        for src in srcs:
            if src not in shm and received.get(src) is not None:
                sending = self._deltas.sending_of(src) if self._deltas is not None else 0
                copy, received[src] = segments.stage_into_segment(
                    received[src], self._storage_dir, rank, src, step, _record(src, rank, world, step, sending))
                shm[src] = copy
        for copy in shm.values():
            copy.publish()

    def _drop_segments_before(self, rank: int, safe: int | None) -> None:
        """survive_restart, once every rank is in this stage (so every rank published the
        previous one): generations older than ``safe``, the newest step every rank can restore,
        are of no more use, and go before this stage's arrive (two generations at most, not
        three, while the new one is received)."""
        if safe is None:
            return
        for owner in list(self._segments):  # (unmapped here, so they can be reused)
            self._segments[owner] = {s: c for s, c in self._segments[owner].items() if s >= safe}
        for segment in segments.find_segments(self._storage_dir):
            if segment.holder == rank and segment.step < safe:
                self._spares.append(segment.path)

    def _spare(self) -> str | None:
        """A dropped generation's segment for a copy of this stage to reuse (None: none left)."""
        try:
            return self._spares.pop()
        except IndexError:
            return None

    def _release_spares(self) -> None:
        """The end of a stage: dropped generations nobody reused are removed."""
        spares, self._spares = self._spares, []
        for path in spares:
            try:
                _native.remove_segment(path)
            except StagerError:
                pass

    def _keep_segments(self, shm: dict[int, segments.SegmentCopy], rank: int, step: int, safe: int | None) -> None:
        """After the commit: per owner, this step's segment and one older generation (the step
        every rank can restore, else the newest older one) stay; the others are removed."""
        for owner, copy in shm.items():
            older = sorted({s.step for s in segments.find_segments(self._storage_dir)
                            if s.holder == rank and s.owner == owner and s.step < step})
            kept = safe if safe in older else (older[-1] if older else None)
            keep = {step} | ({kept} if kept is not None else set())
            segments.prune(self._storage_dir, rank, owner, keep)
            held = {s: c for s, c in self._segments.get(owner, {}).items() if s in keep}
            held[step] = copy
            self._segments[owner] = held

    def _abandon(self, copies: dict[int, _Copy], own: dict[str, Any],
                 shm: dict[int, segments.SegmentCopy] | None = None) -> None:
        """A failed stage: no pending file survives; the published copies are untouched."""
        thread = own.get("thread")
        if thread is not None and shm:
            thread.join(StreamingReplica._ABORT_WAIT_S)
        for segment in (shm or {}).values():
            try:
                segment.abort()
            except StagerError:
                pass
        for copy in copies.values():
            if copy.writer is not None:
                copy.writer.abort()
                copy.writer = None
        thread = own.get("thread")
        if thread is not None:
            thread.join(StreamingReplica._ABORT_WAIT_S)
        for copy in copies.values():
            _remove_quietly(copy.pending)

    def _publish(self, copies: dict[int, _Copy], step: int, safe: int | None) -> None:
        """Step 5 of the module doc, for every copy of this stage."""
        directory = os.path.abspath(self._storage_dir)
        for owner, copy in copies.items():
            slots = self._index.setdefault(owner, {"final": None, "previous": None})
            final, previous = slots["final"], slots["previous"]
            candidates = {name: r for name, r in (("final", final), ("previous", previous))
                          if r is not None and r["step"] < step}
            keep = next((name for name, r in candidates.items() if r["step"] == safe), None)
            if keep is None and candidates:
                keep = max(candidates, key=lambda name: candidates[name]["step"])
            try:
                if keep == "final":
                    try:
                        os.rename(copy.final, copy.previous)
                        files.fsync_directory(directory)
                    except FileNotFoundError:  # removed behind our back: keep what is left
                        keep = "previous" if "previous" in candidates else None
                os.rename(copy.pending, copy.final)
                files.fsync_directory(directory)
                if keep is None and previous is not None:
                    _remove_quietly(copy.previous)
            except OSError as err:
                raise StagerError(f"cannot publish replica {copy.final!r}: {err}") from err
            slots["previous"] = final if keep == "final" else (previous if keep == "previous" else None)
            slots["final"] = copy.record

    # ---- restore ------------------------------------------------------------------------------------
    def restore(self, into: Any = None, *, pg: Any = None) -> Any:
        """Collective: every rank of the (new) group calls it after a failure; returns this rank's
        own state_dict of the newest step every rank can restore. See :mod:`stager.recovery`.

        ``into``: a state_dict of the same structure whose tensors receive the values in place.
        When no rank can be restored the error comes before anything moves and ``into`` is
        unchanged. A failure *while* the bytes move (a peer dies or stalls, the link breaks) or
        on another rank afterwards also raises StagerError on every rank, but this rank's
        ``into`` may then be partly overwritten (some tensors of the restored step, others as
        they were): treat it as garbage and restore again, or reload from storage. (Receiving
        into scratch memory and copying on success would keep it intact at the price of a
        second copy of the whole state_dict in host memory and one more pass over its bytes.)
        """
        source = recovery.RecoveryInput(self._storage_dir, self._timeout, MappingProxyType(self._memory),
                                        self._survive, self._group, self._transport_for)
        restored = recovery.restore(source, into, pg=pg)
        self._newest_step = max(self._newest_step or 0, restored.step)
        self.last_restore = restored.report()
        return restored.state_dict

    # ---- AsyncStager --------------------------------------------------------------------------------
    def synchronize_staging(self) -> None:
        """No-op: staging is blocking."""

    def close(self) -> None:
        """Drops the replicas held in memory (and, with skip_unchanged, what the next stage would
        leave out: it sends everything); persisted copies (and, with survive_restart, the
        shared-memory segments) are left for discovery."""
        self._memory = {}
        self._segments = {}
        if self._deltas is not None:
            self._deltas.close()


def _start_own_copy(state_dict: Any, copy: _Copy, fmt: str, own: dict[str, Any],
                    shm: tuple[str, int, dict[int, segments.SegmentCopy], str | None] | None = None
                    ) -> threading.Thread:
    """Writes the own copy in a thread; with ``shm`` (survive_restart) it is staged into its
    named segment first and the file is written from there."""
    def write() -> None:
        try:
            source = state_dict
            if shm is not None:
                storage_dir, rank, into, recycle = shm
                segment, source = segments.stage_into_segment(state_dict, storage_dir, rank, rank,
                                                              copy.record["step"], copy.record, recycle=recycle)
                into[rank] = segment
            _write_copy(source, copy.pending, fmt, copy.record)
        except BaseException as err:
            own["error"] = err

    thread = threading.Thread(target=write, name="stager-own-copy", daemon=True)
    thread.start()
    return thread


def _parse(blobs: list[bytes], what: str) -> list[dict]:
    records = []
    for rank, blob in enumerate(blobs):
        try:
            record = json.loads(blob)
        except ValueError as err:
            raise StagerError(f"rank {rank} sent an invalid {what} record: {err}") from err
        if not isinstance(record, dict):
            raise StagerError(f"rank {rank} sent an invalid {what} record")
        records.append(record)
    return records


def _failures(blobs: list[bytes]) -> str:
    """'rank i: reason; ...' of the ranks whose vote carries an error ('' when none)."""
    records = _parse(blobs, "vote")
    return "; ".join(f"rank {rank}: {record['error']}" for rank, record in enumerate(records) if record.get("error"))


def _agree(blobs: list[bytes], world: int) -> dict[str, Any]:
    """Step 2 of the module doc, the same on every rank: raises the same StagerError everywhere
    when any rank can't send or the ranks disagree; else ``{"step": s, "safe": c}``."""
    records = _parse(blobs, "agreement")
    errors = [f"rank {rank}: {record['error']}" for rank, record in enumerate(records) if record.get("error")]
    if errors:
        raise StagerError("replication failed before anything was sent: " + "; ".join(errors))
    configs = [tuple(record.get("config", ())) for record in records]
    if len(set(configs)) > 1:
        fields = "world_size, replicas, ranks_per_node, topology, persist_format, keep_own"
        listing = "; ".join(f"rank {rank}: {list(config)}" for rank, config in enumerate(configs))
        raise StagerError(f"the ranks disagree on the replication settings ({fields}): {listing}")
    explicit = [bool(record.get("explicit")) for record in records]
    steps = [int(record.get("step", 0)) for record in records]
    if all(explicit):
        if len(set(steps)) > 1:
            raise StagerError("the ranks passed different steps to stage(): "
                              + ", ".join(f"rank {rank}: {s}" for rank, s in enumerate(steps)))
        chosen = steps[0]
    elif any(explicit):
        given = [rank for rank, flag in enumerate(explicit) if flag]
        raise StagerError(f"ranks {given} passed step= to stage() and the others did not: pass it on every rank or "
                          "none")
    else:
        chosen = max(steps)
    held: dict[int, set[int]] = {}
    for record in records:
        for owner, owned in (record.get("held") or {}).items():
            held.setdefault(int(owner), set()).update(int(s) for s in owned)
    complete = set.intersection(*(held.get(owner, set()) for owner in range(world))) if world else set()
    older = [s for s in complete if s < chosen]
    return {"step": chosen, "safe": max(older) if older else None}

