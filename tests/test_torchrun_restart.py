"""survive_restart under torchrun itself: ``torchrun --nproc-per-node 4 --max-restarts 1`` runs
tests/shm_train.py (two simulated nodes of two ranks); rank 3 SIGKILLs itself mid-run, torchrun
restarts every worker, they restore() and finish, and the final weights equal an uninterrupted
run's bitwise. Each test has its own STAGER_SHM_DIR and removes it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from ranks import free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def run_torchrun(out, variant, shm_dir):
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--max-restarts", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--monitor-interval", "0.5",
               os.path.join(HERE, "shm_train.py"), str(out), variant]
    env = dict(os.environ, STAGER_SHM_DIR=shm_dir, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-10000:]
    sys.path.insert(0, HERE)
    try:
        import shm_train
    finally:
        sys.path.remove(HERE)
    for rank in range(4):
        final = torch.load(os.path.join(out, f"final_rank{rank}.pt"), weights_only=True)
        expected = shm_train.reference(rank)
        assert final.keys() == expected.keys()
        for key in final:
            assert torch.equal(final[key], expected[key]), f"rank {rank} {key} differs from the uninterrupted run"
    return {rank: json.load(open(os.path.join(out, f"restore_rank{rank}.json"))) for rank in range(4)}


def test_torchrun_restart_restores_every_rank_from_its_own_shared_memory(tmp_path, shm_dir):
    restored = run_torchrun(tmp_path, "all", shm_dir)
    for rank, where in restored.items():
        assert where["step"] == 4 and where["tier"] == "shm" and where["server"] == rank, where
        assert where["received_bytes"] == 0


@pytest.mark.slow
def test_torchrun_restart_with_node_1_replaced(tmp_path, shm_dir):
    restored = run_torchrun(tmp_path, "node_replaced", shm_dir)
    for rank, where in restored.items():
        assert where["step"] == 4 and where["tier"] == "shm", where
        assert where["server"] == (rank if rank < 2 else rank - 2), where


@pytest.mark.slow
def test_torchrun_restart_with_the_disk_copies_removed(tmp_path, shm_dir):
    restored = run_torchrun(tmp_path, "no_disk", shm_dir)
    for rank, where in restored.items():
        assert where["step"] == 4 and where["tier"] == "shm" and where["server"] == rank, where
