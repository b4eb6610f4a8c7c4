"""DTensor leaves and tensors inside objects.

Multi-rank cases run one process per rank (tests/dtensor_worker.py) on real gloo groups of 1, 2
and 3 ranks on 127.0.0.1, with real DTensors and FSDP2 models on CPU meshes; every worker exits by
itself and the test kills leftovers only when one overran its deadline. The placement JSON and the
tensors-inside-objects cases (issue 15, item 5) run in this process.
"""

import dataclasses
import json
import os
import threading

import pytest
import ranks
import torch

import stager
from stager import tree
from stager.plan import plan_state_dict

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dtensor_worker.py")


def run_ranks(world, directory, scenarios, deadline=240):
    """Runs ``world`` workers through ``scenarios``; returns {rank: (returncode, {name: result}, output)}."""
    return ranks.run_ranks(world, directory, scenarios, deadline, worker=WORKER)


def assert_scenarios_pass(results, scenarios):
    for rank, (rc, found, output) in results.items():
        for name in scenarios:
            result = found.get(name)
            assert result is not None and result["ok"], (
                f"rank {rank}, scenario {name}: " + (result["error"] if result else f"no result (rc={rc}):\n{output[-5000:]}")
            )
        assert rc == 0, f"rank {rank} exited with {rc}:\n{output[-3000:]}"


# ---- multi-rank: staging, files, transport, replication, dcp ------------------------------------

STAGING_AND_FILES = ["stage", "files", "fsdp2", "sharded_tensors"]
EXCHANGE = ["transport", "replication", "restore_into"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_staging_and_files(tmp_path, world):
    # Staged DTensors keep mesh, placements, shape, stride, views and sharing, through the engine;
    # save/load round-trips them with a mesh (incl. a 2-D mesh and its submesh) and without one.
    assert_scenarios_pass(run_ranks(world, tmp_path, STAGING_AND_FILES), STAGING_AND_FILES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_transport_and_replication(tmp_path, world):
    # PGTransport (ring exchange, send back, in place into DTensor targets) and ReplicationStager
    # (pairs for 2 ranks, the ring for 3) carry DTensor state_dicts; the placement travels as JSON.
    assert_scenarios_pass(run_ranks(world, tmp_path, EXCHANGE), EXCHANGE)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_pytorch_transport_and_replication_expectations(tmp_path, world):
    # PyTorch's test_pg_transport_with_mixed_content and test_replication_dtensors with stager's
    # classes: received DTensors are DTensors (on a mesh rebuilt over the group when the receiver
    # has none of its own), holding the sender's shard.
    scenarios = ["pytorch_transport", "pytorch_replication_dtensors"]
    assert_scenarios_pass(run_ranks(world, tmp_path, scenarios), scenarios)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2])
def test_dcp_async_save_and_load_fsdp2(tmp_path, world):
    # dcp.async_save with stager's DefaultStager on an FSDP2 model + Adam, then dcp.load into a
    # fresh FSDP2 model, with the THREAD and the PROCESS checkpointer.
    scenarios = ["dcp_thread", "dcp_process"]
    assert_scenarios_pass(run_ranks(world, tmp_path, scenarios, deadline=360), scenarios)


# ---- the placement JSON (no process group needed) -----------------------------------------------


def _meta_with_dtensor(**changes):
    entry = {"mesh": 0, "placements": [{"t": "shard", "dim": 0}], "shape": [8, 4], "stride": [4, 1]}
    mesh = {"shape": [2], "dim_names": ["dp"], "device_type": "cpu", "ranks": [0, 1], "coordinate": [1]}
    meta = {
        "version": tree.FORMAT_VERSION,
        "tree": {"t": "dict", "items": [[{"t": "str", "v": "w"}, {"t": "tensor", "i": 0, "dtensor": 0}]]},
        "tensors": [{"dtype": "float32", "shape": [4, 4], "stride": [4, 1], "offset": 0, "storage": 0}],
        "storages": [{"nbytes": 64}],
        "dtensors": [entry],
        "meshes": [mesh],
    }
    for key, value in changes.items():
        where, field = key.split("__")
        target = {"dtensor": entry, "mesh": mesh, "node": meta["tree"]["items"][0][1]}[where]
        target[field] = value
    return meta


