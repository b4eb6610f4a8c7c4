"""One rank of a DTensor test: ``python dtensor_worker.py RANK WORLD PORT DIR SCENARIOS_JSON``.

Joins a gloo group on 127.0.0.1 (once per process: starting torch is the slow part on a busy
2-core machine), builds real DTensors (``distribute_tensor`` on CPU meshes, FSDP2 models), runs
each named scenario of SCENARIOS_JSON in order, prints ``RESULT {"scenario": ..., "ok": ...}`` per
scenario and exits by itself (exit code 0 when every scenario passed). Every collective and
transfer has a bounded timeout.
"""

import dataclasses
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stager
from stager.plan import plan_state_dict

TIMEOUT = datetime.timedelta(seconds=60)


@dataclasses.dataclass
class World:
    rank: int
    size: int
    directory: str
    mesh: object  # 1-D ("dp",) over every rank
    mesh2d: object  # 2-D ("rep", "tp") of shape (1, size)


def make_state_dict(world):
    """Every rank builds the same global tensors, each holds its shards: uneven Shard(0) (7 rows),
    Shard(1), bf16, Replicate, Partial, a DTensor view, the same DTensor twice, a 2-D mesh
    DTensor and one on its submesh, plus plain leaves."""
    gen = torch.Generator().manual_seed(7)
    mesh, mesh2d = world.mesh, world.mesh2d
    w = distribute_tensor(torch.randn(7, 5, generator=gen), mesh, [Shard(0)])
    sd = {
        "model": {
            "w": w,
            "w_t": w.t(),  # a view: its local tensor shares w's storage
            "cols": distribute_tensor(torch.randn(4, 6, generator=gen), mesh, [Shard(1)]),
            "half": distribute_tensor(torch.randn(6, 3, generator=gen).to(torch.bfloat16), mesh, [Shard(0)]),
            "rep": distribute_tensor(torch.arange(10.0), mesh, [Replicate()]),
            "partial": DTensor.from_local(torch.full((3,), float(world.rank)), mesh, [Partial()]),
            "tp": distribute_tensor(torch.randn(6, 4, generator=gen), mesh2d, [Replicate(), Shard(0)]),
            "tp_sub": distribute_tensor(torch.randn(5, generator=gen), mesh2d["tp"], [Shard(0)]),
        },
        "same": w,
        "plain": torch.arange(4) + world.rank,
        "step": 3,
    }
    return sd


def dtensors_of(tree, path="root"):
    if isinstance(tree, (DTensor, stager.LocalShard)):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from dtensors_of(value, f"{path}.{key}")


def check_dtensor(got, source, where, *, same_mesh=True):
    """``got`` is a staged/received/loaded copy of DTensor ``source``."""
    assert type(got) is DTensor, f"{where}: {type(got).__name__}"
    if same_mesh:
        assert got.device_mesh is source.device_mesh, f"{where}: another mesh object"
    else:
        assert got.device_mesh == source.device_mesh, f"{where}: another mesh"
    assert got.placements == source.placements, f"{where}: {got.placements} != {source.placements}"
    assert got.shape == source.shape and got.stride() == source.stride(), where
    assert got.dtype == source.dtype, where
    assert not got.requires_grad, where
    local, expected = got._local_tensor, source._local_tensor
    assert type(local) is torch.Tensor and local.device.type == "cpu" and not local.requires_grad, where
    assert local.shape == expected.shape and local.stride() == expected.stride(), where
    assert local.storage_offset() == expected.storage_offset(), where
    assert torch.equal(local, expected.detach()), f"{where}: values differ"
    assert local.untyped_storage().data_ptr() != expected.untyped_storage().data_ptr(), f"{where}: not a copy"


