"""The delta protocol of incremental transfers: what a sender offers (:class:`Offer`), the policy
both ends consult (:class:`Incremental`), the delta message (the reuse map as runs) and its checks,
and what a holder keeps of a received state_dict to be the next base (:class:`ReceivedStorages`).

A sender whose previous sending the holder still has sends only the changed storages, laid out
by :func:`_delta_layout` (the reused storages take no room); the holder rebuilds the state_dict
from its copy of the previous one plus those bytes, after :func:`_base_problem` found its copy
fits what the sender described.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .. import _native
from .._native import StagerError
from ..json_checks import expect, int_field, is_int_list
from ..plan import StatePlan, StoragePlan


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
    for index, base in sorted((offer.reuse or {}).items()):
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
    base_storages, nbytes, segments, crc32c list). Raises ValueError saying what is wrong (the
    checks are :mod:`stager.json_checks`'; the transport reports it as a PROTOCOL error)."""
    try:
        return _checked_delta(json.loads(raw), count)
    except StagerError as err:
        raise ValueError(str(err)) from None


def _checked_delta(spec: Any, count: int) -> tuple[dict[int, int], int, int, int, list[int | None] | None]:
    expect(type(spec) is dict, "a delta must be an object")
    base_storages = int_field(spec.get("base_storages"), "base_storages")
    nbytes, nsegments = int_field(spec.get("nbytes"), "nbytes"), int_field(spec.get("segments"), "segments")
    runs = spec.get("reuse")
    expect(type(runs) is list and len(runs) > 0, "reuse must be a non-empty list")
    reuse: dict[int, int] = {}
    bases: set[int] = set()
    for run in runs:
        expect(is_int_list(run, length=3), f"a reuse run must be [index, base index, length], got {run!r}")
        first, base, length = run
        expect(length > 0 and first + length <= count and base + length <= base_storages,
               f"reuse run {run!r} is out of range ({count} storages, {base_storages} in the base)")
        for k in range(length):
            expect(first + k not in reuse and base + k not in bases, f"reuse run {run!r} names a storage twice")
            reuse[first + k] = base + k
            bases.add(base + k)
    check = spec.get("crc32c")
    expect(check is None or (type(check) is list and len(check) == len(reuse)
                             and all(c is None or (type(c) is int and 0 <= c < 1 << 32) for c in check)),
           "crc32c must be one crc (or null) per reused storage")
    return reuse, base_storages, nbytes, nsegments, check


def _base_problem(base: list[torch.UntypedStorage | None], reuse: dict[int, int], base_count: int,
                  nbytes: list[int], check: list[int | None] | None) -> str | None:
    """Why the storages ``base`` can't stand in for the reused ones (None when they can)."""
    if len(base) != base_count:
        return f"the previous step held here has {len(base)} storages, the sender's {base_count}"
    standing_in: dict[int, torch.UntypedStorage] = {}  # storage index → the base storage holding its bytes
    for index, position in reuse.items():
        storage = base[position]
        if storage is None or storage.nbytes() != nbytes[index]:
            held = "none" if storage is None else f"{storage.nbytes()} bytes"
            return (f"storage {index} ({nbytes[index]} bytes) is storage {position} of the previous step, which holds "
                    f"{held} here")
        standing_in[index] = storage
    if check is not None:
        for (index, _), crc in zip(sorted(reuse.items()), check):
            held_crc = _native.storage_crc32c(standing_in[index])
            if crc is not None and crc != held_crc:
                return (f"storage {index} ({nbytes[index]} bytes) was not sent as unchanged, but its bytes differ from "
                        f"the previous step's (crc32c {held_crc:08x} held here, {crc:08x} at the sender): it changed "
                        "without a version-counter bump (a write through `.data`, a NumPy view or a C extension?), or "
                        "the replica held here was modified")
    return None
