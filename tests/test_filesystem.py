"""stager.FileSystemWriter / FileSystemReader as dcp's storage layer.

Multi-rank cases start one process per rank (tests/dcp_worker.py: real gloo groups on 127.0.0.1,
FSDP2 on a CPU mesh, dcp.async_save / dcp.load) with bounded waits; every worker exits by itself and
the test kills leftovers only when one overran its deadline. Single-process cases call dcp.save /
dcp.load with ``no_dist=True`` in the test process.
"""

import io
import os
import pickle
import signal
import subprocess
import time
import warnings

import pytest
import ranks
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import stager
from stager import filesystem

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dcp_worker.py")

pytestmark = pytest.mark.filterwarnings("ignore")


def start_ranks(world, directory, steps):
    """``{rank: Popen}`` of dcp_worker.py processes (:func:`ranks.start_ranks`)."""
    return ranks.start_ranks(world, directory, steps, worker=WORKER, env=lambda rank: {"MASTER_ADDR": "127.0.0.1"})


def run_ranks(world, directory, steps, deadline=120):
    results = ranks.collect(start_ranks(world, directory, steps), deadline)
    for rank, (rc, _, output) in results.items():
        done = len(list(ranks.results_in(output)))  # a scenario may repeat
        assert rc == 0 and done == len(steps), f"rank {rank} failed (rc={rc}):\n{output[-6000:]}"
    return results


def rank_files(path):
    filesystem.wait_for_cleanup(path)  # this process's removal of the previous save's files
    return sorted(n for n in os.listdir(path) if n.endswith(".distcp"))


def committed_files(path):
    committed = filesystem._committed_save(os.path.join(path, ".metadata"))
    return sorted(committed[1]) if committed else []


# ---- FSDP2 on several ranks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory):
    """A checkpoint of a 2-rank FSDP2 model + Adam state (DTensors) and a plain part, saved with
    stager's stager and writer on the THREAD checkpointer, and loaded back on 2 ranks."""
    directory = tmp_path_factory.mktemp("two")
    run_ranks(2, directory, [["save", {"ckpt": "ckpt", "checkpointer": "THREAD"}], ["load", {"ckpt": "ckpt"}]])
    return directory


def test_fsdp2_two_ranks_thread_checkpointer(saved_on_two):
    path = saved_on_two / "ckpt"
    files = rank_files(path)
    assert [name.split("_")[2] for name in files] == ["0", "1"] or len(files) == 2
    assert committed_files(path) == files
    # dcp's own format: PyTorch's reader (through dcp_to_torch_save) reads the DTensor shards of
    # both ranks' files without stager.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, saved_on_two / "full.pt")
    full = torch.load(saved_on_two / "full.pt", weights_only=True)
    assert any(key.startswith("model") for key in full), list(full)


@pytest.mark.parametrize("world", [1, 4])
def test_fsdp2_resharding_on_load(saved_on_two, world):
    # Saved on 2 ranks; loaded on 1 (each tensor from two files) and on 4 (sub-ranges of shards).
    run_ranks(world, saved_on_two, [["load", {"ckpt": "ckpt"}]])


def test_fsdp2_three_ranks_process_checkpointer_directory_reused(tmp_path):
    # Uneven (padded) shards on 3 ranks, the PROCESS checkpointer, and one directory across steps:
    # each load sees the latest save, and the older rank files are gone after each commit.
    steps = [
        ["save", {"ckpt": "ckpt", "checkpointer": "PROCESS", "seed": 1, "steps": 1}],
        ["load", {"ckpt": "ckpt", "seed": 1, "expect_step": 1}],
        ["save", {"ckpt": "ckpt", "checkpointer": "PROCESS", "seed": 2, "steps": 2, "stager": "torch"}],
        ["load", {"ckpt": "ckpt", "seed": 2, "expect_step": 2}],
    ]
    run_ranks(3, tmp_path, steps, deadline=180)
    path = tmp_path / "ckpt"
    assert len(rank_files(path)) == 3 and committed_files(path) == rank_files(path)
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]


def _wait_for(predicate, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.005)
    return None