def check_state_dict(got, source, *, same_mesh=True):
    assert set(got) == set(source)
    for (path, a), (_, b) in zip(dtensors_of(got), dtensors_of(source), strict=True):
        check_dtensor(a, b, path, same_mesh=same_mesh)
    model = got["model"]
    assert model["w_t"]._local_tensor.untyped_storage().data_ptr() == model["w"]._local_tensor.untyped_storage().data_ptr()
    assert got["same"] is model["w"], "the same DTensor twice must stay one object"
    assert torch.equal(got["plain"], source["plain"]) and got["step"] == 3


def check_local_shards(got, source):
    """Without a mesh: LocalShards with the writer's placement and this rank's data."""
    for (path, shard), (_, dt) in zip(dtensors_of(got), dtensors_of(source), strict=True):
        assert type(shard) is stager.LocalShard, f"{path}: {type(shard).__name__}"
        assert shard.placements == dt.placements and shard.shape == dt.shape and shard.stride == dt.stride(), path
        assert torch.equal(shard.tensor, dt._local_tensor), path
        mesh = dt.device_mesh
        assert shard.mesh.shape == tuple(mesh.shape), path
        assert shard.mesh.dim_names == mesh.mesh_dim_names, path
        assert shard.mesh.ranks == tuple(mesh.mesh.flatten().tolist()), path
        assert shard.mesh.coordinate == tuple(mesh.get_coordinate()), path
        assert shard.mesh.device_type == "cpu", path


# ---- scenarios -----------------------------------------------------------------------------------


def scenario_stage(world):
    """Staging keeps every DTensor a DTensor, through the engine (no opaque leaf), for each stager."""
    sd = make_state_dict(world)
    plan = plan_state_dict(sd)
    assert plan.opaque == [], "a DTensor took the opaque (per-tensor torch copy) path"
    assert len(plan.dtensors) == 8, len(plan.dtensors)
    snapshot = {path: dt._local_tensor.clone() for path, dt in dtensors_of(sd)}
    for make in (
        lambda: stager.DefaultStager(stager.StagingOptions(num_threads=2)),
        lambda: stager.DefaultStager(stager.StagingOptions(False, False, False, False)),
        lambda: stager.BlockingAsyncStager(cache_staged_state_dict=True),
    ):
        with_stager = make()
        result = with_stager.stage(sd)
        staged = result.result(timeout=60) if hasattr(result, "result") else result
        check_state_dict(staged, sd)
        # The local shards live in one pooled host buffer, laid out by the plan.
        pointers = sorted(dt._local_tensor.untyped_storage().data_ptr() for _, dt in dtensors_of(staged))
        assert pointers[-1] - pointers[0] < plan.total_nbytes, "local shards are not in one host buffer"
        # Training goes on: the staged copy does not see it.
        with torch.no_grad():
            for _, dt in dtensors_of(sd):
                dt._local_tensor.add_(100)
        for path, dt in dtensors_of(staged):
            assert torch.equal(dt._local_tensor, snapshot[path]), f"{path} changed with its source"
        with torch.no_grad():
            for path, dt in dtensors_of(sd):
                dt._local_tensor.copy_(snapshot[path])
        with_stager.close()
    # Incremental staging: an unchanged local shard shares the previous result's bytes, a changed one is copied.
    incremental = stager.DefaultStager(stager.StagingOptions(use_async_staging=False, skip_unchanged=True))
    first = incremental.stage(sd)
    with torch.no_grad():
        sd["model"]["cols"]._local_tensor.add_(1)
    second = incremental.stage(sd)
    check_state_dict(second, sd)
    assert second["model"]["rep"]._local_tensor.data_ptr() == first["model"]["rep"]._local_tensor.data_ptr()
    assert second["model"]["cols"]._local_tensor.data_ptr() != first["model"]["cols"]._local_tensor.data_ptr()
    # A redistributed DTensor (other placements over another local tensor) is staged anew.
    sd["model"]["cols"] = sd["model"]["cols"].redistribute(placements=[Replicate()])
    third = incremental.stage(sd)
    check_state_dict(third, sd)
    assert third["model"]["cols"].placements == (Replicate(),)
    incremental.close()
    # Staged DTensors still compute: a collective over the staged copy gives the source's value.
    staged = stager.DefaultStager(stager.StagingOptions(use_async_staging=False)).stage(sd)
    assert torch.equal(staged["model"]["w"].full_tensor(), sd["model"]["w"].full_tensor())
    return {}


