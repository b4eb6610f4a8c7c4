"""survive_restart: copies in named shared memory that outlive the process (stager.segments,
rust/shm.rs). Every test uses its own STAGER_SHM_DIR under /dev/shm and removes it."""

import os
import shutil
import subprocess

import pytest
from ranks import collect, start_ranks

import stager

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shm_worker.py")


def run(world, directory, actions, shm_dir, deadline=120):
    procs = start_ranks(world, directory, actions, worker=WORKER, env=lambda rank: {"STAGER_SHM_DIR": shm_dir})
    results = collect(procs, deadline=deadline)
    for rank, (rc, _, output) in results.items():
        assert rc == 0, f"rank {rank} failed (rc={rc}):\n{output}"
    return {rank: found for rank, (_, found, _) in results.items()}


def test_restarted_ranks_restore_from_their_own_shared_memory(tmp_path, shm_dir):
    staged = run(4, tmp_path, [["stage", {"steps": [1, 2, 3]}]], shm_dir)
    # at most two generations per (holder, owner): steps 2 and 3 of the own copy and the replica
    for rank, found in staged.items():
        assert found["stage"]["held_intact"]
        names = [n for n in found["stage"]["segments"] if f"-h{rank}-" in n]
        assert sorted(n.rsplit("-s", 1)[1] for n in names) == ["2.seg", "2.seg", "3.seg", "3.seg"], names
    restored = run(4, tmp_path, [["restore", {}]], shm_dir)
    for rank, found in restored.items():
        result = found["restore"]
        assert result["step"] == 3 and result["same"], result
        assert result["tier"] == "shm" and result["server"] == rank and result["received"] == 0, result

    # every disk copy removed: shared memory alone restores everyone, locally
    for node in ("node0", "node1"):
        for name in os.listdir(tmp_path / node):
            os.unlink(tmp_path / node / name)
    restored = run(4, tmp_path, [["restore", {}]], shm_dir)
    for found in restored.values():
        result = found["restore"]
        assert result["step"] == 3 and result["same"] and result["tier"] == "shm" and result["received"] == 0, result

    # node 1 replaced: its segments and its disk are gone; its ranks get their copies from the
    # holders on node 0, out of their shared memory
    assert stager.release_shared_memory(tmp_path / "node1") > 0
    shutil.rmtree(tmp_path / "node1")
    restored = run(4, tmp_path, [["restore", {}]], shm_dir)
    for rank, found in restored.items():
        result = found["restore"]
        assert result["step"] == 3 and result["same"] and result["tier"] == "shm", result
        if rank < 2:
            assert result["server"] == rank and result["received"] == 0, result
        else:
            assert result["server"] == rank - 2 and result["received"] > 0, result


def test_incremental_replication_keeps_complete_copies_in_shared_memory(tmp_path, shm_dir):
    staged = run(4, tmp_path, [["stage", {"steps": [1, 2, 3], "incremental": True}]], shm_dir)
    for found in staged.values():
        full, *later = found["stage"]["sent"]
        assert later and all(0 < sent < full // 10 for sent in later), found["stage"]["sent"]
    restored = run(4, tmp_path, [["restore", {"incremental": True}]], shm_dir)
    for rank, found in restored.items():
        result = found["restore"]
        assert result["step"] == 3 and result["same"] and result["tier"] == "shm" and result["server"] == rank, result


def test_shared_memory_full_fails_the_stage_on_every_rank_and_keeps_the_previous_step(tmp_path):
    small = str(tmp_path / "small-shm")
    os.makedirs(small)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        options = {"ranks_per_node": 1}
        staged = run(2, tmp_path, [["stage_too_big", options]], small)
        for rank, found in staged.items():
            result = found["stage_too_big"]
            assert result["error"] and small in result["error"] and "bytes" in result["error"], result
            assert [n.rsplit("-s", 1)[1] for n in result["segments"] if f"-h{rank}-" in n] == ["1.seg", "1.seg"]
        assert not [n for n in os.listdir(small) if n.endswith(".tmp")]
        restored = run(2, tmp_path, [["restore", options]], small)
        for rank, found in restored.items():
            result = found["restore"]
            assert result["step"] == 1 and result["same"] and result["tier"] == "shm" and result["server"] == rank
    finally:
        subprocess.run(["umount", "-l", small], check=False)
