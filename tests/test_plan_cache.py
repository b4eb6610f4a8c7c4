"""The plan cache (``stager.plan.PlanCache``): a stager reuses its previous tensor descriptions
while the same tensor objects keep the same dtype, shape, stride, data pointer and storage size.
Every way the cached description could go stale must stage the new truth, bitwise."""

import gc
import weakref
from collections import OrderedDict

import pytest
import torch

import stager
from helpers import assert_same_tree

torch.manual_seed(0)


def make_stager(skip_unchanged):
    opts = stager.StagingOptions(use_async_staging=False, use_shared_memory=False, num_threads=2,
                                 skip_unchanged=skip_unchanged)
    return stager.DefaultStager(opts)


def cache_of(s):
    return s._engine.plan_cache


def bitwise_equal(out, sd):
    assert_same_tree(out, sd)
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
            assert out[key].stride() == value.stride(), key
            assert torch.equal(out[key].contiguous().view(torch.uint8), value.contiguous().view(torch.uint8)), key


def make_state():
    base = torch.randn(64)
    return {"a": torch.randn(32, 32), "b": torch.randn(32, 32), "base": base, "view": base[8:16],
            "square": torch.randn(16, 16), "step": 3}


def _in_place(sd):
    with torch.no_grad():
        sd["a"].add_(1.0)


def _resize(sd):
    sd["a"].resize_(16, 16).fill_(7.0)


def _storage_grown(sd):
    sd["b"].untyped_storage().resize_(sd["b"].untyped_storage().nbytes() * 2)


def _set(sd):
    sd["a"].set_(torch.randn(32, 32).untyped_storage(), 0, (32, 32), (32, 1))


def _data_assignment(sd):
    sd["a"].data = torch.randn(32, 32)


def _data_transposed(sd):
    # Same tensor object, same data pointer, same shape: only the stride tells.
    sd["square"].data = sd["square"].data.t()


def _dtype_changed(sd):
    sd["a"].data = sd["a"].data.to(torch.float64)


def _new_tensor_same_key(sd):
    sd["a"] = torch.randn(32, 32)


def _key_added(sd):
    sd["new"] = torch.randn(8)


def _key_removed(sd):
    del sd["b"]


def _keys_swapped(sd):
    sd["a"], sd["b"] = sd["b"], sd["a"]


def _view_base_changed(sd):
    sd["base"].set_(torch.randn(64).untyped_storage(), 0, (64,), (1,))
    sd["view"] = sd["base"][8:16]


def _freed_and_reallocated(sd):
    # The old tensor dies; a new one of the same size likely lands at the same address.
    del sd["a"]
    gc.collect()
    sd["a"] = torch.randn(32, 32)


CHANGES = [_in_place, _resize, _storage_grown, _set, _data_assignment, _data_transposed, _dtype_changed,
           _new_tensor_same_key, _key_added, _key_removed, _keys_swapped, _view_base_changed,
           _freed_and_reallocated]
#: Changes that leave every description as it was: the cache must be used.
STILL_VALID = {_in_place}