@pytest.mark.parametrize("kill_at", ["temp file", "rank file before commit"])
def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path, kill_at):
    path = tmp_path / "ckpt"
    if kill_at == "temp file":
        sizes = {"0": 24 << 20, "1": 24 << 20}
    else:  # rank 1 finishes its file at once, rank 0 is still writing: nothing is committed yet
        sizes = {"0": 48 << 20, "1": 16}
    steps = [["save", {"ckpt": "ckpt", "plain": False}], ["hang_in_save", {"ckpt": "ckpt", "numel_by_rank": sizes}]]
    procs = start_ranks(2, tmp_path, steps)
    try:
        previous = _wait_for(lambda: committed_files(path), 90)
        assert previous, "the first save did not commit"

        def in_flight():
            names = set(os.listdir(path))
            if kill_at == "temp file":
                return [n for n in names if n.endswith(".tmp")]
            return [n for n in names if n.endswith(".distcp") and n not in previous]

        seen = _wait_for(in_flight, 60)
        for proc in procs.values():
            proc.send_signal(signal.SIGKILL)
        assert seen, f"never saw a {kill_at} of the second save: {os.listdir(path)}"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    assert committed_files(path) == previous
    leftovers = set(os.listdir(path)) - set(previous) - {".metadata"}
    assert leftovers, "the killed save left nothing to clean up (did it run?)"
    # The previous checkpoint loads (on 1 rank: every tensor comes from both rank files), and the
    # next save removes what the killed one left behind.
    run_ranks(1, tmp_path, [["load", {"ckpt": "ckpt", "plain": False}],
                            ["save", {"ckpt": "ckpt", "plain": False, "seed": 4}],
                            ["load", {"ckpt": "ckpt", "plain": False, "seed": 4}]])
    assert set(os.listdir(path)) == {".metadata", *rank_files(path)} and len(rank_files(path)) == 1


# ---- one process (no_dist) -----------------------------------------------------------------------


def sample_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 32, generator=gen)
    return {
        "model": {"weight": base, "row": base[5], "half": torch.randn(7, 3, generator=gen).to(torch.bfloat16),
                  "ints": torch.arange(11, dtype=torch.int64) + seed, "empty": torch.empty(0, 3),
                  "strided": torch.randn(6, 8, generator=gen).t()},
        "extra": {"step": seed, "name": f"run-{seed}", "pair": (1, "x")},
    }


def zeros_like_state(state):
    def zero(value):
        if isinstance(value, torch.Tensor):
            return torch.zeros_like(value)
        if isinstance(value, dict):
            return {k: zero(v) for k, v in value.items()}
        return value

    out = zero(state)
    out["extra"] = {"step": -1, "name": "", "pair": (0, "")}
    return out


def assert_loaded(target, state):
    for key, value in state["model"].items():
        got = target["model"][key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    assert target["extra"] == state["extra"]


def save(state, path, **kwargs):
    dcp.save(state, storage_writer=stager.FileSystemWriter(path, **kwargs), no_dist=True)


def load(state, path, **kwargs):
    target = zeros_like_state(state)
    dcp.load(target, storage_reader=stager.FileSystemReader(path, **kwargs), no_dist=True)
    return target


def failure(err):
    """The exception a rank raised inside dcp's CheckpointException."""
    assert isinstance(err, CheckpointException), err
    (inner,) = err.failures.values()
    return inner[0] if isinstance(inner, tuple) else inner  # (exception, traceback summary)


def test_round_trip_metadata_is_dcps_own_and_directory_reused(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    path = tmp_path / "ckpt"
    for step in range(3):
        state = sample_state(step)
        save(state, path)
        assert_loaded(load(state, path), state)
        assert len(rank_files(path)) == 1, os.listdir(path)
    assert sorted([".metadata", *rank_files(path)]) == sorted(os.listdir(path))
    # .metadata is dcp's pickled Metadata, as PyTorch's writer makes it: its reader opens it.
    metadata = dcp.FileSystemReader(path).read_metadata()
    assert metadata.version == "1.0.0"
    assert {type(info) for info in metadata.storage_data.values()} == {_StorageInfo}
    assert {info.relative_path for info in metadata.storage_data.values()} == set(rank_files(path))


def test_load_never_unpickles_tensor_data(tmp_path, monkeypatch):
    state = {"w": torch.randn(100, 10), "v": torch.arange(5)[1:4], "b": torch.ones(3, dtype=torch.bfloat16)}
    dcp.save(state, storage_writer=stager.FileSystemWriter(tmp_path), no_dist=True)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    target = {key: torch.zeros_like(value) for key, value in state.items()}
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path), no_dist=True)
    for key, value in state.items():
        assert torch.equal(target[key], value), key