def _meta_with_sharded(**changes):
    node = {"t": "sharded", "local": [[0, [2, 0], [2, 8]]], "size": [4, 8], "dtype": "float32",
            "requires_grad": False, "pin_memory": False, "memory_format": "contiguous_format", "strides": None,
            "shards": [[[0, 0], [2, 8], "rank:0/cpu"], [[2, 0], [2, 8], "rank:1/cpu"]]}
    node.update(changes)
    return {"version": tree.FORMAT_VERSION, "tree": {"t": "dict", "items": [["model", {"t": "dict", "items": [
        ["st", node]]}]]}, "tensors": [["float32", [2, 8], None, 0, 0]], "storages": [64]}


def test_a_sharded_tensor_read_outside_a_process_group_names_its_key():
    plan = tree.decode(_meta_with_sharded())
    buffer = stager._native.HostPool().acquire(plan.total_nbytes)
    with pytest.raises(stager.StagerError, match=r"ShardedTensor at root\.model\.st: .*torch\.distributed"):
        plan.materialize(buffer)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"local": [[1, [2, 0], [2, 8]]]}, "tensor index < 1"),
        ({"local": [[0, [2], [2, 8]]]}, "shard offsets"),
        ({"shards": []}, "at least one"),
        ({"shards": [[[0, 0], [2, 8], "__import__('os')"]]}, "rank:<n>/<device>"),
        ({"dtype": "object"}, "unknown dtype"),
        ({"memory_format": "pickle"}, "memory_format"),
        ({"requires_grad": "yes"}, "booleans"),
        ({"size": [-4, 8]}, "size"),
        ({"strides": [1]}, "strides"),
    ],
)
def test_hostile_sharded_tensor_metadata_is_refused(change, message):
    with pytest.raises(stager.StagerError, match="invalid checkpoint metadata") as info:
        tree.decode(_meta_with_sharded(**change))
    assert message in str(info.value) and "root.model.st" in str(info.value), str(info.value)


def test_decoded_dtensor_without_mesh_is_a_local_shard():
    plan = tree.decode(_meta_with_dtensor(dtensor__placements=[{"t": "strided_shard", "dim": 1, "split_factor": 2}]))
    buffer = stager._native.HostPool().acquire(plan.total_nbytes)
    got = plan.materialize(buffer)["w"]
    assert type(got) is stager.LocalShard
    assert got.mesh == stager.MeshInfo((2,), ("dp",), "cpu", (0, 1), (1,))
    assert got.shape == torch.Size([8, 4]) and got.stride == (4, 1) and got.tensor.shape == (4, 4)
    placement = got.placements[0]
    assert type(placement).__name__ == "_StridedShard" and placement.dim == 1 and placement.split_factor == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dtensor__placements": [{"t": "shard", "dim": 2}]}, "shards dimension 2"),
        ({"dtensor__placements": [{"t": "partial", "reduce_op": "__import__"}]}, "reduce_op"),
        ({"dtensor__placements": [{"t": "pickle"}]}, "unknown placement"),
        ({"dtensor__placements": []}, "one placement per mesh dimension"),
        ({"node__dtensor": 5}, "refers to dtensor layout 5"),
        ({"node__dtensor": "0"}, "dtensor layout must be an integer"),
        ({"dtensor__mesh": 3}, "refers to mesh 3"),
        ({"dtensor__stride": [4]}, "strides"),
        ({"dtensor__shape": [-1, 4]}, "shape"),
        ({"mesh__ranks": [0]}, "lists 1 ranks"),
        ({"mesh__dim_names": ["dp", "dp"]}, "dim_names"),
        ({"mesh__coordinate": [2]}, "outside its shape"),
        ({"mesh__shape": [0]}, "shape"),
        ({"mesh__device_type": 7}, "device_type"),
    ],
)
def test_hostile_placement_metadata_is_refused(change, message):
    with pytest.raises(stager.StagerError, match=message):
        tree.decode(_meta_with_dtensor(**change))


def test_placement_json_round_trip_of_every_placement_kind():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = stager.MeshInfo((2, 3), ("dp", "tp"), "cuda", tuple(range(6)), (1, 2))
    placements = (Shard(0), Replicate())
    for placements in [(Shard(0), Replicate()), (Partial("avg"), Shard(1)), (_StridedShard(0, split_factor=3), Shard(0))]:
        shard = stager.LocalShard(torch.zeros(2, 2), mesh, placements, torch.Size([4, 6]), (6, 1))
        plan = plan_state_dict({"x": shard})
        meta = json.loads(json.dumps(tree.encode(plan)))
        decoded = tree.decode(meta)
        got = decoded.materialize(stager._native.HostPool().acquire(decoded.total_nbytes))["x"]
        assert got.placements == placements and got.mesh == mesh and got.shape == shard.shape and got.stride == (6, 1)


