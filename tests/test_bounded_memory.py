"""memory_budget_bytes on a state_dict larger than the budget (DESIGN.md, "Bounded host memory").

Each save runs in its own process (tests/bounded_worker.py) that measures its RSS high-water mark
(VmHWM, reset through /proc/self/clear_refs) around ``dcp.async_save`` with stager's stager and
writer: the growth must stay near the budget, not the state, and the checkpoint must hold the
values at save time (the worker changes every tensor right after staging_completion).
"""

import gc
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import stager
from stager import filesystem

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "bounded_worker.py")
sys.path.insert(0, HERE)
import bounded_worker  # noqa: E402  (the worker's state_dicts, to check what was loaded)
import ranks  # noqa: E402

MiB = 1 << 20
#: What a save costs beyond the budget whatever the state's size: the writer's threads, dcp's
#: planning and metadata, the file's header and framing (about 3 MiB measured).
SLACK = 6 * MiB

pytestmark = pytest.mark.filterwarnings("ignore")


def run_worker(mode, directory, budget, layout, seed, timeout=120):
    proc = subprocess.run([sys.executable, WORKER, mode, str(directory), str(budget), layout, str(seed)],
                          capture_output=True, text=True, timeout=timeout)
    results = list(ranks.results_in(proc.stdout))
    assert results, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.returncode, results[-1]


def load(directory, layout):
    template = bounded_worker.state(layout, 0)
    target = {"model": {k: torch.zeros_like(v) for k, v in template["model"].items()}, "step": -1, "note": ""}
    dcp.load(target, storage_reader=stager.FileSystemReader(directory), no_dist=True)
    return target


def assert_holds(directory, layout, seed):
    loaded = load(directory, layout)
    expected = bounded_worker.state(layout, seed)
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value), key  # bitwise (dtype included)
    assert loaded["step"] == seed and loaded["note"] == expected["note"]


def state_nbytes(layout):
    return bounded_worker.nbytes(bounded_worker.state(layout, 0))


@pytest.mark.parametrize("fraction", [2, 6, 20])
def test_state_larger_than_the_budget_streams_within_it(tmp_path, fraction):
    budget = state_nbytes("many") // fraction
    rc, result = run_worker("save", tmp_path, budget, "many", fraction)
    assert rc == 0 and "error" not in result, result
    assert result["peak_bytes"] <= budget, result
    assert result["growth"] <= budget + SLACK, result
    assert_holds(tmp_path, "many", fraction)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_budget_smaller_than_the_largest_tensor(tmp_path):
    # One 16 MiB tensor under a 1 MiB budget: its copy is split into chunks of the pool buffer.
    budget = 1 * MiB
    rc, result = run_worker("save", tmp_path, budget, "big", 7)
    assert rc == 0 and "error" not in result, result
    assert result["peak_bytes"] <= budget and result["growth"] <= budget + SLACK, result
    assert_holds(tmp_path, "big", 7)


def test_stager_save_with_a_stager_streams_within_its_budget(tmp_path):
    budget = state_nbytes("many") // 6
    rc, result = run_worker("file", tmp_path, budget, "many", 5)
    assert rc == 0 and "error" not in result, result
    assert result["peak_bytes"] <= budget and result["growth"] <= budget + SLACK, result
    loaded = stager.load(tmp_path / "state.stager")
    expected = bounded_worker.state("many", 5)
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    assert loaded["step"] == 5 and loaded["note"] == expected["note"]


def test_a_stage_handed_out_whole_still_refuses_before_copying():
    sd = bounded_worker.state("big", 1)
    budget = 2 * MiB
    for asynchronous in (True, False):
        options = stager.StagingOptions(use_shared_memory=False, use_async_staging=asynchronous,
                                        memory_budget_bytes=budget)
        with stager.DefaultStager(options) as s:
            with pytest.raises(stager.StagerError, match=rf"needs \d+ bytes but the budget is {budget}"):
                result = s.stage(sd)
                if asynchronous:
                    result.result(timeout=60)
            assert s.pool_stats()["allocated_bytes"] == 0  # nothing was mapped, nothing copied


def test_async_save_to_a_writer_that_does_not_drain_refuses(tmp_path):
    # PyTorch's writer gets the whole staged dict: the stage cannot fit and says so.
    sd = bounded_worker.state("big", 1)
    with stager.DefaultStager(stager.StagingOptions(use_shared_memory=False, memory_budget_bytes=2 * MiB)) as s:
        response = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(str(tmp_path)), async_stager=s,
                                  async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=True)
        # (dcp reports a stage that failed before async_save returned as a staging_completion
        # that succeeded; the upload carries the error.)
        with pytest.raises(Exception, match=r"needs \d+ bytes but the budget is"):
            response.upload_completion.result(timeout=60)
    assert not os.path.exists(tmp_path / ".metadata")


