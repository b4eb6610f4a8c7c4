"""DTensor leaves: a DTensor is its local shard (a plain tensor the engine stages like any other)
plus a placement (device mesh, placements, global shape and stride) kept beside it.

* **Staging** keeps the source's own ``DTensorSpec``: :func:`wrap_all` puts the staged local tensor
  back under it (one C++ constructor call, no collective, no copy), so the staged DTensor has the
  same mesh object, placements, shape and stride.
* **Files and the wire** describe the placement as plain JSON (:func:`encode`, :func:`decode`,
  no pickle): one entry per mesh (shape, dim names, device type, ranks, the writer's coordinate)
  and one layout per distinct (mesh, placements, global shape, global stride), which each
  DTensor's tree node names beside its local tensor. Documented in ``docs/FORMAT.md``
  ("DTensor leaves").
* **Rebuilding** a decoded DTensor needs a mesh of the reader's own: :func:`resolve_meshes`
  matches each described mesh to a given ``DeviceMesh`` (same shape and dim names, or a submesh
  of it by dim names), and :class:`MeshBinding` rebuilds (a load checks the shard is this rank's;
  a receive takes the sender's shard, as PyTorch's PGTransport does). A receive that was given
  no matching mesh rebuilds one over its process group (:class:`GroupMeshes`), so a received
  DTensor is a DTensor, as PyTorch's is. A file has no group: ``load`` without a mesh gives a
  :class:`LocalShard` (the local tensor with its placement), which
  :meth:`LocalShard.to_dtensor` turns into a DTensor later.

ShardedTensor (the deprecated predecessor of DTensor, FSDP1's SHARDED_STATE_DICT) has a module of
its own: :mod:`stager.sharded`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch

from ._native import StagerError
from .json_checks import MAX_DIMS, fail, is_int_list

__all__ = [
    "DTENSOR",
    "SHARDED_TENSOR",
    "GroupMeshes",
    "LocalShard",
    "MeshBinding",
    "MeshInfo",
    "bind_meshes",
    "decode",
    "describe",
    "encode",
    "inplace_target",
    "meshes_in",
    "receiver_meshes",
    "resolve_meshes",
    "wrap_all",
]

try:
    from torch.distributed.tensor import DTensor as DTENSOR
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # a torch build without torch.distributed: no DTensor can exist
    DTENSOR = None  # type: ignore[assignment,misc]

try:
    from torch.distributed._shard.sharded_tensor import ShardedTensor as SHARDED_TENSOR
except ImportError:
    SHARDED_TENSOR = None  # type: ignore[assignment,misc]


def _dtensor_constructor() -> Any:
    """``DTensor(local, spec, requires_grad=False)`` without the Python ``__init__``, which only
    calls ``Tensor.__init__()`` under two tracing decorators that cost more than the construction
    itself (0.8 against 2 us a DTensor; PyTorch 2.15). Falls back to the full call when DTensor's
    constructor is no longer the C++ ``_dtensor__new__``."""
    if DTENSOR is None:
        return None
    new = DTENSOR.__new__
    if new is getattr(torch.Tensor, "_dtensor__new__", None):
        return lambda local, spec: new(DTENSOR, local, spec, requires_grad=False)
    return lambda local, spec: DTENSOR(local, spec, requires_grad=False)


_new_dtensor = _dtensor_constructor()

#: Reductions a ``Partial`` placement may name (``torch.distributed.ReduceOp`` names).
_REDUCE_OPS = frozenset({"sum", "avg", "min", "max", "product", "band", "bor", "bxor"})


# ---- the no-mesh result ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshInfo:
    """A device mesh as a file or a peer describes it (no process groups).

    ``shape`` and ``dim_names`` (None when the mesh had none) are what a reader's mesh must match;
    ``ranks`` are the global ranks of the mesh in row-major order, ``device_type`` its device
    ("cpu", "cuda"), ``coordinate`` the writing rank's place in it (None if it was not in it).
    """

    shape: tuple[int, ...]
    dim_names: tuple[str, ...] | None
    device_type: str
    ranks: tuple[int, ...]
    coordinate: tuple[int, ...] | None

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(slots=True, repr=False)
class LocalShard:
    """The local shard of a DTensor with its placement: what :func:`stager.load` (and a transport
    receive) returns for a DTensor when no mesh of the reader's matches the one it was saved on.

    ``tensor`` is the writer's local tensor; ``placements`` are torch ``Placement`` objects
    (``Shard``, ``Replicate``, ``Partial``, ``_StridedShard``) one per mesh dimension; ``shape``
    and ``stride`` are the global DTensor's; ``mesh`` describes the mesh it lived on. Saving a
    dict of LocalShards writes them back as the same DTensors.
    """

    tensor: torch.Tensor
    mesh: MeshInfo
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def to_dtensor(self, mesh: Any) -> Any:
        """The DTensor over ``mesh`` (a ``DeviceMesh`` of the same shape and dim names) with this
        shard as its local tensor. Raises StagerError when the mesh does not match, or when this
        shard is not this rank's (another coordinate, or another shard shape)."""
        # required=True: a list, or StagerError.
        meshes = cast(list[Any], resolve_meshes([self.mesh], mesh, required=True, where=["this LocalShard"]))
        layout = DTensorLayout(0, self.mesh, self.placements, self.shape, self.stride, None, "this LocalShard")
        return MeshBinding(meshes, strict=True).build(self.tensor, layout, "this LocalShard")

    def __repr__(self) -> str:
        local = self.tensor
        return (f"LocalShard(tensor=<{str(local.dtype).removeprefix('torch.')} {list(local.shape)}>, "
                f"placements={self.placements}, shape={list(self.shape)}, stride={self.stride}, mesh={self.mesh})")


