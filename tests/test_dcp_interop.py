"""No lock-in, both directions: stager.FileSystemWriter writes dcp's own format (PyTorch's default
reader and ``dcp_to_torch_save`` load it bitwise), stager.FileSystemReader reads PyTorch's
checkpoints and stager 0.1's; bad input raises StagerError naming the file and item; concurrent
savers into one directory never commit a ``.metadata`` naming a removed file; ``.metadata`` is
never a FIFO we hang on, nor a symlink we write through.

Multi-rank cases run tests/dcp_worker.py ranks (real gloo groups, FSDP2 on CPU meshes) with
bounded waits; the rest runs dcp with ``no_dist=True`` in the test process.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import zlib

import pytest
import ranks
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import stager
from stager import filesystem

pytestmark = pytest.mark.filterwarnings("ignore")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dcp_worker.py")


def sample_state():
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(40, 16, generator=gen)
    return {
        "model": {
            "weight": base,
            "row": base[7],  # a view with a storage offset
            "cols": base[:, 3:9],  # a non-contiguous view
            "t": torch.randn(6, 9, generator=gen).t(),
            "half": torch.randn(5, 4, generator=gen).to(torch.bfloat16),
            "u16": torch.arange(7).to(torch.uint16),  # no legacy storage type: _rebuild_tensor_v3
            "flags": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "empty": torch.empty(0, 5),
            "big": torch.randn(300_000, generator=gen),  # placed for direct I/O from memory
        },
        "extra": {"step": 12, "name": "run", "nested": {"pair": (1, "x"), "list": [1, 2.5]}},
    }


def zeros_like(state):
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {key: zeros_like(value) for key, value in state.items()}
    return None


def assert_bitwise(got, expected, path="root"):
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), path
    elif isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            assert_bitwise(got[key], expected[key], f"{path}.{key}")
    else:
        assert got == expected, path


def save_with(writer, state, path):
    dcp.save(state, storage_writer=writer(path), no_dist=True)


def load_with(reader, state, path):
    target = zeros_like(state)
    dcp.load(target, storage_reader=reader(path), no_dist=True)
    return target


def failure(err):
    assert isinstance(err, CheckpointException), err
    (inner,) = err.failures.values()
    return inner[0] if isinstance(inner, tuple) else inner


# ---- the format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor", [
    torch.arange(10, dtype=torch.float32),
    torch.arange(10, dtype=torch.float32)[2:8].view(2, 3),
    torch.tensor(5.0),
    torch.zeros(0, 3),
    torch.zeros(3, dtype=torch.uint16),
    torch.ones(2, 3, 4, 5, dtype=torch.bfloat16),
    torch.zeros(70000, dtype=torch.int8),
], ids=["1d", "view", "0d", "empty", "uint16", "4d", "big-numel"])
def test_record_pickle_is_what_torch_save_writes(tensor):
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    expected = zipfile.ZipFile(buffer).read("archive/data.pkl")
    storage_type, v3_dtype = filesystem._storage_type(tensor.dtype)
    storage = tensor.untyped_storage()
    numel = storage.nbytes() if v3_dtype else storage.nbytes() // tensor.element_size()
    ours = stager._native.tensor_pickle(storage_type, numel, tensor.storage_offset(), list(tensor.shape),
                                        list(tensor.stride()), v3_dtype)
    assert ours == expected


@pytest.mark.parametrize("direction", ["stager writes, torch reads", "torch writes, stager reads",
                                       "stager writes, stager reads"])
def test_round_trip_is_bitwise(tmp_path, direction):
    state = sample_state()
    writer = dcp.FileSystemWriter if direction.startswith("torch") else stager.FileSystemWriter
    reader = stager.FileSystemReader if direction.endswith("stager reads") else dcp.FileSystemReader
    save_with(writer, state, tmp_path)
    assert_bitwise(load_with(reader, state, tmp_path), state)


def test_stager_checkpoint_through_dcp_to_torch_save(tmp_path):
    state = sample_state()
    save_with(stager.FileSystemWriter, state, tmp_path / "ckpt")
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    for key, value in state["model"].items():
        assert torch.equal(full["model"][key], value), key
    assert full["extra"] == state["extra"]


def test_stager_reads_torch_checkpoint_without_torch_load_or_unrestricted_pickle(tmp_path, monkeypatch):
    state = sample_state()
    save_with(dcp.FileSystemWriter, state, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load / pickle.load used while loading")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    target = {"model": zeros_like(state["model"])}  # bytes items go to dcp's planner (its torch.load)
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path), no_dist=True)
    assert_bitwise(target["model"], state["model"])


def test_stager_0_1_checkpoint_still_loads(tmp_path):
    state = {"model": {"w": torch.randn(8, 4), "v": torch.arange(6)[1:5]}, "extra": {"step": 3}}
    dcp.save(state, storage_writer=LegacyWriter(tmp_path), no_dist=True)
    assert (tmp_path / ".metadata").read_bytes().find(b"stager-dcp-metadata") > 0
    assert [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert_bitwise(load_with(stager.FileSystemReader, state, tmp_path), state)


class LegacyWriter(stager.FileSystemWriter):
    """stager 0.1's writer: one stager (safetensors) file per rank and a JSON ``.metadata``,
    made with the 0.1 functions the module keeps for reading them."""

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint.planner import WriteItemType
        from torch.distributed.checkpoint.storage import WriteResult
        from torch.futures import Future

        name = plan.storage_data.name.replace(".distcp", ".safetensors")
        keys = filesystem._item_keys(plan.items)
        tensors = {}
        for item, key in zip(plan.items, keys):
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                data = torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8)
            tensors[key] = data.detach()
        filesystem.write_rank_file(os.path.join(self.path, name), tensors, {})
        future = Future()
        future.set_result([WriteResult(index=item.index, size_in_bytes=0,
                                       storage_data=filesystem._ItemLocation(name, key))
                           for item, key in zip(plan.items, keys)])
        return future

    def finish(self, metadata, results):
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        files = sorted({location.relative_path for location in metadata.storage_data.values()})
        metadata.version = "1.0.0"
        metadata.storage_meta = self.storage_meta()
        data = filesystem._encode_metadata(metadata, files, time.time_ns())
        filesystem._commit_metadata(self._metadata_path(), data)


# ---- FSDP2, resharding, both checkpointers ------------------------------------------------------


def run_ranks(world, directory, steps, deadline=150):
    procs = ranks.start_ranks(world, directory, steps, worker=WORKER, env=lambda rank: {"MASTER_ADDR": "127.0.0.1"})
    results = ranks.collect(procs, deadline)
    for rank, (rc, _, output) in results.items():
        done = len(list(ranks.results_in(output)))
        assert rc == 0 and done == len(steps), f"rank {rank} failed (rc={rc}):\n{output[-6000:]}"


def test_fsdp2_torch_writes_on_two_stager_reads_on_three(tmp_path):
    run_ranks(2, tmp_path, [["save", {"ckpt": "ckpt", "writer": "torch", "stager": "torch",
                                      "checkpointer": "THREAD"}]])
    run_ranks(3, tmp_path, [["load", {"ckpt": "ckpt", "reader": "stager"}]])


def test_fsdp2_stager_writes_on_three_process_checkpointer_torch_reads_on_two(tmp_path):
    run_ranks(3, tmp_path, [["save", {"ckpt": "ckpt", "writer": "stager", "checkpointer": "PROCESS"}]], deadline=180)
    run_ranks(2, tmp_path, [["load", {"ckpt": "ckpt", "reader": "torch"}]])


# ---- bad input -----------------------------------------------------------------------------------


def torch_checkpoint(path, state=None):
    state = state or {"w": torch.arange(12.0), "b": torch.ones(3), "meta": {"k": 1}}
    save_with(dcp.FileSystemWriter, state, path)
    return state


def read_metadata_error(path):
    with pytest.raises(stager.StagerError) as info:
        stager.FileSystemReader(path).read_metadata()
    return str(info.value)


def test_metadata_of_a_newer_dcp_version_is_refused(tmp_path):
    torch_checkpoint(tmp_path)
    metadata = dcp.FileSystemReader(tmp_path).read_metadata()
    metadata.version = "2.0.0"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    message = read_metadata_error(tmp_path)
    assert ".metadata" in message and "2.0.0" in message and "newer" in message, message


class _Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_hostile_metadata_pickle_is_rejected_and_never_run(tmp_path):
    torch_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Hostile(str(marker))))
    message = read_metadata_error(tmp_path)
    assert ".metadata" in message and "posix.mkdir" in message and "refused" in message, message
    assert not marker.exists()


def test_hostile_record_pickle_is_rejected_and_never_run(tmp_path):
    torch_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    metadata = dcp.FileSystemReader(tmp_path).read_metadata()
    (index,) = [i for i in metadata.storage_data if i.fqn == "w"]
    record = io.BytesIO()
    torch.save(_Hostile(str(marker)), record)
    name = metadata.storage_data[index].relative_path
    with open(tmp_path / name, "ab") as f:
        offset = f.tell()
        f.write(record.getvalue())
    metadata.storage_data[index] = _StorageInfo(name, offset, len(record.getvalue()))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointException) as info:
        load_with(stager.FileSystemReader, {"w": torch.zeros(12)}, tmp_path)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError) and name in str(err) and "'w'" in str(err), err
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch", "stager"])
def test_data_file_shorter_than_the_metadata_says(tmp_path, writer):
    state = torch_checkpoint(tmp_path) if writer == "torch" else None
    if writer == "stager":
        state = {"w": torch.arange(12.0), "b": torch.ones(3), "meta": {"k": 1}}
        save_with(stager.FileSystemWriter, state, tmp_path)
    metadata = dcp.FileSystemReader(tmp_path).read_metadata()
    (index,) = [i for i in metadata.storage_data if i.fqn == "w"]
    info = metadata.storage_data[index]
    os.truncate(tmp_path / info.relative_path, info.offset + info.length // 2)
    with pytest.raises(CheckpointException) as caught:
        load_with(stager.FileSystemReader, {"w": torch.zeros(12)}, tmp_path)
    err = failure(caught.value)
    assert isinstance(err, stager.StagerError), err
    assert info.relative_path in str(err) and "'w'" in str(err) and "shorter" in str(err), err


def test_record_whose_storage_size_disagrees_with_the_metadata(tmp_path):
    torch_checkpoint(tmp_path)
    metadata = dcp.FileSystemReader(tmp_path).read_metadata()
    (index,) = [i for i in metadata.storage_data if i.fqn == "w"]
    record = io.BytesIO()
    torch.save(torch.arange(20.0), record)  # 20 elements where the metadata says 12
    (tmp_path / "other.distcp").write_bytes(record.getvalue())
    metadata.storage_data[index] = _StorageInfo("other.distcp", 0, len(record.getvalue()))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointException) as info:
        load_with(stager.FileSystemReader, {"w": torch.zeros(12)}, tmp_path)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError), err
    assert "other.distcp" in str(err) and "'w'" in str(err) and "disagrees with the metadata" in str(err), err


def test_checkpoint_mixing_stager_0_1_and_dcp_files(tmp_path):
    legacy, torch_dir = tmp_path / "legacy", tmp_path / "torch"
    state = {"w": torch.arange(12.0)}
    dcp.save(state, storage_writer=LegacyWriter(legacy), no_dist=True)
    torch_checkpoint(torch_dir, state)
    (legacy_file,) = [n for n in os.listdir(legacy) if n.endswith(".safetensors")]
    # dcp's pickled .metadata naming a stager 0.1 rank file.
    metadata = dcp.FileSystemReader(torch_dir).read_metadata()
    for index in metadata.storage_data:
        metadata.storage_data[index] = _StorageInfo(legacy_file, 0, (legacy / legacy_file).stat().st_size)
    os.link(legacy / legacy_file, torch_dir / legacy_file)
    (torch_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointException) as info:
        load_with(stager.FileSystemReader, state, torch_dir)
    err = failure(info.value)
    assert isinstance(err, stager.StagerError) and legacy_file in str(err) and "'w'" in str(err), err
    assert "mixes" in str(err), err
    # stager 0.1's JSON .metadata naming a dcp data file.
    (data_file,) = [n for n in os.listdir(torch_dir) if n.endswith(".distcp")]
    body, _ = filesystem._parse_header((legacy / ".metadata").read_bytes(), ".metadata")
    body["files"] = [data_file]
    text = json.dumps(body).encode()
    line = b"%s 1 %d %08x\n" % (filesystem._MAGIC, len(text), zlib.crc32(text))
    (torch_dir / ".metadata").write_bytes(filesystem._TORCH_READER_STUB + b"\n" + line + text)
    message = read_metadata_error(torch_dir)
    assert ".metadata" in message and "rank files" in message, message


# ---- a hostile directory: FIFO and symlinked .metadata (issue 24, item 2) ------------------------


def _bounded(call, timeout=30):
    """Runs ``call`` on a thread; its exception or result, or fails the test if it hangs."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as err:  # handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "hung on the FIFO"
    return outcome


