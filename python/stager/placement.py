"""Placement: which ranks hold the replicas of each rank's state_dict.

Pure functions of ``(world_size, replicas, ranks_per_node, topology)``, no process group: every
rank computes the same placement on its own, and nothing is sent before it is known to be
possible.

**Failure domains.** Rank ``r`` lives in failure domain ``r // ranks_per_node`` (a node, with
``ranks_per_node`` the ``LOCAL_WORLD_SIZE`` torchrun sets; 1 when unset, i.e. every rank may fail
on its own). With ``replicas=k`` each rank's state goes to ``k`` holders on ``k`` distinct
domains, none of them its own, so losing any ``k`` domains (its own included) leaves a copy.
That needs at least ``k + 1`` domains; otherwise :func:`place` raises :class:`~stager.StagerError`.

**The rule** (deterministic, the same on every rank):

1. *Shifts.* Holder ``j`` of rank ``r`` is ``(r + s_j) % world`` for a set of shifts
   ``s_1 .. s_k``. A shift qualifies when it moves every rank off its own domain (exactly the
   shifts ``ranks_per_node <= s <= world - ranks_per_node``), a set when for every rank its
   holders' domains are pairwise distinct too (every difference ``s_j - s_i`` qualifies). The set
   is built greedily, taking each qualifying shift in this order:

   a. the topology's own shift: ``"pairs"`` → ``world // 2`` for even sizes (PyTorch's partner
      ``(rank + world // 2) % world``), ``1`` for odd sizes (the contract's ring: send to
      ``r + 1``, receive from ``r - 1``); ``"ring"`` → ``1``;
   b. the node shifts ``ranks_per_node, 2 * ranks_per_node, ...`` (the same local slot on the
      next nodes);
   c. every other shift ``1 .. world - 1``.

   If that gives fewer than ``k``, the same without (a). A set exists exactly when
   ``(k + 1) * ranks_per_node <= world`` (then the node shifts alone always make one). A shift is
   a permutation, so every rank holds exactly ``k`` replicas and receives from the ranks
   ``(r - s_j) % world``. With ``replicas=1`` the topology's shift wins whenever it qualifies:
   even sizes keep PyTorch's pairs exactly whenever no node holds more than half of the ranks
   (which is when every partner lies on another node), and odd sizes keep the ring when every
   rank is its own domain. Example: 3 nodes x 3 ranks: shift 1 would keep ranks 0→1 on node 0,
   so the holder of ``r`` is ``r + 3`` (the same slot on the next node).

2. *Fallback* (uneven domains, where no set of shifts qualifies, e.g. 6 ranks on nodes of 4 + 2):
   replica by replica, each rank in order takes, among the ranks on domains it does not use yet,
   its topology partner when that qualifies (replica 0 only), else the one holding the fewest
   replicas so far (ties: the nearest after it, cyclically). Every rank's domains are still
   distinct and never its own; the load is as even as the domains allow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from ._native import StagerError

__all__ = ["Placement", "default_ranks_per_node", "failure_domain", "place"]

TOPOLOGIES = ("pairs", "ring")


def default_ranks_per_node() -> int:
    """``LOCAL_WORLD_SIZE`` (set by torchrun) when it is a positive integer, else 1."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    try:
        count = int(value)
    except ValueError:
        return 1
    return count if count > 0 else 1


def failure_domain(rank: int, ranks_per_node: int) -> int:
    """The failure domain (node) of ``rank``."""
    return rank // ranks_per_node