class DTensorLayout:
    """A DTensor's placement as decoded from JSON (internal; see :class:`LocalShard`)."""

    __slots__ = ("mesh_index", "mesh", "placements", "shape", "stride", "shard_order", "where")

    def __init__(self, mesh_index: int, mesh: MeshInfo, placements: tuple, shape: torch.Size,
                 stride: tuple[int, ...], shard_order: tuple | None, where: str) -> None:
        self.mesh_index = mesh_index
        self.mesh = mesh
        self.placements = placements
        self.shape = shape
        self.stride = stride
        self.shard_order = shard_order
        self.where = where


# ---- staging -----------------------------------------------------------------------------------


def placement_of(value: Any) -> Any:
    """What the plan records beside a DTensor's (or LocalShard's) local tensor."""
    if type(value) is LocalShard:
        return DTensorLayout(-1, value.mesh, value.placements, value.shape, value.stride, None, "")
    return value._spec


def local_tensor_of(value: Any) -> torch.Tensor:
    return value.tensor if type(value) is LocalShard else value._local_tensor


def wrap_all(staged: list[Any], records: list[tuple[int, Any]], binding: MeshBinding | None,
             where: list[str] | None = None) -> list[Any]:
    """One staged DTensor (or LocalShard) per plan record ``(local tensor index, placement)``.

    A record whose placement is the source's ``DTensorSpec`` (staging) keeps it; a decoded one is
    rebuilt by ``binding`` on the reader's mesh, or returned as a LocalShard without one.
    ``where[i]`` names record i's key in errors."""
    new = _new_dtensor
    if not any(type(placement) is DTensorLayout for _, placement in records):  # staging
        fast = DTENSOR.__new__
        if fast is getattr(torch.Tensor, "_dtensor__new__", None) and records:  # see _dtensor_constructor
            cls = DTENSOR
            index, spec = records[0]
            try:  # positional requires_grad is a quarter cheaper than a keyword; PyTorch 2.15 takes both
                first = fast(cls, staged[index], spec, False)
            except TypeError:
                return [fast(cls, staged[index], spec, requires_grad=False) for index, spec in records]
            return [first] + [fast(cls, staged[index], spec, False) for index, spec in records[1:]]
        return [new(staged[index], spec) for index, spec in records]
    out = []
    for number, (index, placement) in enumerate(records):
        local = staged[index]
        if type(placement) is not DTensorLayout:
            out.append(new(local, placement))
        elif binding is None or placement.mesh_index < 0:
            out.append(_local_shard(local, placement))
        else:
            out.append(binding.build(local, placement, where[number] if where else placement.where))
    return out