def test_fifo_metadata_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / ".metadata")
    try:
        outcome = _bounded(lambda: stager.FileSystemReader(tmp_path).read_metadata())
        assert isinstance(outcome.get("error"), stager.StagerError), outcome
        assert "a FIFO" in str(outcome["error"]) and ".metadata" in str(outcome["error"])
        outcome = _bounded(lambda: load_with(stager.FileSystemReader, {"w": torch.zeros(2)}, tmp_path))
        assert "a FIFO" in str(outcome.get("error")), outcome
        outcome = _bounded(lambda: save_with(stager.FileSystemWriter, {"w": torch.ones(2)}, tmp_path))
        assert "a FIFO" in str(outcome.get("error")), outcome
        assert stat_is_fifo(tmp_path / ".metadata")  # never replaced: not ours
    finally:
        os.unlink(tmp_path / ".metadata")


def stat_is_fifo(path):
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_symlinked_metadata_is_read_through_and_replaced_not_written_through(tmp_path):
    checkpoint, outside = tmp_path / "ckpt", tmp_path / "outside"
    save_with(stager.FileSystemWriter, {"w": torch.ones(3)}, outside)
    checkpoint.mkdir()
    for name in os.listdir(outside):
        if name != ".metadata":
            os.link(outside / name, checkpoint / name)
    os.symlink(outside / ".metadata", checkpoint / ".metadata")
    before = (outside / ".metadata").read_bytes()
    # Read: the link is followed to a regular file, like a data file's.
    assert torch.equal(load_with(stager.FileSystemReader, {"w": torch.zeros(3)}, checkpoint)["w"], torch.ones(3))
    # Save: the commit replaces the link itself; the file it pointed to is untouched.
    save_with(stager.FileSystemWriter, {"w": torch.full((3,), 2.0)}, checkpoint)
    assert not os.path.islink(checkpoint / ".metadata")
    assert (outside / ".metadata").read_bytes() == before
    got = load_with(dcp.FileSystemReader, {"w": torch.zeros(3)}, checkpoint)["w"]
    assert torch.equal(got, torch.full((3,), 2.0))


