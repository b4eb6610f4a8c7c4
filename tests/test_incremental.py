"""Incremental staging (``skip_unchanged=True``): a storage that is the same object at the same
address with the same size and version counters as at the previous stage is not copied again; its
staged tensors share the previous result's bytes. Everything else is copied."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stager
from helpers import assert_same_tree

torch.manual_seed(0)


def make_stager(kind="default", **options):
    if kind == "blocking":
        return stager.BlockingAsyncStager(skip_unchanged=True)
    opts = stager.StagingOptions(use_async_staging=(kind == "async"), use_shared_memory=False, num_threads=2,
                                 skip_unchanged=True, **options)
    return stager.DefaultStager(opts)


def stage(s, sd):
    out = s.stage(sd)
    return out.result(timeout=60) if hasattr(out, "result") else out


def counters(s):
    tracker = s._engine.unchanged
    return tracker.copied_nbytes, tracker.reused_nbytes


def same_bytes(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["default", "async", "blocking"])
def test_optimizer_step_copies_only_what_it_changed(kind):
    frozen = torch.nn.Linear(256, 256)
    adapter = torch.nn.Linear(256, 8)
    for p in frozen.parameters():
        p.requires_grad_(False)
    optim = torch.optim.Adam(adapter.parameters())
    s = make_stager(kind)

    def state():
        return {"frozen": frozen.state_dict(), "adapter": adapter.state_dict(), "optim": optim.state_dict()}

    first = stage(s, state())
    assert counters(s)[1] == 0
    adapter(torch.randn(4, 256)).sum().backward()
    optim.step()
    second = stage(s, state())
    copied, reused = counters(s)
    frozen_bytes = sum(t.numel() * 4 for t in frozen.state_dict().values())
    assert reused == frozen_bytes, (copied, reused)
    assert same_bytes(second["frozen"]["weight"], first["frozen"]["weight"])
    assert not same_bytes(second["adapter"]["weight"], first["adapter"]["weight"])
    assert_same_tree(second, state())
    # The earlier result still holds the values from before the step.
    assert not torch.equal(first["adapter"]["weight"], adapter.weight.detach())
    s.close()


def test_nothing_changed_allocates_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    s = make_stager()
    stage(s, model.state_dict())
    before = s.pool_stats()
    results = [stage(s, model.state_dict()) for _ in range(5)]
    after = s.pool_stats()
    assert after["allocations"] == before["allocations"] and after["allocated_bytes"] == before["allocated_bytes"]
    assert counters(s)[0] == 0
    for result in results:
        assert_same_tree(result, model.state_dict())


def test_dropping_the_previous_result_keeps_reused_bytes_alive():
    w = torch.randn(1000, 100)
    s = make_stager()
    out = stage(s, {"w": w})
    expected = out["w"].clone()
    del out
    again = stage(s, {"w": w})
    assert counters(s) == (0, w.numel() * 4)
    assert torch.equal(again["w"], expected)


@pytest.mark.parametrize("change", ["in_place", "data_assignment", "set_", "new_tensor", "resize"])
def test_every_kind_of_change_is_copied(change):
    w = torch.randn(64, 64)
    sd = {"w": w}
    s = make_stager()
    first = stage(s, sd)
    if change == "in_place":
        w.add_(1.0)
    elif change == "data_assignment":
        w.data = torch.randn(64, 64)
    elif change == "set_":
        w.set_(torch.randn(64, 64).untyped_storage(), 0, (64, 64), (64, 1))
    elif change == "new_tensor":
        sd["w"] = torch.randn(64, 64)
    elif change == "resize":
        w.resize_(128, 64).normal_()
    second = stage(s, sd)
    assert counters(s)[1] == 0, change
    assert torch.equal(second["w"], sd["w"]), change
    assert not same_bytes(second["w"], first["w"]), change


def test_writing_a_view_copies_the_storage_it_views():
    base = torch.zeros(100)
    view = base[10:20]
    other = torch.zeros(100)
    sd = {"base": base, "view": view, "other": other}
    s = make_stager()
    stage(s, sd)
    view.fill_(3.0)  # bumps the version counter base and view share
    out = stage(s, sd)
    assert counters(s) == (400, 400)  # `base`'s storage copied, `other` reused
    assert same_bytes(out["view"], out["base"]) and out["view"].storage_offset() == 10
    assert torch.equal(out["base"][10:20], torch.full((10,), 3.0))


def test_inference_tensors_are_always_copied():
    with torch.inference_mode():
        t = torch.randn(1000)
    s = make_stager()
    stage(s, {"t": t})
    out = stage(s, {"t": t})
    assert counters(s) == (4000, 0)
    assert torch.equal(out["t"], t)


def test_two_stagers_on_one_model_do_not_interfere():
    model = torch.nn.Linear(128, 128)
    a, b = make_stager(), make_stager()
    stage(a, model.state_dict())
    with torch.no_grad():
        model.weight.mul_(2.0)
    out_b = stage(b, model.state_dict())  # b has never staged: copies everything
    assert counters(b)[1] == 0
    out_a = stage(a, model.state_dict())  # a saw the old weight: copies it again
    assert counters(a)[1] == 128 * 4  # only the bias is reused
    for out in (out_a, out_b):
        assert torch.equal(out["weight"], model.weight.detach())


def test_incremental_result_saves_a_complete_file(tmp_path):
    model = torch.nn.Linear(64, 64)
    s = make_stager()
    stage(s, model.state_dict())
    with torch.no_grad():
        model.bias.add_(1.0)
    out = stage(s, model.state_dict())
    assert counters(s)[1] > 0
    stager.save(out, tmp_path / "inc.stager")
    assert_same_tree(stager.load(tmp_path / "inc.stager"), model.state_dict())


MISS_SCRIPT = textwrap.dedent(
    """
    import os, torch, stager
    w = torch.nn.Parameter(torch.zeros(100, 10), requires_grad=False)
    with torch.no_grad():
        w.add_(0.0)  # version 1
    s = stager.DefaultStager(stager.StagingOptions(use_async_staging=False, skip_unchanged=True))
    s.stage({"w": w})
    if "HOW" == "data_of_view":
        w[3].data.fill_(5.0)  # .data has a version counter of its own: w._version stays
    elif "HOW" == "numpy":
        w.detach().numpy()[3, :] = 5.0  # NumPy writes bypass version counters
    elif "HOW" == "storage_copy":
        w.untyped_storage().copy_(torch.full((100, 10), 5.0).untyped_storage())
    elif "HOW" == "rewrapped_after_the_old_died":
        # nn.Parameter(p.data) after the old object is gone: a fresh counter that one update
        # brings to the old value; a counter's identity is not visible to Python.
        data = w.data
        del w
        w = torch.nn.Parameter(data, requires_grad=False)
        with torch.no_grad():
            w[3] = 5.0
    assert w._version == 1
    try:
        out = s.stage({"w": w})
    except stager.StagerError as err:
        assert "changed without a version-counter bump" in str(err), str(err)
        print("CAUGHT")
    else:
        print("MISSED" if not torch.equal(out["w"], w) else "COPIED")
    """
)


@pytest.mark.parametrize("how", ["data_of_view", "numpy", "storage_copy", "rewrapped_after_the_old_died"])
@pytest.mark.parametrize("check", [True, False])
def test_debug_check_catches_writes_the_version_counter_misses(how, check):
    env = dict(os.environ)
    env.pop("STAGER_CHECK_UNCHANGED", None)
    if check:
        env["STAGER_CHECK_UNCHANGED"] = "1"
    result = subprocess.run([sys.executable, "-c", MISS_SCRIPT.replace("HOW", how)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the check the stale bytes are (by design) handed out; with it, they never are.
    assert result.stdout.strip() == ("CAUGHT" if check else "MISSED"), result.stdout + result.stderr


@pytest.mark.parametrize("updates", [1, 3])
def test_a_rewrapped_parameter_with_as_many_updates_is_copied(updates):
    # nn.Parameter(p.data) views the same storage with a fresh version counter: after as many
    # updates as the old parameter had, the counter reads the same. The tensor object differs.
    p = torch.nn.Parameter(torch.zeros(256, 16))
    with torch.no_grad():
        for _ in range(updates):
            p.add_(1.0)
    s = make_stager()
    first = stage(s, {"w": p})
    q = torch.nn.Parameter(p.data)
    with torch.no_grad():
        for _ in range(updates):
            q.add_(1.0)
    assert q._version == p._version and q.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
    second = stage(s, {"w": q})
    assert counters(s)[1] == 0
    assert torch.equal(second["w"], q.detach())
    assert torch.equal(first["w"], torch.full((256, 16), float(updates)))
    s.close()


@pytest.mark.parametrize("kind", ["default", "blocking"])
def test_concurrent_stages_on_one_sync_stager_are_complete_when_returned(kind):
    # Two threads stage 2 ms apart: the later one must not hand out (as reused) bytes the earlier
    # one is still copying.
    import threading
    import time

    tensors = {f"t{i}": torch.zeros(1 << 18) for i in range(64)}  # 64 MiB
    s = make_stager(kind)
    stage(s, tensors)
    wrong = []
    for round_ in range(1, 9):
        with torch.no_grad():
            for t in tensors.values():
                t.fill_(float(round_))
        start = threading.Barrier(2)

        def run(delay, round_=round_, start=start):
            start.wait()
            time.sleep(delay)
            out = s.stage(tensors)
            # Checked at once: the result must be complete when stage() returns.
            bad = [k for k, v in out.items() if not bool((v == round_).all())]
            if bad:
                wrong.append((round_, delay, len(bad)))

        threads = [threading.Thread(target=run, args=(delay,)) for delay in (0.0, 0.002)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
    s.close()
    assert not wrong, wrong


def _replace_key(sd):
    sd["a"] = torch.randn(32, 32)


def _add_key(sd):
    sd["new"] = torch.randn(8)


def _remove_key(sd):
    del sd["b"]


def _same_shape_tensor(sd):
    sd["a"] = torch.randn(32, 32)


def _data_assignment(sd):
    sd["a"].data = torch.randn(32, 32)


def _set(sd):
    sd["a"].set_(torch.randn(32, 32).untyped_storage(), 0, (32, 32), (32, 1))


def _resize(sd):
    sd["a"].resize_(16, 16).fill_(7.0)


def _view_base_changed(sd):
    sd["base"].set_(torch.randn(64).untyped_storage(), 0, (64,), (1,))
    sd["view"] = sd["base"][8:16]


def _container_mutated_in_place(sd):
    sd["nested"]["list"][0] = torch.randn(4)
    sd["nested"]["list"].append(torch.randn(2))


def _swapped_keys(sd):
    sd["a"], sd["b"] = sd["b"], sd["a"]


@pytest.mark.parametrize("change", [_replace_key, _add_key, _remove_key, _same_shape_tensor, _data_assignment, _set,
                                    _resize, _view_base_changed, _container_mutated_in_place, _swapped_keys],
                         ids=lambda f: f.__name__.strip("_"))
def test_every_structural_change_stages_the_new_truth(change):
    # The second stage's result must equal the state_dict as it is now, whatever changed between.
    base = torch.randn(64)
    sd = {"a": torch.randn(32, 32), "b": torch.randn(32, 32), "base": base, "view": base[8:16],
          "nested": {"list": [torch.randn(4), torch.randn(4)], "step": 3}}
    s = make_stager()
    stage(s, sd)
    stage(s, sd)  # everything reused once
    change(sd)
    out = stage(s, sd)
    assert_same_tree(out, sd)
    assert same_bytes(out["view"], out["base"]) and out["view"].storage_offset() == 8
    s.close()


def test_alternating_structures_keep_records_bounded_and_results_right():
    s = make_stager()
    structures = [{f"k{j}": torch.randn(16) for j in range(n)} for n in (3, 50)]
    records = s._engine.unchanged._records
    for i in range(100):
        sd = structures[i % 2]
        with torch.no_grad():
            sd["k0"].add_(1.0)
        out = stage(s, sd)
        assert_same_tree(out, sd)
        assert len(records) == len(sd)  # only the previous stage is remembered
        if i:  # the records describe the other structure: nothing of this one is reused
            assert counters(s)[1] == 0
    out = stage(s, sd)  # the same structure again: all but nothing changed is reused
    assert counters(s)[1] == len(sd) * 64
    assert_same_tree(out, sd)
    s.close()