def _local_shard(local: torch.Tensor, layout: DTensorLayout) -> LocalShard:
    return LocalShard(local, layout.mesh, layout.placements, layout.shape, layout.stride)


class MeshBinding:
    """The reader's meshes for a decoded plan (one per described mesh, None where it has none)
    and how DTensors are rebuilt on them.

    A receive (``strict=False``, like PyTorch's PGTransport) rebuilds every DTensor whose mesh
    has a match: the sender's placements, shape and stride over this rank's mesh, the sender's
    local shard as the local tensor (a partner's replica holds the partner's shard). Only a
    placement that cannot apply to the mesh gives a LocalShard: a receive never fails over a
    mesh once the bytes have arrived.

    A load with a mesh (``strict=True``) also checks that the shard is this rank's: on every mesh
    dimension its placement does not replicate over, this rank has the writer's coordinate, and
    the placements give this rank a shard of its shape; else StagerError naming the key.

    Checks and the DTensorSpec are made once per layout: DTensors of one layout share one spec.
    """

    def __init__(self, meshes: list[Any], strict: bool) -> None:
        self.meshes = meshes
        self.strict = strict
        self.checked: dict[tuple, tuple[Any, tuple, str | None]] = {}

    def build(self, local: torch.Tensor, layout: DTensorLayout, where: str) -> Any:
        mesh = self.meshes[layout.mesh_index] if layout.mesh_index < len(self.meshes) else None
        if mesh is None:
            return _local_shard(local, layout)
        found = self.checked.get((id(layout), local.dtype, id(mesh)))
        spec, expected, problem = found if found is not None else self.check(layout, local.dtype, mesh)
        if spec is not None and not self.strict:
            return _new_dtensor(local, spec)
        if problem is None and expected != local.shape:
            problem = (f"its local shard has shape {list(local.shape)}, but {_placements_text(layout.placements)} "
                       f"of {list(layout.shape)} gives this rank a shard of shape {list(expected)}")
        if problem is None:
            return _new_dtensor(local, spec)
        if self.strict:
            raise StagerError(f"cannot rebuild the DTensor at {where} on this rank's mesh: {problem}")
        return _local_shard(local, layout)

    def check(self, layout: DTensorLayout, dtype: torch.dtype, mesh: Any) -> tuple[Any, tuple, str | None]:
        """``(spec or None, this rank's local shape, why the layout's shards are not this rank's
        or None)``."""
        key = (id(layout), dtype, id(mesh))
        found = self.checked.get(key)
        if found is None:
            found = self.checked[key] = self._check(layout, dtype, mesh)
        return found

    def _check(self, layout: DTensorLayout, dtype: torch.dtype, mesh: Any) -> tuple[Any, tuple, str | None]:
        if tuple(mesh.shape) != layout.mesh.shape:
            return None, (), (f"it was saved on a mesh of shape {list(layout.mesh.shape)}, "
                              f"this one has shape {list(mesh.shape)}")
        try:
            shard_order = None
            if layout.shard_order is not None:
                from torch.distributed.tensor._dtensor_spec import ShardOrderEntry

                shard_order = tuple(ShardOrderEntry(dim, dims) for dim, dims in layout.shard_order)
            # torch annotates shard_order without None, though None is its default.
            spec = DTensorSpec(mesh, layout.placements, TensorMeta(layout.shape, layout.stride, dtype),
                               shard_order=shard_order)  # type: ignore[arg-type]
            here = mesh.get_coordinate()
            if here is None:
                return spec, (), "this rank is not in the mesh"
            local_shape, _ = compute_local_shape_and_global_offset(layout.shape, mesh, layout.placements)
        except (ValueError, TypeError, AssertionError, RuntimeError, IndexError) as err:
            return None, (), f"its placement does not apply to this mesh ({type(err).__name__}: {err})"
        written = layout.mesh.coordinate
        if written is not None:
            for dim, placement in enumerate(layout.placements):
                if not isinstance(placement, Replicate) and here[dim] != written[dim]:
                    return spec, (), (f"it is the shard of the rank at mesh coordinate {list(written)} "
                                      f"({_placements_text(layout.placements)}), this rank is at {list(here)}")
        return spec, torch.Size(local_shape), None


