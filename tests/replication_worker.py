"""One rank of a replication test: ``python replication_worker.py RANK WORLD PORT DIR STEPS_JSON``.

Joins a gloo group on 127.0.0.1 (once: starting Python and torch is the slow part on a busy
2-core machine), runs each ``[scenario, options]`` of STEPS_JSON in order, each in its own
subdirectory of DIR (``options["subdir"]``, default the scenario's name), prints one JSON line
``RESULT {...}`` per scenario and exits by itself (exit code 0 when every check passed).
"""

import datetime
import json
import os
import signal
import sys
import time
import traceback
from collections import OrderedDict, namedtuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stager  # noqa: E402
from stager import transport as transport_module  # noqa: E402

from helpers import assert_same_tree  # noqa: E402

Point = namedtuple("Point", "x y")


def make_state_dict(rank, *, big_numel=0, step=0):
    """A deterministic state_dict per rank: nesting, views, non-tensor leaves, dtypes."""
    gen = torch.Generator().manual_seed(1000 + rank + 100 * step)
    base = torch.randn(64, 32, generator=gen)
    sd = {
        "model": OrderedDict(
            weight=base,
            weight_t=base.t(),  # a view: same storage, other strides
            row=base[3],  # a view with a storage offset
            bias=torch.arange(7, dtype=torch.int64) + rank,
            half=torch.randn(5, 3, generator=gen).to(torch.bfloat16),
            flags=torch.tensor([True, False, rank % 2 == 0]),
            empty=torch.empty(0, 4),
        ),
        "optim": {
            "state": {0: {"step": torch.tensor(float(step + rank)), "exp_avg": torch.randn(33, generator=gen)}},
            "param_groups": [{"lr": 0.001 * (rank + 1), "betas": (0.9, 0.999), "name": f"group-{rank}",
                              "nesterov": rank % 2 == 1, "eps": None}],
        },
        "extra": {"rank": rank, "step": step, "pair": (rank, "y"), "blob": bytes([rank, 1, 2]),
                  "dtype": torch.float16, "scale": 1.5, "inf": float("inf")},
    }
    if big_numel:
        sd["model"]["big"] = torch.arange(big_numel, dtype=torch.float32) * (rank + 1)
    return sd


_current = {}


def report(**fields):
    print("RESULT " + json.dumps({"scenario": _current.get("name"), **fields}), flush=True)


def check_views(received):
    model = received["model"]
    assert model["weight_t"].untyped_storage().data_ptr() == model["weight"].untyped_storage().data_ptr()
    assert model["row"].untyped_storage().data_ptr() == model["weight"].untyped_storage().data_ptr()
    assert model["row"].storage_offset() == 3 * 32


