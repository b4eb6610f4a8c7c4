"""Named shared-memory segments (rust/shm.rs, stager.segments) and survive_restart in one
process: lifecycle, faults, the command line. Multi-rank restarts are in test_shm_restart.py.
Every test uses its own STAGER_SHM_DIR (a directory under /dev/shm, or a small tmpfs it mounts)
and removes it, whatever happens."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
from ranks import free_port

import stager
from stager import segments


@pytest.fixture(autouse=True)
def one_rank_group():
    """A one-rank gloo group: ReplicationStager.stage() keeps only the own copy then."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mount_tmpfs(path, options):
    os.makedirs(path)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True, text=True)
    if result.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.fixture
def small_tmpfs(tmp_path, monkeypatch):
    """A 1 MiB tmpfs as STAGER_SHM_DIR (unmounted afterwards)."""
    path = str(tmp_path / "small-shm")
    _mount_tmpfs(path, "size=1m")
    monkeypatch.setenv("STAGER_SHM_DIR", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def state(step, numel=4096):
    base = torch.arange(numel, dtype=torch.float32) + step
    return {"w": base, "view": base[10:20], "b": {"i": torch.tensor([step]), "n": step}}


def own_stager(directory, **options):
    return stager.ReplicationStager(storage_dir=str(directory), keep_own=True, survive_restart=True, **options)


def stage_steps(directory, steps, **options):
    rep = own_stager(directory, **options)
    for step in steps:
        rep.stage(state(step), step=step)
    return rep


def steps_in_shm(directory):
    return sorted(s.step for s in segments.find_segments(str(directory)))


def test_own_copy_lives_in_shared_memory_with_at_most_two_generations(tmp_path, shm_dir):
    rep = stage_steps(tmp_path / "job", [1, 2, 3, 4])
    assert steps_in_shm(tmp_path / "job") == [3, 4]
    assert not [n for n in os.listdir(shm_dir) if n.endswith(".tmp")]
    rep.close()
    fresh = own_stager(tmp_path / "job")
    restored = fresh.restore()
    assert fresh.last_restore["tier"] == "shm" and fresh.last_restore["step"] == 4
    assert torch.equal(restored["w"], state(4)["w"]) and restored["b"]["n"] == 4
    assert restored["view"].untyped_storage().data_ptr() == restored["w"].untyped_storage().data_ptr()
    # copy-on-write: changing the restored tensors never changes the segment
    restored["w"].add_(1)
    again = own_stager(tmp_path / "job").restore()
    assert torch.equal(again["w"], state(4)["w"])


def test_restore_into_fills_the_targets_in_place(tmp_path, shm_dir):
    stage_steps(tmp_path / "job", [5])
    target = {"w": torch.zeros(4096), "view": None, "b": {"i": torch.zeros(1, dtype=torch.int64), "n": 0}}
    target["view"] = target["w"][10:20]
    weight = target["w"]
    result = own_stager(tmp_path / "job").restore(into=target)
    assert result["w"] is weight and torch.equal(weight, state(5)["w"])
    assert torch.equal(result["b"]["i"], torch.tensor([5]))


def test_segment_names_come_from_the_storage_dir(tmp_path, shm_dir):
    stage_steps(tmp_path / "a", [1])
    stage_steps(tmp_path / "b", [7])
    assert steps_in_shm(tmp_path / "a") == [1] and steps_in_shm(tmp_path / "b") == [7]
    assert own_stager(tmp_path / "b").restore()["b"]["n"] == 7
    assert stager.release_shared_memory(tmp_path / "a") > 0
    assert steps_in_shm(tmp_path / "a") == [] and steps_in_shm(tmp_path / "b") == [7]


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _segment(directory, step):
    return next(s.path for s in segments.find_segments(str(directory)) if s.step == step)


def test_a_damaged_segment_is_skipped_for_the_disk_copy(tmp_path, shm_dir):
    stage_steps(tmp_path / "job", [1, 2])
    _flip(_segment(tmp_path / "job", 2), os.sysconf("SC_PAGE_SIZE") + 100)
    with pytest.raises(stager.StagerError, match="crc32c"):
        segments.load_segment(_segment(tmp_path / "job", 2))
    fresh = own_stager(tmp_path / "job")
    restored = fresh.restore()
    assert fresh.last_restore == {**fresh.last_restore, "step": 2, "tier": "disk"}
    assert torch.equal(restored["w"], state(2)["w"])


def test_a_truncated_segment_and_a_missing_file_fall_back_to_the_older_step(tmp_path, shm_dir):
    stage_steps(tmp_path / "job", [1, 2])
    path = _segment(tmp_path / "job", 2)
    os.truncate(path, os.path.getsize(path) - 10)
    os.unlink(tmp_path / "job" / "rank_0_replica_partner_0.stager")  # the disk copy of step 2
    fresh = own_stager(tmp_path / "job")
    restored = fresh.restore()
    assert fresh.last_restore["step"] == 1 and fresh.last_restore["tier"] == "shm"
    assert restored["b"]["n"] == 1


def test_a_segment_of_another_world_size_is_ignored(tmp_path, shm_dir):
    directory = str(tmp_path / "job")
    os.makedirs(directory)
    # a segment left by a 4-rank job of this directory (owner 0, step 9), and nothing else
    copy, _ = segments.stage_into_segment(state(9), directory, 0, 0, 9,
                                          {"owner": 0, "holder": 0, "world_size": 4, "step": 9})
    copy.publish()
    with pytest.raises(stager.StagerError, match="world of 4"):
        own_stager(directory).restore()


def test_shm_full_names_the_directory_and_keeps_the_previous_generation(tmp_path, small_tmpfs):
    rep = stage_steps(tmp_path / "job", [1], )  # ~16 KiB: fits
    with pytest.raises(stager.StagerError, match=rf"{small_tmpfs}.*needs \d+ bytes"):
        rep.stage(state(2, numel=1 << 20), step=2)  # 4 MiB: does not
    assert steps_in_shm(tmp_path / "job") == [1]
    assert not [n for n in os.listdir(small_tmpfs) if n.endswith(".tmp")]
    fresh = own_stager(tmp_path / "job")
    assert fresh.restore()["b"]["n"] == 1 and fresh.last_restore["tier"] == "shm"


def test_missing_or_read_only_shm_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGER_SHM_DIR", str(tmp_path / "missing"))
    with pytest.raises(stager.StagerError, match=r"missing.*not usable.*STAGER_SHM_DIR"):
        stage_steps(tmp_path / "job", [1])
    read_only = str(tmp_path / "ro")
    _mount_tmpfs(read_only, "ro,size=1m")
    try:
        monkeypatch.setenv("STAGER_SHM_DIR", read_only)
        with pytest.raises(stager.StagerError, match=rf"{read_only}"):
            stage_steps(tmp_path / "job2", [1])
    finally:
        subprocess.run(["umount", "-l", read_only], check=False)


HOLDER = textwrap.dedent("""
    import sys, time
    from stager import _native
    segment = _native.open_segment(sys.argv[1])
    print("holding", flush=True)
    time.sleep(120)
""")


def test_a_segment_held_by_a_live_process_is_never_released(tmp_path, shm_dir):
    stage_steps(tmp_path / "job", [1]).close()
    gc.collect()  # this process holds nothing of it now
    path = _segment(tmp_path / "job", 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert stager._native.segment_in_use(path)
        assert stager.release_shared_memory(tmp_path / "job") == 0
        assert os.path.exists(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert stager.release_shared_memory(tmp_path / "job") > 0
    assert not os.path.exists(path)


WRITER = textwrap.dedent("""
    import sys, torch
    from stager import segments
    from stager import segments
    directory, first = sys.argv[1], int(sys.argv[2])
    step = first
    while True:
        copy, _ = segments.stage_into_segment({"w": torch.full((300000,), float(step))}, directory, 0, 0, step,
                                              {"owner": 0, "holder": 0, "world_size": 1, "step": step})
        copy.publish()
        print(step, flush=True)
        step += 1
""")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.13, 0.31])
def test_sigkill_at_any_point_of_a_publish_leaves_only_complete_segments(tmp_path, shm_dir, delay):
    directory = str(tmp_path / "job")
    os.makedirs(directory)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, directory, "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "1"  # one published: the writer is in its loop
        time.sleep(delay)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    for segment in segments.find_segments(directory):
        state_dict, record = segments.load_segment(segment.path)
        assert torch.equal(state_dict["w"], torch.full((300000,), float(record["step"])))
    segments.sweep_temps(directory, 0)  # a dead writer's temp is removable
    assert not [n for n in os.listdir(shm_dir) if n.endswith(".tmp")]


def test_find_replicas_inspect_verify_and_release_shm_command(tmp_path, shm_dir):
    stage_steps(tmp_path / "job", [1, 2]).close()
    found = stager.find_replicas(tmp_path / "job")
    shm = [r for r in found if r.format == "shm"]
    assert sorted((r.step, r.previous, r.world_size) for r in shm) == [(1, True, 1), (2, False, 1)]
    assert found[0].step == 2
    assert torch.equal(stager.recover(tmp_path / "job", 0)["w"], state(2)["w"])
    path = _segment(tmp_path / "job", 2)
    env = {**os.environ, "STAGER_SHM_DIR": shm_dir}
    cli = [sys.executable, "-m", "stager.cli"]
    out = subprocess.run(cli + ["inspect", path], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "owner 0, holder 0, world_size 1, step 2" in out.stdout and "w  float32" in out.stdout
    assert subprocess.run(cli + ["verify", path], capture_output=True, env=env).returncode == 0
    _flip(path, os.sysconf("SC_PAGE_SIZE") + 5)
    gc.collect()  # drop what this process still maps (recover's result): release-shm runs in another process
    out = subprocess.run(cli + ["verify", path], capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "crc32c" in out.stderr
    out = subprocess.run(cli + ["release-shm", str(tmp_path / "job")], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "released" in out.stdout and " 0 bytes" not in out.stdout
    assert steps_in_shm(tmp_path / "job") == []


def test_restore_into_a_model_copies_every_layout_and_bumps_version_counters(tmp_path, shm_dir):
    """restore(into=) copies contiguous host tensors with the copy engine; non-contiguous and
    tied targets still get their values, and every target's version counter moves (so a
    skip_unchanged stage after it sends the restored bytes)."""
    model = torch.nn.Linear(64, 32)
    reference = {"weight": torch.randn(32, 64), "bias": torch.randn(32), "t": torch.randn(8, 4), "tied": None}
    reference["tied"] = reference["weight"]
    rep = stager.ReplicationStager(storage_dir=str(tmp_path / "job"), keep_own=True, survive_restart=True)
    rep.stage(reference, step=3)
    rep.close()
    target = {"weight": model.weight, "bias": model.bias, "t": torch.zeros(4, 8).t(), "tied": model.weight}
    versions = {key: value._version for key, value in target.items()}
    result = own_stager(tmp_path / "job").restore(into=target)
    for key in ("weight", "bias", "t", "tied"):
        assert result[key] is target[key], key
        assert torch.equal(result[key], reference[key]), key
        assert target[key]._version > versions[key], key
