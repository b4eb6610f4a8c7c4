"""One rank of a dcp storage-layer test: ``python dcp_worker.py RANK WORLD PORT DIR STEPS_JSON``.

Joins a gloo group on 127.0.0.1 (plus a second gloo group for dcp, as torchtitan does), builds a
small MLP sharded with FSDP2 (``fully_shard`` on a CPU mesh of WORLD ranks), and runs each
``[scenario, options]`` of STEPS_JSON in order:

* ``save``: trains ``steps`` steps from ``seed``, then ``dcp.async_save`` of the model + optimizer
  state (DTensors) and a plain replicated part into DIR/<ckpt> with the chosen writer, stager and
  checkpointer (``budget``: stager's stager with that memory_budget_bytes); rank 0 also records the full (unsharded) values in DIR/<ckpt>.expected.pt;
* ``load``: a fresh model (other seed) on this world size, ``dcp.load`` with the chosen reader, then
  compares every full tensor and the plain part with the recorded values (resharding when the
  world size differs from the saving run's);
* ``hang_in_save``: starts an ``async_save`` of a large state and sleeps, so the test can SIGKILL
  the ranks while the save is in flight.

Prints one ``RESULT {...}`` JSON line per scenario and exits by itself (exit code 0 when every
check passed; a failed check prints ``FAILED`` with the traceback and exits 1).
"""

import datetime
import json
import os
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import stager

WIDTH = 48  # not a multiple of 3: shards are uneven (and padded) on 3 ranks


def build(world, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.ReLU(), torch.nn.Linear(2 * WIDTH, WIDTH), torch.nn.ReLU(),
        torch.nn.Linear(WIDTH, 8),
    )
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optim


def train(model, optim, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, WIDTH, generator=gen)
        model(x).square().mean().backward()
        optim.step()
        optim.zero_grad()


def plain_part(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(20, 6, generator=gen)
    return {
        "table": base,
        "row": base[3],  # a view with a storage offset
        "half": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "empty": torch.empty(0, 4),
        "config": {"name": f"run-{seed}", "lr": 0.5, "betas": (0.9, 0.99)},
    }


def full_values(model, optim):
    """Every tensor of the model and optimizer state, unsharded, on every rank."""
    model_sd, optim_sd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True,
                                                                               broadcast_from_rank0=False))
    out = {f"model.{k}": v.detach().clone() for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{fqn}.{name}"] = value.detach().clone()
    return out


def make_writer(kind, path):
    return stager.FileSystemWriter(path) if kind == "stager" else dcp.FileSystemWriter(path)


def make_stager(kind, budget=None):
    if kind == "stager":
        return stager.DefaultStager(stager.StagingOptions(num_threads=1, memory_budget_bytes=budget))
    if kind == "torch":
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        return DefaultStager(StagingOptions(False, False, False, False))
    return None


def report(name, **fields):
    print("RESULT " + json.dumps({"scenario": name, **fields}), flush=True)


def scenario_save(rank, world, directory, dcp_group, options):
    path = os.path.join(directory, options["ckpt"])
    model, optim = build(world, options.get("seed", 0))
    train(model, optim, options.get("steps", 2), options.get("seed", 0))
    model_sd, optim_sd = get_state_dict(model, optim)
    plain = options.get("plain", True)
    state = {"model": model_sd, "optim": optim_sd, "step": options.get("steps", 2)}
    if plain:
        state["plain"] = plain_part(options.get("seed", 0))
    expected = full_values(model, optim)
    if rank == 0:
        torch.save(expected, path + ".expected.pt")
    async_stager = make_stager(options.get("stager", "stager"), options.get("budget"))
    checkpointer = getattr(AsyncCheckpointerType, options.get("checkpointer", "THREAD"))
    response = dcp.async_save(state, storage_writer=make_writer(options.get("writer", "stager"), path),
                              async_stager=async_stager, process_group=dcp_group,
                              async_checkpointer_type=checkpointer)
    upload = getattr(response, "upload_completion", response)
    # Training goes on while the upload runs: the checkpoint must not see this step.
    if getattr(response, "staging_completion", None) is not None:
        response.staging_completion.result(timeout=60)
    train(model, optim, 1, 99)
    upload.result(timeout=120)
    peak = async_stager.pool_stats()["peak_bytes"] if isinstance(async_stager, stager.DefaultStager) else None
    if async_stager is not None:
        async_stager.close()
    nbytes = sum(t.numel() * t.element_size() for t in _local_tensors(state))
    report("save", files=sorted(os.listdir(path)), peak_bytes=peak, state_nbytes=nbytes)


def _local_tensors(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _local_tensors(value)
    elif hasattr(tree, "to_local"):
        yield tree.to_local()
    elif isinstance(tree, torch.Tensor):
        yield tree


def scenario_load(rank, world, directory, dcp_group, options):
    path = os.path.join(directory, options["ckpt"])
    model, optim = build(world, 12345)
    train(model, optim, 1, 7)  # different values everywhere, optimizer state initialised
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "step": -1}
    if options.get("plain", True):
        template = plain_part(777)
        state["plain"] = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in template.items()}
    reader = stager.FileSystemReader(path) if options.get("reader", "stager") == "stager" else dcp.FileSystemReader(path)
    dcp.load(state, storage_reader=reader, process_group=dcp_group)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    expected = torch.load(path + ".expected.pt", weights_only=True)
    actual = full_values(model, optim)
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{key} differs after load"
    assert state["step"] == options.get("expect_step", 2), state["step"]
    if options.get("plain", True):
        want = plain_part(options.get("seed", 0))
        for key, value in want.items():
            got = state["plain"][key]
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype and torch.equal(got, value), key
            else:
                assert got == value, (key, got, value)
    report("load", checked=len(expected))


def scenario_hang_in_save(rank, world, directory, dcp_group, options):
    """An async_save of a large state that the test SIGKILLs while it is in flight."""
    path = os.path.join(directory, options["ckpt"])
    numel = options["numel_by_rank"][str(rank)]
    state = {f"big_{rank}": torch.full((numel,), float(rank + 1)), "small": torch.ones(3)}
    async_stager = make_stager("stager")
    dcp.async_save(state, storage_writer=make_writer("stager", path), async_stager=async_stager,
                   process_group=dcp_group)
    report("hang_in_save", started=True)
    time.sleep(options.get("sleep", 60))


SCENARIOS = {"save": scenario_save, "load": scenario_load, "hang_in_save": scenario_hang_in_save}


def main():
    rank, world, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    steps = json.loads(sys.argv[5])
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    dcp_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))
    status = 0
    try:
        for scenario, options in steps:
            try:
                SCENARIOS[scenario](rank, world, directory, dcp_group, options)
            except BaseException:
                print(f"FAILED {scenario} on rank {rank}:\n{traceback.format_exc()}", flush=True)
                status = 1
                break
    finally:
        if status == 0:
            dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(status) if status else sys.exit(0)


if __name__ == "__main__":
    main()