def describe(plan: Any) -> list[str]:
    """One line per DTensor of a decoded plan, for ``stager inspect``."""
    lines = []
    for (_, layout), where in zip(plan.dtensors, plan.dtensor_where):
        mesh = layout.mesh
        names = f" {list(mesh.dim_names)}" if mesh.dim_names else ""
        lines.append(f"{where.removeprefix('root.')}  {_placements_text(layout.placements)}  {list(layout.shape)}  "
                     f"{list(layout.stride)}  {mesh.device_type} mesh {list(mesh.shape)}{names}, "
                     f"written at {_list(mesh.coordinate)}")
    return lines


def _placements_text(placements: tuple) -> str:
    return "(" + ", ".join(str(p) for p in placements) + ")"


def _list(value: Any) -> Any:
    return list(value) if value is not None else None


# ---- meshes of the reader ----------------------------------------------------------------------


def meshes_in(tree: Any) -> list[Any]:
    """The distinct device meshes of the DTensors in ``tree`` (e.g. in-place receive targets)."""
    if DTENSOR is None:
        return []
    found: dict[int, Any] = {}
    stack = [tree]
    while stack:
        value = stack.pop()
        if isinstance(value, DTENSOR):
            mesh = value._spec.mesh
            found.setdefault(id(mesh), mesh)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return list(found.values())


def receiver_meshes(given: Any, inplace: Any = None, sent: Any = ()) -> list[Any]:
    """The meshes a receiving rank rebuilds DTensors on, best first: ``given`` (a DeviceMesh or a
    list), those of the DTensors in ``inplace`` (the in-place targets) and in ``sent`` (the
    plans this rank sends in the same exchange: its own meshes)."""
    meshes = _as_mesh_list(given) + meshes_in(inplace)
    for plan in sent or ():
        meshes += [spec.mesh for _, spec in plan.dtensors if type(spec) is not DTensorLayout]
    unique: dict[int, Any] = {}
    for mesh in meshes:
        unique.setdefault(id(mesh), mesh)
    return list(unique.values())


def inplace_target(tensor: Any) -> Any:
    """The tensor an in-place receive target at a key path receives into: a DTensor target's
    local tensor (its storage, when of the same size, takes the bytes, as with PyTorch's
    PGTransport), any other tensor itself."""
    return tensor._local_tensor if DTENSOR is not None and isinstance(tensor, DTENSOR) else tensor


def _as_mesh_list(mesh: Any) -> list[Any]:
    if mesh is None:
        return []
    if isinstance(mesh, (list, tuple)):
        return list(mesh)
    return [mesh]