# ---- tensors inside objects and tensor attributes (issue 15, item 5) -----------------------------


@dataclasses.dataclass
class Holder:
    weight: torch.Tensor
    extra: object = None


class Custom:
    def __init__(self, tensor):
        self.tensor = tensor
        self.name = "custom"


def _stage(sd):
    return stager.DefaultStager(stager.StagingOptions(use_async_staging=False)).stage(sd)


def test_parameter_inside_a_dataclass_is_staged_detached_and_shared():
    param = torch.nn.Parameter(torch.randn(4))
    staged = _stage({"p": param, "holder": Holder(param), "custom": Custom(param)})
    inner = staged["holder"].weight
    assert type(staged["holder"]) is Holder and type(staged["custom"]) is Custom
    assert type(inner) is torch.Tensor and not inner.requires_grad, "a Parameter inside an object stays a Parameter"
    assert inner is staged["p"] and staged["custom"].tensor is staged["p"], "sharing with the dict's tensor is lost"
    assert torch.equal(inner, param.detach()) and inner.data_ptr() != param.data_ptr()
    with torch.no_grad():
        param.add_(1)
    assert not torch.equal(inner, param.detach()), "the staged copy follows its source"


def test_non_leaf_tensor_inside_an_object_is_staged():
    leaf = torch.randn(3, requires_grad=True)
    computed = leaf * 2  # not a leaf: deepcopy refuses it
    staged = _stage({"holder": Holder(computed, extra=[computed])})
    assert torch.equal(staged["holder"].weight, computed.detach()) and not staged["holder"].weight.requires_grad
    assert staged["holder"].extra[0] is staged["holder"].weight


def test_tensor_attributes_are_kept():
    tensor = torch.randn(3)
    other = torch.randn(2)
    tensor.my_attr = {"scale": 2.5, "ref": other}
    param = torch.nn.Parameter(torch.randn(2))
    param.tag = "embedding"
    staged = _stage({"t": tensor, "o": other, "p": param})
    assert staged["t"].my_attr["scale"] == 2.5
    assert staged["t"].my_attr["ref"] is staged["o"], "a tensor in an attribute is staged like the rest"
    assert staged["t"].my_attr is not tensor.my_attr
    assert staged["p"].tag == "embedding" and not isinstance(staged["p"], torch.nn.Parameter)


def test_object_that_cannot_be_copied_names_its_key():
    with pytest.raises(stager.StagerError, match=r"root\.model\.lock"):
        _stage({"model": {"w": torch.ones(2), "lock": threading.Lock()}})
    with pytest.raises(stager.StagerError, match=r"root\.model\.holder"):
        _stage({"model": {"holder": Holder(torch.ones(2), extra=threading.Lock())}})


def test_objects_without_tensors_are_still_deep_copies():
    shared = {"a": [1, 2]}
    staged = _stage({"x": Holder(torch.ones(1), extra=shared), "y": Custom(None), "s": shared})
    assert staged["x"].extra == shared and staged["x"].extra is not shared
    assert staged["x"].extra is staged["s"], "a container shared by an object and the dict stays shared"
    assert staged["y"].name == "custom" and staged["y"].tensor is None


def test_object_holding_tensors_needs_pickle_to_be_saved(tmp_path):
    sd = {"holder": Holder(torch.ones(2))}
    with pytest.raises(stager.StagerError, match=r"root\.holder"):
        stager.save(sd, tmp_path / "x.stager")
    stager.save(sd, tmp_path / "x.stager", allow_pickle=True)
    loaded = stager.load(tmp_path / "x.stager", allow_pickle=True)
    assert torch.equal(loaded["holder"].weight, torch.ones(2))


def test_numpy_arrays_are_copied_and_object_arrays_give_up_their_tensors():
    numpy = pytest.importorskip("numpy")
    numbers = numpy.arange(6.0)
    objects = numpy.empty(1, dtype=object)
    param = torch.nn.Parameter(torch.ones(2))
    objects[0] = param
    staged = _stage({"numbers": numbers, "holder": Holder(numbers), "objects": objects, "p": param})
    assert staged["numbers"] is not numbers and (staged["numbers"] == numbers).all()
    assert staged["holder"].weight is staged["numbers"]
    assert staged["objects"][0] is staged["p"] and not staged["p"].requires_grad