def test_sigkill_mid_wave_leaves_the_previous_checkpoint(tmp_path):
    budget = 1 * MiB
    rc, result = run_worker("save", tmp_path, budget, "many", 1)
    assert rc == 0 and "error" not in result, result
    killed_mid_write = False
    for attempt in range(3):  # the write takes tens of ms: kill it once its temp file exists
        proc = subprocess.Popen([sys.executable, WORKER, "hold", str(tmp_path), str(budget), "many", str(2 + attempt)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout.readline().strip() == "SAVING"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
                    proc.send_signal(signal.SIGKILL)
                    killed_mid_write = True
                    break
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if killed_mid_write:
            break
        rc, result = run_worker("save", tmp_path, budget, "many", 1)  # it finished first: start over
    assert killed_mid_write
    assert_holds(tmp_path, "many", 1)
    # The next save commits and sweeps the killed one's temp file.
    rc, result = run_worker("save", tmp_path, budget, "many", 9)
    assert rc == 0 and "error" not in result, result
    filesystem.wait_for_cleanup(tmp_path)
    assert_holds(tmp_path, "many", 9)


@pytest.fixture
def small_tmpfs():
    """A 24 MiB tmpfs (needs root), unmounted and removed whatever happens."""
    directory = tempfile.mkdtemp(prefix="stager-enospc-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", directory],
                             capture_output=True, text=True)
    try:
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        yield directory
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", directory], check=False)
        os.rmdir(directory)


def test_enospc_mid_stream_fails_the_save_and_keeps_the_previous_checkpoint(small_tmpfs):
    # The first save (16.3 MiB) fits the 24 MiB filesystem; the second cannot while the first is
    # still committed: it fails with the writer's error, staging_completion too (no hang), and
    # the first checkpoint stays loadable with no temp file left behind.
    budget = 1 * MiB
    rc, result = run_worker("save", small_tmpfs, budget, "big", 1)
    assert rc == 0 and "error" not in result, result
    rc, result = run_worker("save", small_tmpfs, budget, "big", 2)
    assert rc == 1 and "No space left" in result.get("error", ""), result
    assert_holds(small_tmpfs, "big", 1)
    assert not [name for name in os.listdir(small_tmpfs) if name.endswith(".tmp")]


def test_fsdp2_two_ranks_streamed_and_loaded_bitwise(tmp_path):
    # FSDP2 model + Adam state (DTensors) on 2 gloo ranks, each rank's share far above a 16 KiB
    # budget: streamed, then loaded (resharded by dcp) and compared bitwise with the saved values.
    from test_filesystem import run_ranks

    results = run_ranks(2, tmp_path, [["save", {"ckpt": "ckpt", "checkpointer": "THREAD", "budget": 16 << 10}],
                                      ["load", {"ckpt": "ckpt"}]])
    for rank, (_, found, _) in results.items():
        save = found["save"]
        assert save["peak_bytes"] <= 16 << 10 < save["state_nbytes"], (rank, save)


def test_back_to_back_streamed_saves_share_the_budget(tmp_path):
    # The second async_save starts while the first is still writing: its stream waits for the
    # first's pool buffer instead of finding the budget taken (or exceeding it).
    budget = state_nbytes("many") // 6
    options = stager.StagingOptions(use_shared_memory=False, memory_budget_bytes=budget)
    with stager.DefaultStager(options) as async_stager:
        states = {seed: bounded_worker.state("many", seed) for seed in (11, 12, 13)}
        responses = []
        for seed, sd in states.items():
            responses.append(dcp.async_save(sd, storage_writer=stager.FileSystemWriter(tmp_path / str(seed)),
                                            async_stager=async_stager, no_dist=True,
                                            async_checkpointer_type=AsyncCheckpointerType.THREAD))
        for response in responses:
            response.upload_completion.result(timeout=120)
        assert async_stager.pool_stats()["allocated_bytes"] <= budget
    for seed in (11, 12, 13):
        assert_holds(tmp_path / str(seed), "many", seed)


def test_pool_stats_peak_is_the_host_memory_of_the_last_checkpoint():
    options = stager.StagingOptions(use_shared_memory=False, use_async_staging=False)
    with stager.DefaultStager(options) as s:
        staged = s.stage({"big": torch.randn(4 * MiB)})  # 16 MiB
        assert s.pool_stats()["peak_bytes"] >= 16 * MiB
        del staged
        gc.collect()
        s._engine.pool.trim()  # the free buffer is unmapped: the pool holds nothing now
        staged = s.stage({"small": torch.randn(1000)})
        stats = s.pool_stats()
        assert stats["peak_bytes"] == stats["allocated_bytes"] < 1 * MiB, stats
        assert staged["small"].numel() == 1000