def main():
    rank, world, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    steps = json.loads(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for scenario, options in steps:
            _current["name"] = options.get("subdir", scenario)
            subdir = os.path.join(directory, _current["name"])
            os.makedirs(subdir, exist_ok=True)
            globals()["scenario_" + scenario](rank, world, subdir, options)
    finally:
        dist.destroy_process_group()


def scenario_exchange(rank, world, directory, options):
    topology = options.get("topology", "pairs")
    fmt = options.get("persist_format", "stager")
    big = options.get("big_numel", 0)
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=30), storage_dir=directory,
                                          topology=topology, persist_format=fmt)
    assert replicator.should_synchronize_after_execute is False
    dst, src = replicator.peers(rank, world)
    if topology == "pairs" and world % 2 == 0:
        assert dst == src == (rank + world // 2) % world
    else:
        assert (dst, src) == ((rank + 1) % world, (rank - 1) % world)
    for step in range(options.get("steps", 1)):
        mine = make_state_dict(rank, big_numel=big, step=step)
        received = replicator.stage(mine)
        assert_same_tree(received, make_state_dict(src, big_numel=big, step=step))
        check_views(received)
        path = os.path.join(directory, f"rank_{rank}_replica_partner_{src}.{'pt' if fmt == 'torch' else 'stager'}")
        assert os.path.exists(path), path
        # the input is untouched
        assert_same_tree(mine, make_state_dict(rank, big_numel=big, step=step))
    assert not [name for name in os.listdir(directory) if name.startswith(f"rank_{rank}_") and name.endswith(".tmp")]
    report(rank=rank, src=src, dst=dst)


def scenario_transport(rank, world, directory, options):
    """PGTransport with PyTorch's interface: send/recv one way, in place, tiny buckets."""
    pg = dist.distributed_c10d._get_default_group()
    sd = make_state_dict(0, big_numel=5000)
    if rank == 0:
        transport = stager.PGTransport(pg, datetime.timedelta(seconds=20), torch.device("cpu"),
                                       bucket_bytes=512, chunk_bytes=4096)
        transport.send_checkpoint([r for r in range(1, world)], sd)
        report(rank=rank)
        return
    targets = make_state_dict(5)  # same shapes, other values
    targets["model"]["big"] = torch.zeros(5000)
    pointers = {key: t.untyped_storage().data_ptr() for key, t in targets["model"].items()}
    transport = stager.PGTransport(pg, datetime.timedelta(seconds=20), torch.device("cpu"),
                                   state_dict=lambda: targets, bucket_bytes=512, chunk_bytes=4096)
    received = transport.recv_checkpoint(0)
    assert_same_tree(received, sd)
    check_views(received)
    inplace = [key for key, t in received["model"].items()
               if t.numel() and t.untyped_storage().data_ptr() == pointers[key]]
    # every tensor with a same-sized storage at the same key received in place
    assert {"weight", "weight_t", "row", "bias", "big"} <= set(inplace), inplace
    assert torch.equal(targets["model"]["big"], sd["model"]["big"])
    report(rank=rank, inplace=sorted(inplace))


class Opaque:
    """A leaf that can't travel without pickle."""


def scenario_unsendable(rank, world, directory, options):
    """Rank 1's dict has a leaf that needs pickle: both ranks fail at once (no timeout) with a
    StagerError that says why, and the previous replicas stay."""
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=30), storage_dir=directory)
    replicator.stage(make_state_dict(rank))
    sd = make_state_dict(rank, step=1)
    if rank == 1:
        sd["extra"]["opaque"] = Opaque()
    started = time.monotonic()
    try:
        replicator.stage(sd)
    except stager.StagerError as err:
        elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed
        assert "Opaque" in str(err) and ("rank 1" in str(err) or rank == 1), str(err)
        assert_same_tree(stager.recover(directory, 1 - rank), make_state_dict(1 - rank))
        report(rank=rank, error=str(err), elapsed=elapsed)
        return
    raise AssertionError("stage() accepted a leaf that needs pickle")


def _prepare_failure(rank, world, directory, options):
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=options["timeout"]),
                                          storage_dir=directory, persist_format=options.get("persist_format", "stager"))
    replicator.stage(make_state_dict(rank, step=0))  # a good replica first
    return replicator


def _check_after_failure(rank, world, directory, err, started, partner):
    elapsed = time.monotonic() - started
    assert isinstance(err, stager.StagerError), repr(err)
    assert f"rank {partner}" in str(err), str(err)
    leftovers = [name for name in os.listdir(directory) if name.startswith(f"rank_{rank}_") and name.endswith(".tmp")]
    assert not leftovers, leftovers
    previous = stager.recover(directory, partner)
    assert_same_tree(previous, make_state_dict(partner, step=0))
    report(rank=rank, elapsed=elapsed, error=str(err))


def scenario_killed(rank, world, directory, options):
    """Rank ``victim`` dies (SIGKILL) in the middle of exchanging a large dict."""
    victim = options.get("victim", 1)
    replicator = _prepare_failure(rank, world, directory, options)
    if rank == victim:
        original = transport_module.PGTransport._send

        def die_mid_send(self, tensor, dst, seq, index, peer):
            # The third data segment is never posted: the partner can't have received it all.
            if index >= transport_module._TAG_FIRST_SEGMENT + 2 and index != transport_module._TAG_ACK:
                time.sleep(0.2)  # let the first segments reach the partner
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, tensor, dst, seq, index, peer)

        transport_module.PGTransport._send = die_mid_send
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=options["big_numel"], step=1))
    except Exception as err:  # noqa: BLE001 - checked below
        _check_after_failure(rank, world, directory, err, started, victim)
        os._exit(0)  # the group is broken: don't wait on it at exit
    raise AssertionError(f"rank {rank}: stage() succeeded although rank {victim} died")


def scenario_stall(rank, world, directory, options):
    """Rank ``victim`` never calls stage() a second time; the others must fail within the timeout."""
    victim = options.get("victim", 1)
    replicator = _prepare_failure(rank, world, directory, options)
    if rank == victim:
        time.sleep(options["timeout"] + options.get("linger", 3))
        report(rank=rank, stalled=True)
        os._exit(0)
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=options.get("big_numel", 0), step=1))
    except Exception as err:  # noqa: BLE001 - checked below
        _check_after_failure(rank, world, directory, err, started, victim)
        os._exit(0)
    raise AssertionError(f"rank {rank}: stage() succeeded although rank {victim} never called it")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