def resolve_meshes(infos: list[MeshInfo], candidates: Any, *, required: bool = False,
                   where: list[str] | None = None) -> list[Any] | None:
    """For each described mesh, the reader's ``DeviceMesh`` to rebuild its DTensors on: a
    candidate of the same shape and dim names (one with the same ranks first), else a submesh of
    a candidate picked by the described dim names. ``None`` where nothing matches, or a
    StagerError naming the key (``where[i]``: a key of a DTensor on mesh i) when ``required``."""
    candidates = [m for m in _as_mesh_list(candidates) if m is not None]
    for mesh in candidates:
        if not hasattr(mesh, "mesh_dim_names") or not hasattr(mesh, "get_coordinate"):
            raise StagerError(f"mesh must be a torch.distributed.DeviceMesh, got {type(mesh).__name__}")
    if not infos:
        return None
    out: list[Any] = []
    for index, info in enumerate(infos):
        match = _match(info, candidates)
        if match is None and required:
            key = where[index] if where is not None and index < len(where) else f"mesh {index}"
            shown = ", ".join(f"shape {list(m.shape)} dims {_list(m.mesh_dim_names)}" for m in candidates)
            raise StagerError(
                f"no given mesh fits the DTensor at {key}: it was saved on a mesh of shape {list(info.shape)} "
                f"with dims {_list(info.dim_names)}; given: {shown or 'none'}"
            )
        out.append(match)
    return out if any(m is not None for m in out) else None


def bind_meshes(plan: Any, mesh: Any, *, required: bool, rebuild: Any = None) -> None:
    """Chooses, for each mesh a decoded plan describes, the reader's mesh its DTensors are rebuilt
    on (``mesh``: a DeviceMesh, a list of them, or None); see :func:`resolve_meshes`. ``required``:
    every DTensor must become a DTensor on them (``load(mesh=...)``), see :class:`MeshBinding`.
    ``rebuild`` (a receive's :class:`GroupMeshes`): makes a mesh for a described mesh that none
    of ``mesh`` matches."""
    if not plan.mesh_infos:
        return
    where = ["root"] * len(plan.mesh_infos)
    for number in reversed(range(len(plan.dtensors))):
        where[plan.dtensors[number][1].mesh_index] = plan.dtensor_where[number]
    meshes = resolve_meshes(plan.mesh_infos, mesh, required=required, where=where)
    if rebuild is not None:
        meshes = [found if found is not None else rebuild(info)
                  for found, info in zip(meshes or [None] * len(plan.mesh_infos), plan.mesh_infos)]
        if all(found is None for found in meshes):
            meshes = None
    plan.mesh_binding = MeshBinding(meshes, strict=required) if meshes is not None else None


class GroupMeshes:
    """Meshes a receiving rank rebuilds over its process group for received DTensors whose mesh
    it was not given (what PyTorch's PGTransport returns: a DTensor, never a bare shard).

    A described mesh (shape, dim names, the sender's global ranks) is rebuilt with the sender's
    ranks when they all belong to ``group``, else with the group's ranks in order when their
    number fits the shape; anything else (or a torch without DeviceMesh) gets None, and the
    receive returns a :class:`LocalShard` for it. A 1-D mesh over exactly the group's ranks
    is ``DeviceMesh.from_group(group)``, usable for collectives; other shapes are built without
    process groups (no collective is possible on a receive that only some ranks make): their
    DTensors serve local work (``to_local()``, saving, sending on) and a given ``mesh=`` is the
    way to get collectives. Meshes are made once per transport and described mesh.
    """

    def __init__(self, group: Any, device_type: str) -> None:
        self.group = group
        self.device_type = device_type
        self.built: dict[tuple, Any] = {}

    def release(self) -> None:
        """Drops the group and the meshes over it (see ``stager.transport.pg._release_groups_at_exit``)."""
        self.group = None
        self.built.clear()

    def __call__(self, info: MeshInfo) -> Any:
        if self.group is None:
            return None
        key = (info.shape, info.dim_names, info.ranks)
        if key not in self.built:
            self.built[key] = self._build(info)
        return self.built[key]

    def _build(self, info: MeshInfo) -> Any:
        if DTENSOR is None:
            return None
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        try:
            group_ranks = list(dist.get_process_group_ranks(self.group))
        except Exception:  # not a registered group (or none): nothing to rebuild over
            return None
        size = math.prod(info.shape)
        if len(set(info.ranks)) == size and set(info.ranks) <= set(group_ranks):
            ranks = list(info.ranks)
        elif size == len(group_ranks):
            ranks = group_ranks
        else:
            return None
        try:
            if len(info.shape) == 1 and ranks == group_ranks:
                return DeviceMesh.from_group(self.group, self.device_type, mesh_dim_names=info.dim_names)
            layout = torch.tensor(ranks, dtype=torch.int).reshape(info.shape)
            return DeviceMesh(self.device_type, layout, mesh_dim_names=info.dim_names, _init_backend=False)
        except Exception:  # a mesh torch will not build here: the receive returns a LocalShard
            return None


