"""Recovery: :meth:`ReplicationStager.restore`, the collective that turns the copies that
replication left (in memory and on disk) back into every rank's own state_dict.

After a failure every rank of the (new) group calls ``restore()``, restarted processes too (a
fresh :class:`~stager.ReplicationStager` on the old ``storage_dir``; survivors may reuse their
stager and its in-memory replicas). Nothing is written: the files stay as they are, whatever the
outcome.

Protocol (every wait bounded by the stager's timeout from the start of the call, one deadline):

1. **Inventory.** Each rank lists what it can serve: the replicas its stager holds in memory,
   and every copy file in its ``storage_dir`` (any holder's, so node-local directories shared by
   several ranks work) with the owner, step and world size the file records (header only; no
   data is read). An all-gather gives every rank every inventory.
2. **Decide** (:func:`decide`, pure, so every rank reaches the same result from the same
   inventories): the newest step for which every rank of the group has a copy on some rank,
   ignoring copies of another world size and copies already found damaged; for each owner, who
   serves it: the owner itself when it holds a copy (no transfer), else a holder with a copy in
   memory, else the least loaded holder (ties: the lowest rank). Nearest copies first: in this
   process's memory, then in named shared memory (``survive_restart``: segments of this
   ``storage_dir`` on this node, :mod:`stager.segments`), then on disk. When no step covers every rank,
   every rank raises the same :class:`~stager.StagerError` naming the ranks that can't be
   restored and what was found of them, before anything moves.
3. **Verify.** Each rank reads the copies it serves, checking every checksum (``.stager``: the
   per-storage crc32c; ``.pt``: the zip records' crc32); in-memory replicas are used as they are.
   An all-gather of the failures follows; a damaged copy is excluded and step 2 runs again (the
   same step from another holder, or an older step), as often as copies fail.
4. **Move.** Each owner receives its state from its server over the group
   (:meth:`stager.transport.PGTransport.transfer`: every server's sends at once), or takes its
   own copy. With ``into`` (a state_dict of the same structure, e.g. a freshly built model's),
   every tensor must have a tensor of the same dtype and shape at its key path; bytes are
   received straight into the ones that view their storage as the sender's did, and copied into
   the others: ``into``'s tensors hold the result and keep their storages. A target that
   doesn't fit is found from the metadata, before any of its bytes are received.
5. **Confirm.** An all-gather of every rank's outcome: on any failure every rank raises the same
   StagerError naming the ranks and why.

A timeout or lost peer in steps 1, 3 or 4 breaks the group (see :mod:`stager.transport`); every
rank raises within the timeout.

Recovery reads only what it is given (:class:`RecoveryInput`: the replicas held in memory, the
``storage_dir``, whether to look in shared memory, the timeout and how to get the group and its
transport) and returns what it restored (:class:`Restored`); the stager records the step itself.
Data flows one way: :mod:`stager.replication` imports this module, never the reverse.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version
from torch.distributed.tensor import DTensor

from . import engine, segments
from ._native import StagerError
from .dtensor import LocalShard
from .options import default_num_threads
from .replica_files import _scan, load_replica, read_record
from .transport import PGTransport, TransportError
from .tree import tensors_by_path

__all__ = ["Decision", "RecoveryInput", "Restored", "decide", "inventory", "restore"]


@dataclass(frozen=True)
class RecoveryInput:
    """What one rank serves from and how it reaches the others, for :func:`restore`.

    Attributes:
        storage_dir: the directory of this rank's copy files (and the name of its segments).
        timeout: bound on the whole call (one deadline from its start).
        memory: owner → ``(step, world_size, state_dict)``, the replicas held in this process
            (read only; empty for a restarted process).
        shared_memory: whether to look for segments of ``storage_dir`` (``survive_restart``).
        group_for: the process group to use for a ``pg`` argument (``None``: the default one).
        transport_for: the :class:`~stager.transport.PGTransport` over a group.
    """

    storage_dir: str
    timeout: timedelta
    memory: Mapping[int, tuple[int, int, Any]]
    shared_memory: bool
    group_for: Callable[[Any], Any]
    transport_for: Callable[[Any], PGTransport]


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` restored on this rank: its ``state_dict`` of ``step``, the rank that
    served it, its tier (``"memory"``, ``"shm"`` or ``"disk"``), where the copy was (``"memory"``,
    a segment or a file path), and the bytes received over the group."""

    state_dict: Any
    step: int
    server: int
    tier: str
    where: str
    received_bytes: int

    def report(self) -> dict[str, Any]:
        """Everything but the state_dict (``ReplicationStager.last_restore``)."""
        return {"step": self.step, "server": self.server, "tier": self.tier, "where": self.where,
                "received_bytes": self.received_bytes}


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` chose: the step, and for each owner ``(serving rank, copy index)``."""

    step: int
    servers: tuple[tuple[int, int], ...]


def inventory(source: RecoveryInput, world_size: int) -> list[dict[str, Any]]:
    """This rank's copies (see the module doc, step 1). Files whose record can't be read are
    listed with an ``error`` and no step, so a failed restore can say what was found."""
    copies: list[dict[str, Any]] = []
    for owner, (step, world, _) in sorted(source.memory.items()):
        copies.append({"owner": owner, "step": step, "world_size": world, "where": "memory"})
    if source.shared_memory:
        for segment in sorted(segments.find_segments(source.storage_dir), key=lambda s: s.path):
            try:
                record = segments.read_segment_record(segment.path)
            except StagerError as err:
                copies.append({"where": segment.path, "error": str(err)})
                continue
            if (record["owner"], record["holder"], record["step"]) != (segment.owner, segment.holder, segment.step):
                copies.append({"where": segment.path, "error": "its record does not match its name"})
                continue
            copies.append({"owner": record["owner"], "step": record["step"], "world_size": record["world_size"],
                           "where": segment.path, "tier": "shm"})
    for entry, _ in sorted(_scan(source.storage_dir), key=lambda item: item[0].name):
        try:
            file_record = read_record(entry.path)
        except StagerError as err:
            copies.append({"where": entry.path, "error": str(err)})
            continue
        if file_record is None:
            copies.append({"where": entry.path, "error": "it records no owner and step (written by an older stager)"})
            continue
        copies.append({"owner": file_record["owner"], "step": file_record["step"],
                       "world_size": file_record["world_size"], "where": entry.path})
    return copies


def _tier(copy: dict[str, Any]) -> int:
    """Nearest first: memory of this process, then shared memory, then disk."""
    if copy["where"] == "memory":
        return 0
    return 1 if copy.get("tier") == "shm" else 2


def _ranks(ranks: list[int] | set[int]) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def decide(world_size: int, inventories: list[list[dict[str, Any]]],
           damaged: dict[tuple[int, int], str] | None = None) -> Decision:
    """Step 2 of the module doc. ``inventories[r]`` is rank r's list; ``damaged`` maps
    ``(rank, copy index)`` to why that copy can't be used. Raises StagerError when no step has a
    copy of every rank (the same message on every rank)."""
    damaged = damaged or {}
    usable: dict[int, dict[int, list[tuple[int, int, dict]]]] = {}  # step → owner → [(rank, index, copy)]
    other_worlds: set[int] = set()
    unreadable: list[str] = []
    for rank, copies in enumerate(inventories):
        for index, copy in enumerate(copies):
            if "error" in copy:
                unreadable.append(f"{copy['where']} on rank {rank}: {copy['error']}")
                continue
            if (rank, index) in damaged:
                continue
            if copy["world_size"] != world_size:
                other_worlds.add(copy["world_size"])
                continue
            usable.setdefault(copy["step"], {}).setdefault(copy["owner"], []).append((rank, index, copy))
    everyone = range(world_size)
    complete = [step for step, owners in usable.items() if all(owner in owners for owner in everyone)]
    if not complete:
        raise StagerError(_unrestorable(world_size, usable, damaged, inventories, other_worlds, unreadable))
    step = max(complete)
    owners = usable[step]
    load = [0] * world_size
    servers: list[tuple[int, int] | None] = [None] * world_size
    for owner in everyone:  # a rank that holds its own copy serves itself: no transfer
        local = [c for c in owners[owner] if c[0] == owner]
        if local:
            rank, index, _ = min(local, key=lambda c: (_tier(c[2]), c[1]))
            servers[owner] = (rank, index)
    for owner in everyone:
        if servers[owner] is None:
            rank, index, _ = min(owners[owner], key=lambda c: (_tier(c[2]), load[c[0]], c[0], c[1]))
            servers[owner] = (rank, index)
            load[rank] += 1
    return Decision(step, tuple(s for s in servers if s is not None))


def _unrestorable(world_size: int, usable: dict, damaged: dict, inventories: list, other_worlds: set[int],
                  unreadable: list[str]) -> str:
    """Which ranks can't be restored and what was found of them."""
    everyone = range(world_size)
    if usable:  # the step that covers the most ranks (the newest of those) tells who is missing
        best = max(usable, key=lambda s: (sum(owner in usable[s] for owner in everyone), s))
        missing = [owner for owner in everyone if owner not in usable[best]]
        reason = (f"restore(): cannot restore {_ranks(missing)}: no rank of the group holds an intact copy of "
                  f"{'its' if len(missing) == 1 else 'their'} state at step {best}, the newest step held for the "
                  f"most ranks")
    else:
        missing = list(everyone)
        reason = f"restore(): cannot restore {_ranks(missing)}: no rank of the group holds an intact copy of any rank's state"
    found = []
    for owner in everyone:
        steps = sorted((s for s, owners in usable.items() if owner in owners), reverse=True)
        found.append(f"rank {owner}: " + (("steps " if len(steps) > 1 else "step ") + ", ".join(map(str, steps))
                                          if steps else "none"))
    details = [reason, "intact copies found per rank: " + "; ".join(found)]
    if damaged:
        details.append("damaged copies skipped: " + "; ".join(
            f"{inventories[rank][index]['where'] if inventories[rank][index]['where'] != 'memory' else 'memory'} "
            f"on rank {rank}: {why}" for (rank, index), why in sorted(damaged.items())))
    if other_worlds:
        details.append(f"copies of a world of {', '.join(map(str, sorted(other_worlds)))} ranks were ignored (this "
                       f"group has {world_size})")
    if unreadable:
        details.append("unreadable files: " + "; ".join(unreadable[:20]))
    return ". ".join(details)


def _load(source: RecoveryInput, copy: dict[str, Any]) -> Any:
    if copy["where"] == "memory":
        step, _, state_dict = source.memory[copy["owner"]]
        if step != copy["step"]:
            raise StagerError(f"the in-memory replica of rank {copy['owner']} changed during restore()")
        return state_dict
    if copy.get("tier") == "shm":
        state_dict, record = segments.load_segment(copy["where"], verify=True)
        if (record["owner"], record["step"], record["world_size"]) != (copy["owner"], copy["step"],
                                                                        copy["world_size"]):
            raise StagerError(f"segment {copy['where']} changed during restore()")
        return state_dict
    return load_replica(copy["where"], verify=True)


def _local(value: Any) -> torch.Tensor:
    """The tensor whose bytes a leaf holds on this rank: a DTensor's (or a LocalShard's) local
    shard, else the tensor itself. Restoring into a DTensor target writes its local shard."""
    if isinstance(value, LocalShard):
        return value.tensor
    if isinstance(value, DTensor):
        return value._local_tensor
    return value


def _leaves(state: Any) -> dict[tuple, Any]:
    """key path → tensor leaf (tensors, DTensors, and the LocalShards a load without a mesh gives)."""
    return tensors_by_path(state, (torch.Tensor, LocalShard))


def _check_into(state: Any, into: Any) -> None:
    """Raises StagerError when ``into`` can't take ``state``'s values (before anything changes)."""
    targets = tensors_by_path(into)
    for path, leaf in _leaves(state).items():
        value = _local(leaf)
        target = targets.get(path)
        where = ".".join(str(p) for p in path) or "<root>"
        if target is None:
            raise StagerError(f"restore(into=...): key {where} ({value.dtype} {list(value.shape)}) has no tensor in "
                              "the target state_dict")
        target = _local(target)
        if target.dtype != value.dtype or target.shape != value.shape:
            raise StagerError(f"restore(into=...): key {where} is {value.dtype} {list(value.shape)} but the target "
                              f"holds {target.dtype} {list(target.shape)}")


def _overlapping(tensors: list[torch.Tensor]) -> set[int]:
    """Indices of the (contiguous) tensors whose bytes overlap another's."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, i) for i, t in enumerate(tensors) if t.nbytes)
    found: set[int] = set()
    reach, owner = -1, -1  # the furthest end so far, and whose it is
    for start, end, index in spans:
        if start < reach:
            found.update((index, owner))
        if end > reach:
            reach, owner = end, index
    return found


def _restore_into(result: Any, into: Any) -> Any:
    """Copies every tensor value of ``result`` into the tensor of ``into`` at the same key path
    (skipping those received in place) and returns ``result`` with ``into``'s tensors in it."""
    _check_into(result, into)
    targets = tensors_by_path(into)
    host_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[tuple[int, int, int]] = set()
    others: list[tuple[torch.Tensor, torch.Tensor]] = []
    for path, leaf in _leaves(result).items():
        target, value = _local(targets[path]), _local(leaf)
        in_place = (target.device == value.device and target.storage_offset() == value.storage_offset()
                    and target.stride() == value.stride()
                    and target.untyped_storage().data_ptr() == value.untyped_storage().data_ptr())
        if in_place:
            continue
        if target.is_cpu and value.is_cpu and target.is_contiguous() and value.is_contiguous():
            key = (value.data_ptr(), target.data_ptr(), target.nbytes)
            if key not in seen:  # tied weights: one copy per distinct pair
                seen.add(key)
                host_pairs.append((value, target))
        else:
            others.append((value, target))
    # Host tensors: one batch on the copy engine's threads, GIL released (version counters
    # bumped as torch's copy_ would, so skip_unchanged sees the change). Targets that overlap
    # another (views of one storage in ``into``) take torch's copy, in order, like the rest.
    overlapping = _overlapping([target for _, target in host_pairs])
    if overlapping:
        others = [pair for i, pair in enumerate(host_pairs) if i in overlapping] + others
        host_pairs = [pair for i, pair in enumerate(host_pairs) if i not in overlapping]
    try:
        engine.copy_engine(default_num_threads()).copy_tensors(host_pairs)
        increment_version([target for _, target in host_pairs if not target.is_inference()])
    except StagerError:
        others = host_pairs + others
    with torch.no_grad():
        for value, target in others:
            target.copy_(value)

    def put(value: Any, path: tuple) -> Any:
        """``value`` with into's tensors at its tensor leaves (containers of the fresh result are
        reused; tuples are rebuilt)."""
        if isinstance(value, (torch.Tensor, LocalShard)):
            return targets[path]
        if isinstance(value, dict):
            for key in list(value):
                value[key] = put(value[key], path + (key,))
        elif isinstance(value, list):
            for i, child in enumerate(value):
                value[i] = put(child, path + (i,))
        elif isinstance(value, tuple):
            items = [put(child, path + (i,)) for i, child in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    return put(result, ())


def _gather(transport: PGTransport | None, payload: Any, what: str, deadline: float) -> list[Any]:
    if transport is None:
        return [payload]
    blobs = transport.allgather_bytes(json.dumps(payload).encode(), what, deadline=deadline)
    out = []
    for rank, blob in enumerate(blobs):
        try:
            out.append(json.loads(blob))
        except ValueError as err:
            raise StagerError(f"restore(): rank {rank} sent an invalid {what} record: {err}") from err
    return out


def restore(source: RecoveryInput, into: Any = None, *, pg: Any = None) -> Restored:
    """See the module doc: this rank serves from ``source``; returns its own restored state."""
    started = time.monotonic()
    deadline = started + source.timeout.total_seconds()
    if pg is None and not dist.is_initialized():
        rank, world, transport = 0, 1, None
    else:
        group = source.group_for(pg)
        rank, world = group.rank(), group.size()
        transport = source.transport_for(group) if world > 1 else None
    received_before = transport.received.data if transport is not None else 0
    mine = inventory(source, world)
    inventories = _gather(transport, mine, "exchanging what each rank holds for restore()", deadline)
    damaged: dict[tuple[int, int], str] = {}
    loaded: dict[int, Any] = {}
    while True:
        decision = decide(world, inventories, damaged)
        failures: list[list[Any]] = []
        for server, index in decision.servers:
            if server == rank and index not in loaded:
                try:
                    loaded[index] = _load(source, mine[index])
                except StagerError as err:
                    failures.append([index, str(err)])
        reports = _gather(transport, failures, "checking the copies chosen for restore()", deadline)
        fresh = {(r, int(index)): why for r, report in enumerate(reports) for index, why in report}
        if not fresh:
            break
        damaged.update(fresh)
        for index in [i for i in loaded if (rank, i) in fresh]:
            del loaded[index]

    own_server, own_index = decision.servers[rank]
    error: BaseException | None = None
    result = None
    try:
        sends = {owner: loaded[index] for owner, (server, index) in enumerate(decision.servers)
                 if server == rank and owner != rank}
        if transport is not None and (sends or own_server != rank):
            recvs = [own_server] if own_server != rank else []
            received = transport.transfer(sends, recvs, deadline=deadline, inplace=into, strict_inplace=True)
            if own_server != rank:
                result = received[own_server]
        if own_server == rank:
            result = loaded[own_index]
        if into is not None:
            result = _restore_into(result, into)
    except TransportError as err:
        if err.fatal or transport is None:
            raise
        error = err
    except StagerError as err:
        error = err
    outcomes = _gather(transport, {"error": None if error is None else str(error)},
                       "confirming every rank is restored", deadline)
    failed = [f"rank {r}: {o['error']}" for r, o in enumerate(outcomes) if o.get("error")]
    if failed:
        raise StagerError(f"restore() of step {decision.step} failed: " + "; ".join(failed)) from error
    copy = inventories[own_server][own_index]
    return Restored(result, decision.step, own_server, ("memory", "shm", "disk")[_tier(copy)], copy["where"],
                    (transport.received.data if transport is not None else 0) - received_before)

