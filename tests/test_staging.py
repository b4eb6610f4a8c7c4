"""DefaultStager / BlockingAsyncStager semantics, against real torch tensors."""

import collections
import copy
import dataclasses
import os
from concurrent.futures import Future

import pytest
import torch
from torch.distributed.checkpoint import staging as torch_staging

import stager
from helpers import all_dtype_tensors, assert_same_tree, same_storage

Point = collections.namedtuple("Point", "x y")


def sync_options(**kwargs):
    return stager.StagingOptions(use_async_staging=False, **kwargs)


def nested_state_dict():
    weight = torch.randn(8, 6)
    return collections.OrderedDict(
        model=collections.OrderedDict(
            weight=weight,
            weight_t=weight.t(),  # a non-contiguous view of the same storage
            row=weight[3],  # storage offset 18
            bias=torch.randn(6),
            empty=torch.empty(0, 5),
            scalar=torch.tensor(3.5),
            strided=torch.arange(40.0)[::3],
        ),
        optim={"state": {0: {"step": torch.tensor(10), "exp_avg": torch.randn(8, 6)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        extra=[torch.ones(3), (torch.zeros(2), "tag", None), Point(torch.full((2,), 7.0), 2)],
        meta={"epoch": 3, "name": "run", "shape": torch.Size([2, 3]), "dtype": torch.float16},
    )


STAGERS = {
    "default-sync": lambda: stager.DefaultStager(sync_options()),
    "default-async": lambda: stager.DefaultStager(),
    "blocking": lambda: stager.BlockingAsyncStager(),
    "blocking-cached": lambda: stager.BlockingAsyncStager(cache_staged_state_dict=True),
}


def stage(s, sd):
    result = s.stage(sd)
    return result.result(timeout=60) if isinstance(result, Future) else result


@pytest.mark.parametrize("make", STAGERS.values(), ids=STAGERS.keys())
def test_staged_dict_equals_input(make):
    sd = nested_state_dict()
    s = make()
    try:
        staged = stage(s, sd)
    finally:
        s.close()
    assert_same_tree(staged, sd)
    model = staged["model"]
    assert same_storage(model["weight"], model["weight_t"])
    assert same_storage(model["weight"], model["row"])
    assert not same_storage(model["weight"], model["bias"])
    assert not same_storage(model["weight"], sd["model"]["weight"])
    assert isinstance(staged["extra"][2], Point)


@pytest.mark.parametrize("make", STAGERS.values(), ids=STAGERS.keys())
def test_every_dtype_round_trips_bit_exact(make):
    sd = all_dtype_tensors()
    s = make()
    staged = stage(s, sd)
    s.close()
    for key, tensor in sd.items():
        assert staged[key].dtype == tensor.dtype, key
        assert torch.equal(staged[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_conjugate_views_keep_their_bit():
    z = torch.randn(4, dtype=torch.complex64)
    sd = {"z": z, "zc": z.conj()}
    staged = stager.DefaultStager(sync_options()).stage(sd)
    assert staged["zc"].is_conj()
    assert torch.equal(staged["zc"].resolve_conj(), z.conj().resolve_conj())
    assert same_storage(staged["z"], staged["zc"])


def test_negative_views_of_real_tensors_keep_their_bit(tmp_path):
    # Regression: the negative bit was only read for complex dtypes, so a `_neg_view` of a real
    # tensor was staged (and saved) with its values un-negated.
    base = torch.randn(6)
    sd = {"base": base, "neg": torch._neg_view(base), "neg_slice": torch._neg_view(base)[2:5]}
    staged = stager.DefaultStager(sync_options()).stage(sd)
    for key, tensor in sd.items():
        assert staged[key].is_neg() == tensor.is_neg(), key
        assert torch.equal(staged[key].resolve_neg(), tensor.resolve_neg()), key
    assert same_storage(staged["base"], staged["neg"])
    stager.save(sd, tmp_path / "neg.safetensors")
    loaded = stager.load(tmp_path / "neg.safetensors")
    for key, tensor in sd.items():
        assert torch.equal(loaded[key].resolve_neg(), tensor.resolve_neg()), key


def test_source_changes_after_staging_never_reach_the_copy():
    sd = {"w": torch.randn(1000), "v": [1, 2, {"k": [3]}]}
    expected = copy.deepcopy(sd)
    s = stager.DefaultStager()
    staged = s.stage(sd).result()
    sd["w"].add_(1.0)
    sd["v"][2]["k"].append(4)
    assert torch.equal(staged["w"], expected["w"])
    assert staged["v"] == expected["v"]
    s.close()


def test_parameters_and_grad_tensors_stage_as_detached_cpu_tensors():
    model = torch.nn.Linear(4, 3)
    sd = model.state_dict(keep_vars=True)
    staged = stager.DefaultStager(sync_options()).stage(sd)
    for key in sd:
        assert type(staged[key]) is torch.Tensor
        assert not staged[key].requires_grad
        assert torch.equal(staged[key], sd[key].detach())


def test_two_results_are_independent_and_never_overwritten():
    s = stager.DefaultStager(sync_options())
    sd = {"w": torch.zeros(1 << 16)}
    first = s.stage(sd)
    sd["w"].fill_(1.0)
    second = s.stage(sd)
    assert first["w"].sum() == 0 and second["w"].sum() == 1 << 16
    second["w"].fill_(5.0)
    assert first["w"].sum() == 0


def test_overlapping_async_stages_keep_every_result():
    s = stager.DefaultStager(stager.StagingOptions(num_threads=2))
    sd = {"w": torch.zeros(1 << 20)}
    futures = []
    for value in range(6):
        sd["w"].fill_(float(value))
        futures.append(s.stage(copy.deepcopy(sd)))
    results = [f.result() for f in futures]
    for value, result in enumerate(results):
        assert torch.all(result["w"] == value)
    s.close()


def test_dropped_results_are_recycled_without_new_allocations():
    s = stager.DefaultStager(sync_options())
    sd = {f"p{i}": torch.randn(1024) for i in range(64)}
    staged = s.stage(sd)
    del staged
    for _ in range(5):
        staged = s.stage(sd)
        assert_same_tree(staged, sd)
        del staged
    stats = s.pool_stats()
    assert stats["allocations"] == 1
    assert stats["reuses"] == 5


def test_held_results_force_a_second_buffer():
    s = stager.DefaultStager(sync_options())
    sd = {"w": torch.randn(4096)}
    a = s.stage(sd)
    b = s.stage(sd)
    assert a["w"].data_ptr() != b["w"].data_ptr()
    assert s.pool_stats()["allocations"] == 2


def test_memory_budget_raises_before_copying():
    s = stager.DefaultStager(sync_options(memory_budget_bytes=1 << 20))
    small = s.stage({"w": torch.randn(1000)})
    with pytest.raises(stager.StagerError, match="budget"):
        s.stage({"w": torch.randn(1 << 20)})  # 4 MiB > 1 MiB budget
    assert isinstance(stager.StagerError("x"), RuntimeError)
    assert torch.isfinite(small["w"]).all()


def test_memory_budget_counts_results_still_held():
    s = stager.DefaultStager(sync_options(memory_budget_bytes=3 << 20))
    sd = {"w": torch.randn(1 << 19)}  # 2 MiB
    held = s.stage(sd)
    with pytest.raises(stager.StagerError, match="budget"):
        s.stage(sd)
    del held
    assert_same_tree(s.stage(sd), sd)  # the freed buffer is reused


def test_shared_memory_does_not_take_a_descriptor_per_tensor():
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    sd = {f"t{i}": torch.full((4,), float(i)) for i in range(20_000)}
    before = open_fds()
    s = stager.DefaultStager(stager.StagingOptions(use_shared_memory=True, use_async_staging=False))
    staged = s.stage(sd)
    assert open_fds() - before <= 4
    assert torch.equal(staged["t19999"], sd["t19999"])
    assert_same_tree(staged, sd)


def test_async_stage_returns_a_future_and_close_waits_for_it():
    s = stager.DefaultStager()
    sd = {"w": torch.randn(1 << 22)}
    future = s.stage(sd)
    assert isinstance(future, Future)
    s.close()
    assert future.done()
    assert torch.equal(future.result()["w"], sd["w"])
    with pytest.raises(stager.StagerError, match="close"):
        s.stage(sd)


def test_results_stay_valid_after_close_and_stager_deletion():
    s = stager.DefaultStager(sync_options())
    sd = {"w": torch.randn(10_000)}
    staged = s.stage(sd)
    s.close()
    del s
    import gc

    gc.collect()
    assert torch.equal(staged["w"], sd["w"])


def test_context_manager_and_synchronize_staging():
    sd = {"w": torch.randn(100)}
    with stager.DefaultStager() as s:
        future = s.stage(sd)
        s.synchronize_staging()
        assert future.done()


def test_protocol_and_synchronization_flags_match_pytorch():
    for instance in (stager.DefaultStager(), stager.BlockingAsyncStager()):
        assert isinstance(instance, torch_staging.AsyncStager)
        assert torch_staging.AsyncStager in type(instance).__mro__
    assert stager.DefaultStager().should_synchronize_after_execute is True
    assert stager.BlockingAsyncStager().should_synchronize_after_execute is False
    ours = [f.name for f in dataclasses.fields(stager.StagingOptions)]
    theirs = [f.name for f in dataclasses.fields(torch_staging.StagingOptions)]
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs):] == ["num_threads", "memory_budget_bytes", "skip_unchanged"]  # the contract's order
    defaults = stager.StagingOptions()
    for name in theirs:
        assert getattr(defaults, name) == getattr(torch_staging.StagingOptions(), name)


def test_default_options_work_without_cuda():
    # PyTorch's DefaultStager() asserts on a CPU-only machine; ours stages.
    sd = {"w": torch.randn(10)}
    with stager.DefaultStager() as s:
        assert torch.equal(s.stage(sd).result()["w"], sd["w"])


def test_accepts_pytorchs_own_options_object():
    s = stager.DefaultStager(torch_staging.StagingOptions(False, False, False, False))
    assert isinstance(s.stage({"w": torch.ones(2)}), dict)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_threads": 0}, {"num_threads": "2"}, {"memory_budget_bytes": -1}, {"use_async_staging": "yes"}],
)
def test_bad_options_raise_stager_error(kwargs):
    with pytest.raises(stager.StagerError):
        stager.StagingOptions(**kwargs)


def test_meta_tensors_raise_a_clear_error():
    with pytest.raises(stager.StagerError, match="meta"):
        stager.DefaultStager(sync_options()).stage({"w": torch.empty(3, device="meta")})


def test_reserve_prefaults_so_the_first_stage_reuses_it():
    s = stager.DefaultStager(sync_options())
    sd = {"w": torch.randn(1 << 20)}
    s.reserve(8 << 20)
    staged = s.stage(sd)
    assert torch.equal(staged["w"], sd["w"])
    stats = s.pool_stats()
    assert (stats["allocations"], stats["reuses"]) == (1, 1)


def test_aliasing_of_containers_and_tensors_is_kept():
    shared_list = [1, 2]
    t = torch.randn(3)
    sd = {"a": shared_list, "b": shared_list, "t1": t, "t2": t}
    staged = stager.DefaultStager(sync_options()).stage(sd)
    assert staged["a"] is staged["b"] and staged["a"] is not shared_list
    assert staged["t1"] is staged["t2"]


def test_big_state_dict_with_many_storages_and_threads():
    sd = {f"layer{i}": torch.randn(257, 1031) for i in range(16)}
    sd["views"] = [sd["layer3"][5:9, ::2], sd["layer3"].t()]
    staged = stager.DefaultStager(sync_options(num_threads=2)).stage(sd)
    assert_same_tree(staged, sd)
    assert same_storage(staged["views"][0], staged["layer3"])


def test_sparse_and_quantized_tensors_are_staged_through_torch():
    sparse = torch.sparse_coo_tensor([[0, 2], [1, 0]], [3.0, 4.0], (3, 3))
    quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    sd = {"sparse": sparse, "q": quantized, "dense": torch.ones(2)}
    staged = stager.DefaultStager(sync_options()).stage(sd)
    assert staged["sparse"].is_sparse and torch.equal(staged["sparse"].to_dense(), sparse.to_dense())
    assert staged["q"].is_quantized and torch.equal(staged["q"].int_repr(), quantized.int_repr())
    assert torch.equal(staged["dense"], sd["dense"])


def test_non_tensor_objects_are_deep_copied():
    class Config:
        def __init__(self):
            self.values = [1, 2]

    config = Config()
    sd = {"config": config, "tensor": torch.ones(1)}
    staged = stager.DefaultStager(sync_options()).stage(sd)
    assert staged["config"] is not config and staged["config"].values == [1, 2]
    config.values.append(3)
    assert staged["config"].values == [1, 2]


def test_a_bare_tensor_or_list_stages_too():
    s = stager.DefaultStager(sync_options())
    t = torch.randn(5)
    assert torch.equal(s.stage(t), t)
    staged = s.stage([t, (t, 1)])
    assert staged[0] is staged[1][0] and torch.equal(staged[0], t)


def test_async_results_dropped_by_the_caller_are_recycled():
    s = stager.DefaultStager(stager.StagingOptions(num_threads=2))
    sd = {"w": torch.randn(1 << 16)}
    for _ in range(4):
        future = s.stage(sd)
        assert torch.equal(future.result()["w"], sd["w"])
        del future
    s.synchronize_staging()
    assert s.pool_stats()["allocations"] == 1
    s.close()


def test_new_blocking_stagers_reuse_memory_dropped_by_earlier_ones():
    # The pool is process-wide, so earlier tests may have left free buffers in it: count reuses
    # instead of expecting one address.
    from stager import engine

    pool = engine.process_pool(pinned=False)
    sd = {"w": torch.randn(1 << 18)}
    first = stager.BlockingAsyncStager().stage(sd)
    del first
    before = pool.stats()
    second = stager.BlockingAsyncStager().stage(sd)  # a new stager, as PyTorch users often make
    after = pool.stats()
    assert after["allocations"] == before["allocations"] and after["reuses"] == before["reuses"] + 1
    held = stager.BlockingAsyncStager().stage(sd)  # the first result is still held: fresh memory
    assert held["w"].data_ptr() != second["w"].data_ptr()
    assert torch.equal(second["w"], sd["w"]) and torch.equal(held["w"], sd["w"])