def _match(info: MeshInfo, candidates: list[Any]) -> Any:
    same_shape = []
    for mesh in candidates:
        names = mesh.mesh_dim_names
        if tuple(mesh.shape) == info.shape and (info.dim_names is None or names is None or tuple(names) == info.dim_names):
            same_shape.append(mesh)
    for mesh in same_shape:
        if tuple(mesh.mesh.flatten().tolist()) == info.ranks:
            return mesh
    if same_shape:
        return same_shape[0]
    if info.dim_names:
        for mesh in candidates:
            names = mesh.mesh_dim_names
            if names and set(info.dim_names) <= set(names) and len(names) > len(info.dim_names):
                try:
                    sub = mesh[info.dim_names[0] if len(info.dim_names) == 1 else info.dim_names]
                except (KeyError, RuntimeError, ValueError):
                    continue
                if tuple(sub.shape) == info.shape:
                    return sub
    return None


# ---- JSON --------------------------------------------------------------------------------------


def _placement_json(placement: Any, where: str) -> dict[str, Any]:
    cls = type(placement)
    if cls is Shard:
        return {"t": "shard", "dim": placement.dim}
    if cls is Replicate:
        return {"t": "replicate"}
    if cls is Partial:
        return {"t": "partial", "reduce_op": placement.reduce_op}
    if cls is _StridedShard:
        return {"t": "strided_shard", "dim": placement.dim, "split_factor": int(placement.split_factor)}
    raise StagerError(
        f"cannot store or send the DTensor at {where}: its placement {placement!r} ({cls.__qualname__}) "
        "has no description without pickle (Shard, Replicate, Partial and _StridedShard do)"
    )


def _mesh_json(mesh: Any) -> dict[str, Any]:
    if isinstance(mesh, MeshInfo):
        shape, names, device, ranks, coordinate = mesh.shape, mesh.dim_names, mesh.device_type, mesh.ranks, mesh.coordinate
    else:
        shape, names, device = tuple(mesh.shape), mesh.mesh_dim_names, mesh.device_type
        ranks, coordinate = mesh.mesh.flatten().tolist(), mesh.get_coordinate()
    return {
        "shape": list(shape),
        "dim_names": list(names) if names is not None else None,
        "device_type": str(device),
        "ranks": list(ranks),
        "coordinate": list(coordinate) if coordinate is not None else None,
    }


def encode(records: list[tuple[int, Any]], where: list[str]) -> tuple[list[int], list[dict], list[dict]]:
    """The JSON description of the plan's DTensor records: ``(layout of each record, layouts,
    meshes)``. DTensors with the same mesh, placements, shape and stride share one layout entry,
    so 20,000 DTensors of a few shapes cost a few entries. ``where[i]`` names record i's key."""
    meshes: list[dict] = []
    mesh_index: dict[int, int] = {}
    layouts: list[dict] = []
    layout_index: dict[Any, int] = {}
    placement_json: dict[Any, list] = {}
    out = []
    first_where: list[str] = []  # layout i: the key of its first DTensor
    for number, (_, placement) in enumerate(records):
        if type(placement) is DTensorLayout:  # from a LocalShard
            key: Any = (id(placement.mesh), placement.placements, placement.shape, placement.stride,
                        placement.shard_order)
        else:
            meta = placement.tensor_meta
            key = (id(placement.mesh), placement.placements, meta.shape, meta.stride, placement.shard_order)
        try:
            index = layout_index.get(key)
        except TypeError:  # an unhashable custom placement: described (or refused) below
            key, index = ("unhashable", number), None
        if index is None:
            index = layout_index[key] = len(layouts)
            layouts.append(_layout_json(placement, where[number], meshes, mesh_index, placement_json))
            first_where.append(where[number])
        out.append(index)
    _refuse_unreadable(layouts, meshes, first_where)
    return out, layouts, meshes