def test_async_save_in_one_process_with_both_checkpointers_of_stager(tmp_path):
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    state = sample_state(3)
    with stager.DefaultStager(stager.StagingOptions(num_threads=1)) as async_stager:
        response = dcp.async_save(state, storage_writer=stager.FileSystemWriter(tmp_path), async_stager=async_stager,
                                  async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=True)
        response.upload_completion.result(timeout=60)
    assert_loaded(load(state, tmp_path), state)
    # Without async_stager dcp stages with the writer itself (an AsyncStager, like PyTorch's).
    state = sample_state(4)
    writer = stager.FileSystemWriter(tmp_path)
    future = dcp.async_save(state, storage_writer=writer, no_dist=True)
    getattr(future, "upload_completion", future).result(timeout=60)
    writer.close()
    assert_loaded(load(state, tmp_path), state)


def _flip_byte_of_item(directory, fqn):
    """Flips a byte in the middle of dcp item ``fqn``'s tensor bytes; returns its file's name."""
    metadata = stager.FileSystemReader(directory).read_metadata()
    (info,) = [info for index, info in metadata.storage_data.items() if index.fqn == fqn]
    _, storages = stager._native.RecordFile(str(directory / info.relative_path)).parse_record(info.offset, info.length)
    ((_, offset, nbytes, _),) = storages
    with open(directory / info.relative_path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte[0] ^ 0x20]))
    return info.relative_path


@pytest.mark.parametrize("damaged", ["model.ints", "model.row"])
def test_flipped_byte_names_file_and_item(tmp_path, damaged):
    state = sample_state(1)
    save(state, tmp_path)
    name = _flip_byte_of_item(tmp_path, damaged)
    with pytest.raises(CheckpointException) as info:
        load(state, tmp_path)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError)
    assert name in str(err) and "checksum" in str(err) and repr(damaged) in str(err), err
    # verify=False reads the damaged bytes without complaint (the caller asked for it).
    load(state, tmp_path, verify=False)


def test_truncated_and_missing_rank_file_name_file_and_items(tmp_path):
    state = sample_state(2)
    save(state, tmp_path)
    (name,) = rank_files(tmp_path)
    full = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(full[: len(full) - 1000])
    with pytest.raises(CheckpointException) as info:
        load(state, tmp_path)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError)
    assert name in str(err) and ("'extra." in str(err) or "'model." in str(err)) and "truncated" in str(err), err
    os.unlink(tmp_path / name)
    with pytest.raises(CheckpointException) as info:
        load(state, tmp_path)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError) and name in str(err) and "model." in str(err), err


def test_damaged_metadata_is_refused(tmp_path):
    state = sample_state(0)
    save(state, tmp_path)
    meta = tmp_path / ".metadata"
    data = meta.read_bytes()
    meta.write_bytes(data[:-100])
    with pytest.raises(stager.StagerError, match="not a readable dcp metadata pickle"):
        stager.FileSystemReader(tmp_path).read_metadata()
    meta.write_bytes(b"not a pickle at all")
    with pytest.raises(stager.StagerError, match=r"\.metadata"):
        stager.FileSystemReader(tmp_path).read_metadata()
    os.unlink(meta)
    with pytest.raises(stager.StagerError, match="no checkpoint"):
        stager.FileSystemReader(tmp_path).read_metadata()