@dataclass(frozen=True)
class Placement:
    """Where every rank's replicas go.

    ``holders[r]`` are the ranks holding rank ``r``'s state, first holder first (the one whose
    copy :meth:`stager.ReplicationStager.stage` returns on that holder); ``sources[h]`` are the
    ranks whose state rank ``h`` holds, ordered by replica index, then rank. ``shifts`` is the
    set of shifts used, or ``None`` where the fallback assignment was needed."""

    world_size: int
    replicas: int
    ranks_per_node: int
    topology: str
    holders: tuple[tuple[int, ...], ...]
    sources: tuple[tuple[int, ...], ...]
    shifts: tuple[int, ...] | None

    def domain(self, rank: int) -> int:
        return failure_domain(rank, self.ranks_per_node)

    @property
    def domains(self) -> int:
        return -(-self.world_size // self.ranks_per_node)

    def destinations(self, rank: int) -> tuple[int, ...]:
        """The ranks ``rank`` sends its state to."""
        return self.holders[rank]

    def first_source(self, rank: int) -> int | None:
        """The rank whose replica ``stage()`` returns on ``rank`` (None when it holds nothing)."""
        sources = self.sources[rank]
        return sources[0] if sources else None


def _check(world_size: int, replicas: int, ranks_per_node: int, topology: str) -> None:
    for name, value in (("world_size", world_size), ("replicas", replicas), ("ranks_per_node", ranks_per_node)):
        if type(value) is not int:
            raise StagerError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if topology not in TOPOLOGIES:
        raise StagerError(f"topology must be 'pairs' or 'ring', got {topology!r}")
    if world_size < 1:
        raise StagerError(f"world_size must be at least 1, got {world_size}")
    if replicas < 1:
        raise StagerError(f"replicas must be at least 1, got {replicas}")
    if ranks_per_node < 1:
        raise StagerError(f"ranks_per_node must be at least 1, got {ranks_per_node}")
    domains = -(-world_size // ranks_per_node)
    if replicas > domains - 1:
        raise StagerError(
            f"cannot place replicas={replicas}: each rank's copies must be on {replicas} failure domains "
            f"other than its own, but {world_size} ranks with ranks_per_node={ranks_per_node} make only "
            f"{domains} domain{'s' if domains != 1 else ''} (rank r is on domain r // {ranks_per_node}); "
            f"use replicas <= {max(domains - 1, 0)} or a smaller ranks_per_node"
        )


def _topology_shift(world_size: int, topology: str) -> int:
    if topology == "pairs" and world_size % 2 == 0:
        return world_size // 2
    return 1


def place(world_size: int, replicas: int = 1, ranks_per_node: int = 1, topology: str = "pairs") -> Placement:
    """The placement for these settings (see the module doc); raises StagerError when it cannot
    be satisfied. Cached: every stage() of a stager asks again."""
    _check(world_size, replicas, ranks_per_node, topology)
    return _place(world_size, replicas, ranks_per_node, topology)


@lru_cache(maxsize=64)
def _place(world_size: int, replicas: int, ranks_per_node: int, topology: str) -> Placement:
    domain = [rank // ranks_per_node for rank in range(world_size)]
    shifts = _shift_set(world_size, replicas, ranks_per_node, topology)
    if shifts is not None:
        holders = tuple(tuple((rank + s) % world_size for s in shifts) for rank in range(world_size))
    else:
        holders = _fallback(world_size, replicas, topology, domain)
    sources: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    for owner, ranks in enumerate(holders):
        for index, holder in enumerate(ranks):
            sources[holder].append((index, owner))
    return Placement(
        world_size=world_size,
        replicas=replicas,
        ranks_per_node=ranks_per_node,
        topology=topology,
        holders=holders,
        sources=tuple(tuple(owner for _, owner in sorted(entries)) for entries in sources),
        shifts=shifts,
    )


def _shift_set(world_size: int, replicas: int, ranks_per_node: int, topology: str) -> tuple[int, ...] | None:
    """The shifts of rule 1, or None when no set of shifts qualifies."""
    # The shifts plus 0 must be points of the cycle at pairwise distance >= ranks_per_node (see
    # qualifies): there is room for them exactly when (replicas + 1) * ranks_per_node <= world.
    if (replicas + 1) * ranks_per_node > world_size:
        return None

    def qualifies(shift: int) -> bool:
        """Every rank's holder under ``shift`` is on another domain. Domains are runs of at most
        ``ranks_per_node`` consecutive ranks, and a run of length L shifted by s (mod world)
        misses itself exactly when L <= s <= world - L: so the full runs decide."""
        return ranks_per_node <= shift % world_size <= world_size - ranks_per_node

    node_shifts = list(range(ranks_per_node, world_size, ranks_per_node))
    for first in ([_topology_shift(world_size, topology)], []):
        chosen: list[int] = []
        for shift in [*first, *node_shifts, *range(1, world_size)]:
            # Holders r + s and r + t are on distinct domains for every r exactly when t - s qualifies.
            if shift not in chosen and qualifies(shift) and all(qualifies(shift - other) for other in chosen):
                chosen.append(shift)
                if len(chosen) == replicas:
                    return tuple(chosen)
    return None  # unreachable: ranks_per_node, 2 * ranks_per_node, ... always qualify here


def _fallback(world_size: int, replicas: int, topology: str, domain: list[int]) -> tuple[tuple[int, ...], ...]:
    holders: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    partner_shift = _topology_shift(world_size, topology)
    for index in range(replicas):
        # Ranks whose topology partner qualifies take it first (replica 0), then the others by load.
        if index == 0:
            pending = []
            for rank in range(world_size):
                partner = (rank + partner_shift) % world_size
                if domain[partner] != domain[rank]:
                    holders[rank].append(partner)
                    load[partner] += 1
                else:
                    pending.append(rank)
        else:
            pending = list(range(world_size))
        for rank in pending:
            used = {domain[rank], *(domain[h] for h in holders[rank])}
            candidates = [c for c in range(world_size) if domain[c] not in used]
            # _check guarantees a free domain exists: at most `replicas` of them are used.
            best = min(candidates, key=lambda c: (load[c], (c - rank) % world_size))
            holders[rank].append(best)
            load[best] += 1
    return tuple(tuple(ranks) for ranks in holders)
