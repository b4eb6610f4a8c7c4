"""A small training job for the torchrun restart test: ``torchrun ... shm_train.py OUT VARIANT``.

Every rank trains its own small model (plain SGD, deterministic data per rank and step), and
checkpoints every 2 steps with ``ReplicationStager(survive_restart=True, keep_own=True)``, two
ranks per simulated node (``storage_dir`` = ``OUT/node{rank // 2}``). On the first attempt rank 3
SIGKILLs itself after step 5; torchrun restarts every worker, each ``restore()``s into its fresh
model and finishes. The final weights go to ``OUT/final_rank{r}.pt``.

VARIANT: ``all`` (every copy kept), ``node_replaced`` (before restoring, node 1's segments and
disk are removed), ``no_disk`` (every disk copy removed: shared memory only). With a restart,
``OUT/restore_rank{r}.json`` records where rank r's copy came from.
"""

import datetime
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import stager

STEPS = 8
KILL_AFTER = 5
RANKS_PER_NODE = 2


def build(rank):
    torch.manual_seed(100 + rank)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def train_step(model, optimizer, rank, step):
    gen = torch.Generator().manual_seed(rank * 1000 + step)
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def reference(rank):
    """The uninterrupted run's final weights (same process-independent arithmetic)."""
    torch.set_num_threads(1)
    model = build(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, rank, step)
    return model.state_dict()


def main():
    out, variant = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # The agent's store, with a prefix per attempt: with this torch, a plain env:// init after a
    # restart finds the previous attempt's gloo addresses and fails to connect (not stager's doing).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"/stager-test/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    node_dir = os.path.join(out, f"node{rank // RANKS_PER_NODE}")
    model = build(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step_tensor = torch.zeros((), dtype=torch.int64)
    state = {"model": model.state_dict(), "step": step_tensor}
    first = 1
    if attempt > 0:
        if variant == "node_replaced" and rank == RANKS_PER_NODE:  # node 1's first rank
            stager.release_shared_memory(node_dir)
            shutil.rmtree(node_dir, ignore_errors=True)
        if variant == "no_disk" and rank % RANKS_PER_NODE == 0:
            for name in os.listdir(node_dir):
                os.unlink(os.path.join(node_dir, name))
        dist.barrier()
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=60), storage_dir=node_dir,
                                          ranks_per_node=RANKS_PER_NODE, keep_own=True, survive_restart=True)
    if attempt > 0:
        restored = replicator.restore(into=state)
        assert restored["model"]["0.weight"] is state["model"]["0.weight"]
        first = int(step_tensor) + 1
        with open(os.path.join(out, f"restore_rank{rank}.json"), "w") as f:
            json.dump({k: v for k, v in replicator.last_restore.items()}, f)
    for step in range(first, STEPS + 1):
        train_step(model, optimizer, rank, step)
        if step % 2 == 0:
            step_tensor.fill_(step)
            replicator.stage(state, step=step)
        if attempt == 0 and rank == 3 and step == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save(model.state_dict(), os.path.join(out, f"final_rank{rank}.pt"))
    dist.barrier()
    replicator.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