@pytest.mark.parametrize("skip_unchanged", [False, True], ids=["full", "skip_unchanged"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_every_stale_plan_stages_the_new_truth(change, skip_unchanged):
    sd = make_state()
    s = make_stager(skip_unchanged)
    cache = cache_of(s)
    bitwise_equal(s.stage(sd), sd)
    bitwise_equal(s.stage(sd), sd)
    assert (cache.hits, cache.misses) == (1, 1)  # the repeat stage took the cached plan
    change(sd)
    out = s.stage(sd)
    bitwise_equal(out, sd)
    assert out["view"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()
    if change in STILL_VALID:
        assert (cache.hits, cache.misses) == (2, 1)
    else:
        assert (cache.hits, cache.misses) == (1, 2), "a stale plan was reused"
    # The fresh description is cached in turn.
    bitwise_equal(s.stage(sd), sd)
    assert cache.hits == (3 if change in STILL_VALID else 2)
    s.close()


@pytest.mark.parametrize("skip_unchanged", [False, True], ids=["full", "skip_unchanged"])
def test_container_type_changed_with_the_same_tensors(skip_unchanged):
    tensors = [torch.randn(4), torch.randn(5)]
    s = make_stager(skip_unchanged)
    out = s.stage({"x": list(tensors)})
    assert type(out["x"]) is list
    out = s.stage(OrderedDict(x=tuple(tensors)))
    # The same tensors in the same order: the plan holds, the tree is the new one.
    assert cache_of(s).hits == 1
    assert type(out) is OrderedDict and type(out["x"]) is tuple
    assert all(torch.equal(a, b) for a, b in zip(out["x"], tensors))
    s.close()


def test_alternating_structures_keep_one_entry_and_stage_right():
    s = make_stager(False)
    structures = [{f"k{j}": torch.randn(16) for j in range(n)} for n in (3, 50)]
    cache = cache_of(s)
    for i in range(100):
        sd = structures[i % 2]
        with torch.no_grad():
            sd["k0"].add_(1.0)
        bitwise_equal(s.stage(sd), sd)
        assert len(cache.table) == len(sd)  # one entry: the last description
    assert cache.hits == 0 and cache.misses == 100
    bitwise_equal(s.stage(sd), sd)
    assert cache.hits == 1
    s.close()


def test_the_cache_keeps_no_source_tensor_alive():
    sd = {"w": torch.randn(1024)}
    s = make_stager(False)
    s.stage(sd)
    s.stage(sd)
    alive = weakref.ref(sd["w"].untyped_storage())
    source = weakref.ref(sd["w"])
    del sd
    gc.collect()
    assert source() is None and alive() is None
    s.close()


def test_a_refused_tensor_after_a_cached_plan_is_still_refused():
    sd = {"w": torch.randn(16)}
    s = make_stager(False)
    s.stage(sd)
    s.stage(sd)
    sd["w"].untyped_storage().resize_(8)  # the view now reaches past its storage
    with pytest.raises(stager.StagerError, match="w"):
        s.stage(sd)
    s.close()


@pytest.mark.parametrize("skip_unchanged", [False, True], ids=["full", "skip_unchanged"])
def test_a_storage_swapped_through_an_empty_one_is_described_again(skip_unchanged):
    # set_() drops the old storage, so a new one of the same size may take its address: same
    # object, dtype, shape, stride and data pointer, another StorageImpl.
    sd = {"w": torch.randn(256), "other": torch.randn(3)}
    s = make_stager(skip_unchanged)
    s.stage(sd)
    s.stage(sd)
    old_key = sd["w"].untyped_storage()._cdata
    sd["w"].set_()
    gc.collect()
    fresh = torch.randn(256)
    sd["w"].set_(fresh.untyped_storage(), 0, (256,), (1,))
    out = s.stage(sd)
    bitwise_equal(out, sd)
    if sd["w"].untyped_storage()._cdata != old_key:
        assert cache_of(s).misses == 2
    s.close()


def _result_data_replaced(out):
    out["w"].data = torch.zeros(64, 64)


def _result_resized(out):
    out["w"].resize_(8)


def _result_transposed(out):
    out["w"].t_()


def _result_dropped(out):
    del out["w"]


@pytest.mark.parametrize("meddle", [None, _result_data_replaced, _result_resized, _result_transposed,
                                    _result_dropped], ids=lambda f: f.__name__.strip("_") if f else "untouched")
def test_unchanged_tensors_alias_the_previous_result_only_while_it_fits(meddle):
    # skip_unchanged with a cached plan: an unchanged tensor of the new result is a fresh alias of
    # the previous result's tensor, unless someone changed that tensor's metadata since.
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64), "shared": torch.randn(8)}
    sd["shared_view"] = sd["shared"][2:6]
    s = make_stager(True)
    s.stage(sd)
    first = s.stage(sd)
    with torch.no_grad():
        sd["b"].add_(1.0)
    if meddle is not None:
        meddle(first)
    out = s.stage(sd)
    bitwise_equal(out, sd)
    assert cache_of(s).hits == 2
    assert s._engine.unchanged.reused_nbytes > 0
    if meddle is None:
        assert out["w"] is not first["w"]
        assert out["w"].data_ptr() == first["w"].data_ptr()  # the bytes staged before
        # An alias (detach) shares the earlier tensor's version counter; a rebuilt one would not.
        before = out["w"]._version
        first["w"].mul_(1.0)
        assert out["w"]._version == before + 1
    assert out["shared_view"].untyped_storage().data_ptr() == out["shared"].untyped_storage().data_ptr()
    assert out["shared_view"].storage_offset() == 2
    s.close()


def test_the_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("STAGER_PLAN_CACHE", "0")
    sd = {"w": torch.randn(16)}
    s = make_stager(True)
    for _ in range(3):
        bitwise_equal(s.stage(sd), sd)
    assert (cache_of(s).hits, cache_of(s).misses) == (0, 3)
    s.close()