def test_hostile_metadata_cannot_point_outside_the_directory(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    state = {"w": torch.ones(4)}
    save(state, tmp_path)
    metadata = dcp.FileSystemReader(tmp_path).read_metadata()
    for index in metadata.storage_data:
        metadata.storage_data[index] = _StorageInfo("../../etc/passwd", 0, 10)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(stager.StagerError, match="invalid location"):
        stager.FileSystemReader(tmp_path).read_metadata()


def test_checkpoints_of_either_writer_load_with_either_reader(tmp_path):
    state = sample_state(0)
    torch_dir, stager_dir = tmp_path / "torch", tmp_path / "stager"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(torch_dir), no_dist=True)
    save(state, stager_dir)
    assert_loaded(load(state, torch_dir), state)  # PyTorch's checkpoint, stager's reader
    target = zeros_like_state(state)  # stager's checkpoint, PyTorch's reader
    dcp.load(target, storage_reader=dcp.FileSystemReader(stager_dir), no_dist=True)
    assert_loaded(target, state)


def test_overwrite_false_refuses_an_existing_checkpoint(tmp_path):
    save({"w": torch.ones(2)}, tmp_path)
    with pytest.raises(CheckpointException, match="overwrite=False"):
        save({"w": torch.ones(2)}, tmp_path, overwrite=False)


def test_unsupported_options_are_refused():
    with pytest.raises(stager.StagerError, match="one file per rank"):
        stager.FileSystemWriter("/tmp/x", single_file_per_rank=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_cleanly_and_keeps_the_previous_checkpoint(small_tmpfs):
    path = small_tmpfs / "ckpt"
    small = sample_state(5)
    save(small, path)
    before = sorted(os.listdir(path))
    big = {"model": {"weight": torch.randn(2 << 20)}, "extra": {}}  # 8 MB on a 4 MB filesystem
    with pytest.raises(CheckpointException) as info:
        save(big, path)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError) and "No space left" in str(err) and str(path) in str(err), err
    assert sorted(os.listdir(path)) == before  # no temp file, no half-written rank file
    assert_loaded(load(small, path), small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(sample_state(6), path)  # the space is usable again
    assert_loaded(load(sample_state(6), path), sample_state(6))


def test_commit_removes_leftovers_of_killed_saves_and_nothing_else(tmp_path):
    save(sample_state(0), tmp_path)
    filesystem.wait_for_cleanup(tmp_path)  # its own sweep runs in the background: let it end first
    old_token = "0000000000000001abcdef01"  # a save that started long ago and never committed
    leftovers = [f"__0_{old_token}.safetensors", f"__1_{old_token}.safetensors.4242.0.tmp", ".metadata.4242.7.tmp",
                 f"__2_{old_token}.distcp", f"__3_{old_token}.distcp.4242.1.stager.tmp"]
    foreign = ["notes.txt", "__0_0.distcp", "__0_123.safetensors", ".metadata.backup"]
    for name in leftovers + foreign:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(1, 1))
    save(sample_state(1), tmp_path)
    filesystem.wait_for_cleanup(tmp_path)
    names = set(os.listdir(tmp_path))
    assert not names & set(leftovers), names
    assert set(foreign) <= names
    assert_loaded(load(sample_state(1), tmp_path), sample_state(1))


def test_writer_waits_for_each_storage_of_a_stage_still_copying(tmp_path):
    # A stage in flight, made of the engine's own parts: a pool buffer and a completion, the
    # staged tensors built over it before any byte is in. The writer, handed the stage, must
    # write each storage only once its request completes: the file then holds what was copied
    # in, not the buffer's earlier contents.
    import threading

    from stager import engine
    from stager.plan import plan_state_dict
    from stager.stagers import StagedCopy

    source = {f"t{i}": torch.full((1 << 16,), float(i + 1)) for i in range(6)}
    plan = plan_state_dict(source)
    buffer = engine.process_pool(False).acquire(plan.total_nbytes)
    completion = stager._native.Completion(len(plan.table.storage_nbytes))
    stage = StagedCopy(plan, buffer, completion)
    staged = plan.materialize(buffer)
    for tensor in staged.values():
        tensor.fill_(-7.0)  # what a writer that does not wait would store
    path = str(tmp_path / "__0_0000000000000001abcdef01.distcp")
    results = []
    writer = threading.Thread(
        target=lambda: results.append(filesystem.write_data_file(path, list(staged.items()), stage)))
    writer.start()
    for i, key in enumerate(source):
        time.sleep(0.02)
        staged[key].copy_(source[key])
        completion.mark_complete(i)
    writer.join(timeout=60)
    assert not writer.is_alive() and results, results
    # Each record is what torch.load reads (PyTorch's reader does exactly this per item).
    data = open(path, "rb").read()
    for (offset, length), (key, value) in zip(results[0], source.items()):
        loaded = torch.load(io.BytesIO(data[offset:offset + length]), weights_only=True)
        assert torch.equal(loaded, value), key


