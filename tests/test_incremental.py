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
    w = torch.zeros(100, 10)
    s = stager.DefaultStager(stager.StagingOptions(use_async_staging=False, skip_unchanged=True))
    s.stage({"w": w})
    if "HOW" == "data_of_view":
        w[3].data.fill_(5.0)  # .data has a version counter of its own: w._version stays
    else:
        w.detach().numpy()[3, :] = 5.0  # NumPy writes bypass version counters
    assert w._version == 0
    try:
        out = s.stage({"w": w})
    except stager.StagerError as err:
        assert "changed without a version-counter bump" in str(err), str(err)
        print("CAUGHT")
    else:
        print("MISSED" if not torch.equal(out["w"], w) else "COPIED")
    """
)


@pytest.mark.parametrize("how", ["data_of_view", "numpy"])
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