def _fsdp_model(world, seed=0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=world.mesh)
    fully_shard(model, mesh=world.mesh)
    return model


def _train_step(model, optim, seed):
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 16, generator=gen)).sum().backward()
    optim.step()
    optim.zero_grad()


def scenario_fsdp2(world):
    """A real FSDP2 model and its Adam state: staged, saved and loaded as DTensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _fsdp_model(world)
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, optim, 1)
    model_sd, optim_sd = get_state_dict(model, optim)
    sd = {"model": model_sd, "optim": optim_sd}
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    # The parameters themselves (requires_grad DTensor Parameters) stage as detached DTensors.
    sd["params"] = params
    staged = stager.DefaultStager(stager.StagingOptions(num_threads=2)).stage(sd).result(timeout=60)
    count = 0
    for name, source in model_sd.items():
        check_dtensor(staged["model"][name], source, name)
        count += 1
    for name, param in params.items():
        got = staged["params"][name]
        check_dtensor(got, param, name)
        assert not isinstance(got, torch.nn.Parameter), f"{name}: staged copy is still a Parameter"
    for key, state in optim_sd["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            check_dtensor(staged["optim"]["state"][key][field], state[field], f"optim.{key}.{field}")
            count += 1
    assert count == 12, count
    path = os.path.join(world.directory, f"fsdp_rank{world.rank}.stager")
    stager.save(staged, path)
    loaded = stager.load(path, mesh=world.mesh)
    for name, param in params.items():
        check_dtensor(loaded["params"][name], param, f"loaded {name}")
    return {}


def scenario_files(world):
    """save/load: DTensors with the mesh, LocalShards without; safetensors reads the shards."""
    sd = make_state_dict(world)
    path = os.path.join(world.directory, f"rank{world.rank}.stager")
    stager.save(sd, path)
    # Given the 1-D and the 2-D mesh, every DTensor comes back on its own (sub)mesh.
    loaded = stager.load(path, mesh=[world.mesh, world.mesh2d])
    check_state_dict(loaded, sd, same_mesh=False)
    assert loaded["model"]["tp_sub"].device_mesh == world.mesh2d["tp"]
    # Without a mesh: the local shards and their placement.
    shards = stager.load(path)
    check_local_shards(shards, sd)
    rebuilt = shards["model"]["cols"].to_dtensor(world.mesh)
    check_dtensor(rebuilt, sd["model"]["cols"], "to_dtensor", same_mesh=True)
    # Saving LocalShards writes the same DTensors again.
    again = os.path.join(world.directory, f"again{world.rank}.stager")
    stager.save(shards, again)
    check_state_dict(stager.load(again, mesh=[world.mesh, world.mesh2d]), sd, same_mesh=False)
    # A safetensors reader sees each whole-storage local shard under its key.
    from safetensors import safe_open

    with safe_open(path, "pt") as file:
        keys = set(file.keys())
        for key in ("model.cols", "model.half", "model.rep", "model.partial"):
            assert key in keys, (key, keys)
        assert torch.equal(file.get_tensor("model.half"), sd["model"]["half"]._local_tensor)
    # Another rank's file on this rank's mesh: its Shard(0) shards are not this rank's.
    if world.size > 1:
        dist.barrier()
        other = os.path.join(world.directory, f"rank{(world.rank + 1) % world.size}.stager")
        try:
            stager.load(other, mesh=[world.mesh, world.mesh2d])
        except stager.StagerError as err:
            assert "root.model.w" in str(err) and "coordinate" in str(err), str(err)
        else:
            raise AssertionError("loading another rank's shards onto this rank's mesh must fail")
    # A placement the reader would refuse (a 300-character dim name) is refused by save, naming
    # the key, and nothing is written.
    long_names = init_device_mesh("cpu", (world.size,), mesh_dim_names=("d" * 300,))
    refused = os.path.join(world.directory, f"refused{world.rank}.stager")
    try:
        stager.save({"model": {"odd": distribute_tensor(torch.ones(4 * world.size), long_names, [Shard(0)])}}, refused)
    except stager.StagerError as err:
        assert "root.model.odd" in str(err) and "dim_names" in str(err), str(err)
    else:
        raise AssertionError("a DTensor whose placement a reader refuses was saved")
    assert not os.path.exists(refused)
    return {}


def scenario_transport(world):
    """PGTransport: ring exchange of DTensor dicts, rebuilt on the receiver's mesh (the meshes of
    the DTensors it sent, a given mesh, or in-place targets') with the sender's local shards;
    LocalShards without a mesh; in-place receive into DTensor targets."""
    sd = make_state_dict(world)
    dst, src = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    transport = stager.PGTransport(dist.group.WORLD, TIMEOUT, "cpu")
    received = transport.exchange(dst, sd, src)
    # The partner's DTensors, on the meshes of the DTensors this rank sent (like PyTorch's
    # PGTransport: the sender's placements and local shard).
    full_w = torch.randn(7, 5, generator=torch.Generator().manual_seed(7))
    w = received["model"]["w"]
    assert type(w) is DTensor and w.device_mesh is world.mesh and w.placements == (Shard(0),)
    assert w.shape == (7, 5) and torch.equal(w._local_tensor, full_w.chunk(world.size)[src])
    assert received["same"] is w
    assert received["model"]["w_t"]._local_tensor.untyped_storage().data_ptr() == w._local_tensor.untyped_storage().data_ptr()
    assert received["model"]["tp"].device_mesh is world.mesh2d
    assert received["model"]["tp_sub"].device_mesh is sd["model"]["tp_sub"].device_mesh
    assert torch.equal(received["model"]["partial"]._local_tensor, torch.full((3,), float(src)))
    dist.barrier()
    # Only receiving (nothing sent, no mesh given): DTensors all the same, as PyTorch's, on meshes
    # rebuilt over the transport's group with the sender's mesh shape, dim names and placements.
    if world.rank == 0:
        transport.send_checkpoint([1], sd)
    elif world.rank == 1:
        got = transport.recv_checkpoint(0)
        w = got["model"]["w"]
        assert type(w) is DTensor and w.placements == (Shard(0),) and w.shape == (7, 5), w
        assert w.device_mesh is not world.mesh and w.device_mesh == world.mesh  # rebuilt: same ranks, dims
        assert w.device_mesh.mesh_dim_names == ("dp",)
        assert torch.equal(w._local_tensor, full_w.chunk(world.size)[0])  # the sender's shard
        assert got["same"] is w
        tp = got["model"]["tp"]
        assert type(tp) is DTensor and tp.device_mesh.shape == (1, world.size), tp
        assert tp.device_mesh.mesh_dim_names == ("rep", "tp") and tp.placements == (Replicate(), Shard(0))
        assert type(got["model"]["tp_sub"]) is DTensor and got["model"]["tp_sub"].device_mesh.mesh_dim_names == ("tp",)
        # The same described mesh is rebuilt once per transport.
        assert got["model"]["cols"].device_mesh is w.device_mesh
        # Sent on with a mesh given, they are DTensors on it.
        with_mesh = stager.PGTransport(dist.group.WORLD, TIMEOUT, "cpu", mesh=[world.mesh, world.mesh2d])
        with_mesh.send_checkpoint([0], got)
    if world.rank == 0:
        with_mesh = stager.PGTransport(dist.group.WORLD, TIMEOUT, "cpu", mesh=[world.mesh, world.mesh2d])
        check_state_dict(with_mesh.recv_checkpoint(1), sd, same_mesh=False)
    dist.barrier()
    # In place: each rank's own shards come back (held by the next rank) into its DTensor targets.
    targets = make_state_dict(world)
    with torch.no_grad():
        for _, dt in dtensors_of(targets):
            dt._local_tensor.zero_()
    inplace = stager.PGTransport(dist.group.WORLD, TIMEOUT, "cpu", state_dict=lambda: targets)
    got = inplace.exchange(src, received, dst)
    check_state_dict(got, sd, same_mesh=False)
    for (path, dt), (_, target) in zip(dtensors_of(got), dtensors_of(targets), strict=True):
        assert dt.device_mesh is target.device_mesh, path
        assert dt._local_tensor.untyped_storage().data_ptr() == target._local_tensor.untyped_storage().data_ptr(), path
        assert torch.equal(target._local_tensor, dt._local_tensor), path
    dist.barrier()
    return {}


def scenario_replication(world):
    """ReplicationStager: the partner's DTensor state_dict comes back as DTensors on this rank's
    mesh, and its persisted replica loads (as the partner's LocalShards)."""
    if world.size < 2:
        return {"skipped": "needs 2 ranks"}
    sd = make_state_dict(world)
    directory = os.path.join(world.directory, f"replicas{world.rank}")
    with_stager = stager.ReplicationStager(dist.group.WORLD, TIMEOUT, storage_dir=directory)
    received = with_stager.stage(sd)
    partner = (world.rank + world.size // 2) % world.size if world.size % 2 == 0 else (world.rank - 1) % world.size
    expected = torch.randn(7, 5, generator=torch.Generator().manual_seed(7)).chunk(world.size)[partner]
    # The partner's DTensors on this rank's mesh, holding the partner's shards.
    replica = received["model"]["w"]
    assert type(replica) is DTensor and replica.device_mesh is world.mesh and replica.placements == (Shard(0),)
    assert torch.equal(replica._local_tensor, expected)
    assert torch.equal(received["model"]["rep"]._local_tensor, torch.arange(10.0))
    # The persisted replica records who wrote it: loaded without a mesh, the partner's coordinate.
    replicas = stager.find_replicas(directory)
    assert replicas, "no replica persisted"
    shard = stager.load(replicas[0].path)["model"]["w"]
    assert type(shard) is stager.LocalShard and shard.mesh.coordinate == (partner,)
    assert torch.equal(shard.tensor, expected)
    if world.size > 1:  # and it is not this rank's to load onto its mesh
        try:
            stager.load(replicas[0].path, mesh=[world.mesh, world.mesh2d])
        except stager.StagerError as err:
            assert "coordinate" in str(err), str(err)
        else:
            raise AssertionError("a partner's replica must not load as this rank's DTensors")
    dist.barrier()
    return {}


def scenario_restore_into(world):
    """restore(into=...) with DTensor targets: the restored values land in the targets' local
    shards, whose storages stay, both from a fresh stager on the old storage_dirs (the copies on
    disk load as LocalShards) and from the stager's own memory."""
    if world.size < 2:
        return {"skipped": "needs 2 ranks"}

    def build(fill):
        gen = torch.Generator().manual_seed(11)
        values = {"w": torch.randn(8, 4, generator=gen), "rep": torch.arange(6.0),
                  "half": torch.randn(6, 2, generator=gen).to(torch.bfloat16)}
        placements = {"w": [Shard(0)], "rep": [Replicate()], "half": [Shard(0)]}
        return {"model": {k: distribute_tensor(fill(v), world.mesh, placements[k]) for k, v in values.items()},
                "plain": fill(torch.arange(4.0) + world.rank), "step": 3}

    sd = build(lambda v: v)
    directory = os.path.join(world.directory, f"restore{world.rank}")
    first = stager.ReplicationStager(dist.group.WORLD, TIMEOUT, storage_dir=directory, keep_own=True)
    first.stage(sd, step=1)
    for source in ("disk", "memory"):
        into = build(torch.zeros_like)
        pointers = {k: v._local_tensor.data_ptr() for k, v in into["model"].items()}
        restorer = (stager.ReplicationStager(dist.group.WORLD, TIMEOUT, storage_dir=directory, keep_own=True)
                    if source == "disk" else first)
        out = restorer.restore(into=into)
        for key, value in sd["model"].items():
            target = into["model"][key]
            assert type(target) is DTensor, (source, key, type(target))
            assert torch.equal(target._local_tensor, value._local_tensor), (source, key)
            assert target._local_tensor.data_ptr() == pointers[key], (source, key)
            assert out["model"][key] is target, (source, key, type(out["model"][key]))
        assert torch.equal(into["plain"], sd["plain"]) and out["step"] == 3, source
    dist.barrier()
    return {}


def _sharded_state_dict(rank, size, rows=8):
    """PyTorch's _create_sharded_tensor_state_dict (test_pg_transport.py): one ShardedTensor of
    ``rows`` rows per rank (deterministic values), plus a scalar tensor."""
    from torch.distributed._shard.sharded_tensor import Shard as ShardedTensorShard
    from torch.distributed._shard.sharded_tensor import ShardMetadata, init_from_local_shards

    local = torch.arange(rank * rows * 8, (rank + 1) * rows * 8, dtype=torch.float32).reshape(rows, 8)
    st = init_from_local_shards([ShardedTensorShard(tensor=local, metadata=ShardMetadata(
        shard_offsets=[rank * rows, 0], shard_sizes=[rows, 8], placement=f"rank:{rank}/cpu"))], rows * size, 8)
    return {"model": {"sharded_tensor": st, "w": torch.ones(3)}, "rank_scalar": torch.tensor(float(rank))}


def _check_sharded(got, owner, world, where, rows=8):
    """``got`` holds rank ``owner``'s ShardedTensor shard, placed on this rank, as PyTorch's
    receive returns it."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    st = got["model"]["sharded_tensor"]
    assert isinstance(st, ShardedTensor), f"{where}: {type(st).__name__}"
    assert st.size() == torch.Size([rows * world.size, 8]), where
    shards = st.local_shards()
    assert len(shards) == 1, where
    expected = torch.arange(owner * rows * 8, (owner + 1) * rows * 8, dtype=torch.float32).reshape(rows, 8)
    assert torch.equal(shards[0].tensor, expected), where
    assert shards[0].metadata.shard_offsets == [owner * rows, 0] and shards[0].metadata.shard_sizes == [rows, 8], where
    assert str(shards[0].metadata.placement) == f"rank:{world.rank}/cpu", where
    assert [m.shard_offsets for m in st.metadata().shards_metadata] == [[r * rows, 0] for r in range(world.size)], where
    assert got["rank_scalar"].item() == float(owner), where
    assert torch.equal(got["model"]["w"], torch.ones(3)), where


def scenario_sharded_tensors(world):
    """ShardedTensor leaves (FSDP1's SHARDED_STATE_DICT) travel like PyTorch's transport carries
    them: staged, saved and loaded (under a process group), sent through PGTransport in PyTorch's
    ring (test_pg_transport_with_sharded_tensor) and replicated by ReplicationStager
    (test_replication_sharded_tensors): the sender's shard, placed on the receiving rank, under
    the sender's global metadata."""
    sd = _sharded_state_dict(world.rank, world.size)
    source = sd["model"]["sharded_tensor"].local_shards()[0].tensor
    staged = stager.DefaultStager(stager.StagingOptions(use_async_staging=False)).stage(sd)
    _check_sharded(staged, world.rank, world, "staged")
    staged_local = staged["model"]["sharded_tensor"].local_shards()[0].tensor
    assert staged_local.untyped_storage().data_ptr() != source.untyped_storage().data_ptr(), "not a copy"
    path = os.path.join(world.directory, f"st{world.rank}.stager")
    stager.save(sd, path)
    _check_sharded(stager.load(path), world.rank, world, "loaded")
    if world.size > 1:
        nxt, prev = (world.rank + 1) % world.size, (world.rank - 1) % world.size
        transport = stager.PGTransport(dist.group.WORLD, datetime.timedelta(seconds=30), torch.device("cpu"))
        if world.rank == 0:
            transport.send_checkpoint([nxt], sd)
            received = transport.recv_checkpoint(prev)
        else:
            received = transport.recv_checkpoint(prev)
            transport.send_checkpoint([nxt], sd)
        _check_sharded(received, prev, world, "received")
        replicator = stager.ReplicationStager(pg=dist.group.WORLD, timeout=datetime.timedelta(seconds=30),
                                              device=torch.device("cpu"),
                                              storage_dir=os.path.join(world.directory, f"st_replicas{world.rank}"))
        partner = (world.rank + world.size // 2) % world.size if world.size % 2 == 0 else prev
        _check_sharded(replicator.stage(sd), partner, world, "replicated")
        replicator.close()
    dist.barrier()
    return {}


def _dcp_round_trip(world, kind):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    group = dist.new_group(backend="gloo", timeout=TIMEOUT)  # dcp's own group, as torchtitan does
    model = _fsdp_model(world)
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, optim, 1)
    model_sd, optim_sd = get_state_dict(model, optim)
    expected = {name: dt._local_tensor.clone() for name, dt in model_sd.items()}
    path = os.path.join(world.directory, f"dcp-{kind}")
    with stager.DefaultStager(stager.StagingOptions(num_threads=2)) as async_stager:
        response = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path,
                                  async_stager=async_stager, process_group=group,
                                  async_checkpointer_type=getattr(AsyncCheckpointerType, kind))
        response.staging_completion.result(timeout=60)
        _train_step(model, optim, 2)  # training goes on while the upload runs
        response.upload_completion.result(timeout=120)
    fresh = _fsdp_model(world, seed=1)
    fresh_optim = torch.optim.Adam(fresh.parameters(), lr=0.1)
    _train_step(fresh, fresh_optim, 3)
    target_model, target_optim = get_state_dict(fresh, fresh_optim)
    target = {"model": target_model, "optim": target_optim}
    dcp.load(target, checkpoint_id=path, process_group=group)
    set_state_dict(fresh, fresh_optim, model_state_dict=target["model"], optim_state_dict=target["optim"])
    for name, value in get_state_dict(fresh, fresh_optim)[0].items():
        assert torch.equal(value._local_tensor, expected[name]), name
    dist.barrier(group)
    dist.destroy_process_group(group)
    return {}


def scenario_dcp_thread(world):
    return _dcp_round_trip(world, "THREAD")


def scenario_dcp_process(world):
    return _dcp_round_trip(world, "PROCESS")


# ---- PyTorch's own expectations (test_pg_transport.py, test_replication_* of its staging tests) -----


def _ring(transport, state_dict, world):
    """PyTorch's ring_send_recv_checkpoint: send to rank + 1, receive from rank - 1."""
    nxt, prev = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    if world.rank == 0:
        transport.send_checkpoint([nxt], state_dict)
        return transport.recv_checkpoint(prev)
    received = transport.recv_checkpoint(prev)
    transport.send_checkpoint([nxt], state_dict)
    return received


def scenario_pytorch_transport(world):
    """test_pg_transport_with_mixed_content with stager's PGTransport: a DTensor (from_local on a
    fresh 1-D mesh), model tensors, a non-tensor, a nested dict and a list come back equal, the
    DTensor as a DTensor; sends and receives are separate calls here, so every DTensor comes back
    on a mesh rebuilt over the group, and that mesh works for collectives."""
    mesh = init_device_mesh("cpu", (world.size,))
    torch.manual_seed(42)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
    dtensor = DTensor.from_local(torch.randn(10, 10), mesh)  # Replicate(), the same on every rank
    state_dict = {
        "net1.weight": model[0].weight.data, "net1.bias": model[0].bias.data,
        "net2.weight": model[2].weight.data, "net2.bias": model[2].bias.data,
        "dtensor": dtensor, "non-tensor": "some string",
        "nested": {"tensor": torch.randn(1, 2), "value": 42}, "list": [1, 2, 3],
    }
    transport = stager.PGTransport(dist.group.WORLD, datetime.timedelta(seconds=30), torch.device("cpu"))
    received = _ring(transport, state_dict, world)
    assert set(received) == set(state_dict)
    got = received["dtensor"]
    assert type(got) is DTensor and got.placements == dtensor.placements and got.shape == dtensor.shape, got
    assert got.device_mesh == mesh and got.device_mesh.mesh_dim_names is None
    assert torch.equal(got.to_local(), dtensor.to_local())
    # The rebuilt mesh is the group's: a collective over it works (every rank calls it).
    assert torch.equal(got.full_tensor(), dtensor.to_local())
    assert torch.equal(got.redistribute(mesh, [Shard(0)]).to_local(), dtensor.to_local().chunk(world.size)[world.rank])
    for key in ("net1.weight", "net1.bias", "net2.weight", "net2.bias"):
        assert torch.equal(received[key], state_dict[key]), key
    assert torch.equal(received["nested"]["tensor"], state_dict["nested"]["tensor"])
    assert received["nested"]["value"] == 42 and received["list"] == [1, 2, 3]
    assert received["non-tensor"] == "some string"
    dist.barrier()
    return {}


def scenario_pytorch_replication_dtensors(world):
    """test_replication_dtensors with stager's ReplicationStager: Shard(0) and Replicate()
    DTensors on ``DeviceMesh("cpu", ranks)`` come back as DTensors holding the partner's shard."""
    if world.size < 2:
        return {"skipped": "needs 2 ranks"}
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh("cpu", list(range(world.size)))
    global_tensor = torch.arange(0, 128 * 16, dtype=torch.float32).reshape(128, 16)
    state_dict = {
        "sharded_param": distribute_tensor(global_tensor, mesh, [Shard(0)]),
        "replicated_param": distribute_tensor(torch.full((8, 8), 12800.0), mesh, [Replicate()]),
        "rank_scalar": torch.tensor(float(world.rank)),
    }
    replicator = stager.ReplicationStager(pg=dist.group.WORLD, timeout=datetime.timedelta(seconds=30),
                                          device=torch.device("cpu"),
                                          storage_dir=os.path.join(world.directory, f"pt_replicas{world.rank}"))
    replicated = replicator.stage(state_dict)
    partner = (world.rank + world.size // 2) % world.size if world.size % 2 == 0 else (world.rank - 1) % world.size
    sharded = replicated["sharded_param"]
    assert isinstance(sharded, DTensor), type(sharded)
    assert torch.equal(sharded.to_local(), global_tensor.chunk(world.size)[partner])
    assert type(sharded._spec.placements[0]).__name__ == "Shard"
    replicated_param = replicated["replicated_param"]
    assert isinstance(replicated_param, DTensor) and type(replicated_param._spec.placements[0]).__name__ == "Replicate"
    assert torch.equal(replicated_param.to_local(), torch.full((8, 8), 12800.0))
    assert replicated["rank_scalar"].item() == float(partner)
    replicator.close()
    dist.barrier()
    return {}


SCENARIOS = {name.removeprefix("scenario_"): value for name, value in globals().items() if name.startswith("scenario_")}


def main():
    rank, size, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    scenarios = json.loads(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=TIMEOUT)
    failed = False
    try:
        world = World(rank, size, directory, init_device_mesh("cpu", (size,), mesh_dim_names=("dp",)),
                      init_device_mesh("cpu", (1, size), mesh_dim_names=("rep", "tp")))
        for name in scenarios:
            try:
                extra = SCENARIOS[name](world)
                print("RESULT " + json.dumps({"scenario": name, "ok": True, **extra}), flush=True)
            except Exception:
                failed = True
                print("RESULT " + json.dumps({"scenario": name, "ok": False, "error": traceback.format_exc()}), flush=True)
                break  # the other ranks may now wait in a collective: stop, they time out and stop too
    finally:
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