# ---- two processes saving into one directory (issue 24, item 1) ---------------------------------

SAVER = textwrap.dedent(
    """
    import sys, time, warnings
    warnings.simplefilter("ignore")
    import torch, torch.distributed.checkpoint as dcp
    import stager
    path, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    end = time.monotonic() + seconds
    saves = discarded = 0
    while time.monotonic() < end:
        state = {"w": torch.full((64,), float(seed)), "n": torch.arange(saves + 1.0)[:1]}
        try:
            dcp.save(state, storage_writer=stager.FileSystemWriter(path), no_dist=True)
            saves += 1
        except BaseException as err:  # CheckpointException: the older of two overlapping saves is discarded
            if "started later committed first" not in str(err):
                raise
            discarded += 1
    print("SAVES", saves, discarded, flush=True)
    """
)


def test_two_processes_saving_into_one_directory_never_lose_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_with(stager.FileSystemWriter, {"w": torch.zeros(64), "n": torch.zeros(1)}, path)
    seconds = 6
    savers = [subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(seconds), str(seed)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    broken, checks = [], 0
    try:
        deadline = time.monotonic() + seconds + 60
        while any(p.poll() is None for p in savers) and time.monotonic() < deadline:
            try:
                fd = os.open(path / ".metadata", os.O_RDONLY)
            except FileNotFoundError:
                broken.append("no .metadata")
                continue
            try:  # the open descriptor keeps the inode from being reused while we check
                data = b""
                while chunk := os.read(fd, 1 << 20):
                    data += chunk
                named = {info.relative_path
                         for info in filesystem._load_dcp_metadata(data, ".metadata").storage_data.values()}
                missing = [name for name in named if not (path / name).exists()]
                still_committed = os.stat(path / ".metadata").st_ino == os.fstat(fd).st_ino
            finally:
                os.close(fd)
            checks += 1
            # Files named by a .metadata that stayed committed across the check must exist.
            if missing and still_committed:
                broken.append(missing)
    finally:
        outputs = []
        for proc in savers:
            try:
                outputs.append(proc.communicate(timeout=90)[0])
            except subprocess.TimeoutExpired:
                proc.kill()
                outputs.append(proc.communicate()[0])
    assert all(p.returncode == 0 for p in savers), outputs
    assert all("SAVES" in out for out in outputs), outputs
    assert checks > 10 and not broken, (checks, broken[:5])
    target = {"w": torch.zeros(64), "n": torch.zeros(1)}
    dcp.load(target, storage_reader=stager.FileSystemReader(path), no_dist=True)
    assert target["w"][0].item() in (1.0, 2.0)
    filesystem.wait_for_cleanup(path)