def _refuse_unreadable(layouts: list[dict], meshes: list[dict], where: list[str]) -> None:
    """What :func:`decode` would refuse (an empty or 257-character dim name, a reduce op it does
    not know, ...) is refused when writing or sending, naming the DTensor's key."""
    try:
        decode({"dtensors": layouts, "meshes": meshes})
    except StagerError:
        for index, layout in enumerate(layouts):
            try:
                decode({"dtensors": [{**layout, "mesh": 0}], "meshes": [meshes[layout["mesh"]]]})
            except StagerError as err:
                reason = str(err).removeprefix("invalid checkpoint metadata: ")
                raise StagerError(f"cannot persist or send the DTensor at {where[index]}: a reader would refuse "
                                  f"its placement: {reason}") from None
        raise


def _layout_json(placement: Any, where: str, meshes: list[dict], mesh_index: dict[int, int],
                 placement_json: dict[Any, list]) -> dict[str, Any]:
    if type(placement) is DTensorLayout:
        mesh, placements = placement.mesh, placement.placements
        shape, stride, shard_order = placement.shape, placement.stride, placement.shard_order
    else:
        mesh, placements = placement.mesh, placement.placements
        shape, stride = placement.shape, placement.stride
        shard_order = _explicit_shard_order(placement)
    index = mesh_index.get(id(mesh))
    if index is None:
        index = mesh_index[id(mesh)] = len(meshes)
        meshes.append(_mesh_json(mesh))
    try:
        described = placement_json.get(placements)
    except TypeError:
        described = None
    if described is None:
        described = [_placement_json(p, where) for p in placements]
        try:
            placement_json[placements] = described
        except TypeError:
            pass
    entry = {"mesh": index, "placements": described, "shape": list(shape), "stride": list(stride)}
    if shard_order is not None:
        entry["shard_order"] = [[dim, list(mesh_dims)] for dim, mesh_dims in shard_order]
    return entry


def _explicit_shard_order(spec: Any) -> tuple | None:
    """A spec's shard order when it is not the one its placements imply (else None)."""
    order = getattr(spec, "shard_order", None)
    if order is None or getattr(spec, "use_strided_shard_as_shard_order", False):
        return None
    if order == DTensorSpec.compute_default_shard_order(spec.placements):
        return None
    return tuple((entry.tensor_dim, tuple(entry.mesh_dims)) for entry in order)


def _ints(value: Any, what: str, minimum: int, max_len: int = MAX_DIMS) -> tuple[int, ...]:
    if not is_int_list(value, minimum, max_len):
        raise fail(f"{what} must be a list of at most {max_len} integers >= {minimum}")
    return tuple(value)


def _decode_mesh(spec: Any, index: int) -> MeshInfo:
    what = f"mesh {index}"
    if type(spec) is not dict:
        raise fail(f"{what} must be an object")
    shape = _ints(spec.get("shape"), f"{what} shape", 1)
    if not shape:
        raise fail(f"{what} has no dimensions")
    size = math.prod(shape)
    ranks = _ints(spec.get("ranks"), f"{what} ranks", 0, max_len=size)
    if len(ranks) != size:
        raise fail(f"{what} lists {len(ranks)} ranks for a mesh of shape {list(shape)}")
    names = spec.get("dim_names")
    if names is not None:
        if (type(names) is not list or len(names) != len(shape) or len(set(names)) != len(names)
                or not all(type(n) is str and 0 < len(n) <= 256 for n in names)):
            raise fail(f"{what} dim_names must be distinct strings, one per dimension")
        names = tuple(names)
    device = spec.get("device_type")
    if type(device) is not str or not 0 < len(device) <= 64:
        raise fail(f"{what} device_type must be a short string")
    coordinate = spec.get("coordinate")
    if coordinate is not None:
        coordinate = _ints(coordinate, f"{what} coordinate", 0)
        if len(coordinate) != len(shape) or any(c >= n for c, n in zip(coordinate, shape)):
            raise fail(f"{what} coordinate {list(coordinate)} is outside its shape {list(shape)}")
    return MeshInfo(shape, names, device, ranks, coordinate)