def test_async_save_with_stager_default_stager_pipelined_and_consistent(tmp_path):
    # THREAD checkpointer: dcp's upload gets the staged dict early (stager's writer waits per
    # storage). The checkpoint holds the values at async_save time, not the later training step.
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    state = {"model": {f"w{i}": torch.randn(256, 1024) for i in range(8)}, "extra": {"step": 3}}
    expected = {k: v.clone() for k, v in state["model"].items()}
    with stager.DefaultStager(stager.StagingOptions(num_threads=1, use_shared_memory=False)) as async_stager:
        response = dcp.async_save(state, storage_writer=stager.FileSystemWriter(tmp_path), async_stager=async_stager,
                                  async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=True)
        response.staging_completion.result(timeout=60)
        for value in state["model"].values():
            value.add_(1.0)  # training goes on
        response.upload_completion.result(timeout=60)
    target = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}, "extra": {"step": 0}}
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path), no_dist=True)
    for key, value in expected.items():
        assert torch.equal(target["model"][key], value), key
    assert target["extra"]["step"] == 3


def test_reader_serves_partial_converting_and_strided_destinations(tmp_path):
    gen = torch.Generator().manual_seed(9)
    state = {"a": torch.randn(64, 32, generator=gen), "b": torch.randn(40, generator=gen), "c": torch.arange(12.0)}
    save(state, tmp_path)
    # A subset of the keys, a bf16 destination for fp32 data (converted, as PyTorch's reader does)
    # and a transposed (non-contiguous) destination: read through scratch, copied into place.
    target = {"a": torch.zeros(32, 64).t(), "b": torch.zeros(40, dtype=torch.bfloat16)}
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(target["a"], state["a"])
    assert torch.equal(target["b"], state["b"].to(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_state_dicts_save_and_load(tmp_path):
    # dcp.save of CUDA tensors: the writer stages them through the process-wide pool, writing each
    # storage as its device copy lands; async_save with stager's stager; loads into CUDA tensors.
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    gen = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(512, 256, generator=gen).cuda(), "b": torch.randn(300, generator=gen).cuda().half(),
             "v": torch.arange(10.0).cuda()[2:7], "step": 4}
    expected = {k: v.cpu().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    dcp.save(state, storage_writer=stager.FileSystemWriter(tmp_path / "sync"), no_dist=True)
    with stager.DefaultStager() as async_stager:
        response = dcp.async_save(state, storage_writer=stager.FileSystemWriter(tmp_path / "async"),
                                  async_stager=async_stager, async_checkpointer_type=AsyncCheckpointerType.THREAD,
                                  no_dist=True)
        response.upload_completion.result(timeout=60)
    for name in ("sync", "async"):
        target = {k: torch.zeros_like(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
        target["step"] = 0
        dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path / name), no_dist=True)
        for key, value in expected.items():
            assert target[key].is_cuda and torch.equal(target[key].cpu(), value), (name, key)
        assert target["step"] == 4


def test_reader_with_tied_destinations_and_only_empty_scratch(tmp_path):
    # Two fqns, one tensor (tied weights): both reads target the same memory, which must not be
    # written by two reads at once. An empty tensor as the only storage not read in place.
    weight = torch.randn(16, 8)
    save({"embed": weight, "head": weight.clone(), "none": torch.empty(0)}, tmp_path)
    tied = torch.zeros(16, 8)
    target = {"embed": tied, "head": tied, "none": torch.empty(0)}
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(tied, weight)
    only = {"w": torch.arange(6.0), "e": torch.empty(0, 2)}
    save(only, tmp_path / "b")
    target = {"w": torch.zeros(6), "e": torch.empty(0, 2)}
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path / "b"), no_dist=True)
    assert torch.equal(target["w"], only["w"])