def _decode_placement(spec: Any, ndim: int, what: str) -> Any:
    if type(spec) is not dict:
        raise fail(f"{what} must be an object")
    kind = spec.get("t")
    if kind == "replicate":
        return Replicate()
    if kind in ("shard", "strided_shard"):
        dim = spec.get("dim")
        if type(dim) is not int or not 0 <= dim < max(ndim, 1):
            raise fail(f"{what} shards dimension {dim!r} of a {ndim}-dimensional tensor")
        if kind == "shard":
            return Shard(dim)
        factor = spec.get("split_factor")
        if type(factor) is not int or factor < 1:
            raise fail(f"{what} split_factor must be a positive integer")
        return _StridedShard(dim, split_factor=factor)
    if kind == "partial":
        op = spec.get("reduce_op")
        if op not in _REDUCE_OPS:
            raise fail(f"{what} has unknown reduce_op {op!r}")
        return Partial(op)
    raise fail(f"{what} has unknown placement type {kind!r}")


def decode(meta: dict) -> tuple[list[DTensorLayout], list[MeshInfo]]:
    """Validates the ``dtensors`` (layouts) and ``meshes`` entries of a tree ``meta`` (untrusted
    input); returns the layouts and the meshes they refer to. Tree nodes refer to a layout by
    index (:func:`stager.tree.decode` checks those)."""
    layout_specs = meta.get("dtensors", [])
    mesh_specs = meta.get("meshes", [])
    if type(layout_specs) is not list or type(mesh_specs) is not list:
        raise fail("'dtensors' and 'meshes' must be lists")
    if layout_specs and DTENSOR is None:
        raise StagerError("the checkpoint holds DTensors, but this torch has no torch.distributed")
    meshes = [_decode_mesh(spec, index) for index, spec in enumerate(mesh_specs)]
    layouts = []
    for number, spec in enumerate(layout_specs):
        what = f"dtensor layout {number}"
        if type(spec) is not dict:
            raise fail(f"{what} must be an object")
        mesh_index = spec.get("mesh")
        if type(mesh_index) is not int or not 0 <= mesh_index < len(meshes):
            raise fail(f"{what} refers to mesh {mesh_index!r} of {len(meshes)}")
        mesh = meshes[mesh_index]
        shape = _ints(spec.get("shape"), f"{what} shape", 0)
        stride = _ints(spec.get("stride"), f"{what} stride", 0)
        if len(stride) != len(shape):
            raise fail(f"{what} has {len(shape)} sizes but {len(stride)} strides")
        placements = spec.get("placements")
        if type(placements) is not list or len(placements) != mesh.ndim:
            raise fail(f"{what} needs one placement per mesh dimension ({mesh.ndim})")
        placements = tuple(_decode_placement(p, len(shape), f"{what} placement {i}") for i, p in enumerate(placements))
        shard_order = spec.get("shard_order")
        if shard_order is not None:
            if type(shard_order) is not list or len(shard_order) > MAX_DIMS:
                raise fail(f"{what} shard_order must be a list")
            try:
                shard_order = tuple((int(d), _ints(m, f"{what} shard_order", 0)) for d, m in shard_order)
            except (TypeError, ValueError):
                raise fail(f"{what} shard_order entries must be [tensor dim, [mesh dims]]") from None
        layouts.append(DTensorLayout(mesh_index, mesh, placements, torch.Size(shape), stride, shard_order, what))
    return layouts, meshes
