"""One rank of a shared-memory restart test: ``python shm_worker.py RANK WORLD PORT DIR STEPS_JSON``.

Joins a gloo group on 127.0.0.1 and runs each ``[action, options]`` of STEPS_JSON: ``stage``
replicates a deterministic state_dict for each step of ``options["steps"]`` with
``ReplicationStager(survive_restart=True)``; ``restore`` restores into a zeroed state_dict of the
same structure in a fresh stager and checks it equals the state of the step restored. Each
action prints ``RESULT {...}``. The storage_dir is ``DIR/node{rank // ranks_per_node}`` (one
directory per simulated node). The process then exits without releasing anything: the next
process (the "restarted" worker) finds the segments.
"""

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import stager


def state(rank, step):
    gen = torch.Generator().manual_seed(7 + 31 * rank + 1009 * step)
    base = torch.randn(256, 64, generator=gen)
    return {"model": {"weight": base, "row": base[5], "bias": torch.arange(9, dtype=torch.int64) + step},
            "meta": {"step": step, "rank": rank}}


def incremental_state(rank, step):
    """What action_stage leaves with ``incremental``: step 1's state whose bias alone changed
    (in place) at every later step."""
    sd = state(rank, 1)
    sd["model"]["bias"] += step - 1
    sd["meta"]["step"] = step
    return sd


def zeroed(rank):
    sd = state(rank, 0)
    fresh = torch.zeros(256, 64)
    return {"model": {"weight": fresh, "row": fresh[5], "bias": torch.zeros(9, dtype=torch.int64)},
            "meta": sd["meta"]}


def replicator(rank, directory, options):
    rpn = options.get("ranks_per_node", 2)
    node_dir = os.path.join(directory, f"node{rank // rpn}")
    return stager.ReplicationStager(timeout=datetime.timedelta(seconds=60), storage_dir=node_dir,
                                    ranks_per_node=rpn, keep_own=options.get("keep_own", True),
                                    persist_format=options.get("persist_format", "stager"),
                                    survive_restart=options.get("survive_restart", True),
                                    skip_unchanged=options.get("incremental", False))


def action_stage(rank, world, directory, options):
    rep = replicator(rank, directory, options)
    sent = []
    if options.get("incremental"):
        sd = state(rank, 1)
        for step in options["steps"]:
            if step > 1:
                sd["model"]["bias"].add_(1)  # only this storage changes: the rest is not sent again
                sd["meta"]["step"] = step
            rep.stage(sd, step=step)
            sent.append(rep.last_sent.data)
    else:
        results = [rep.stage(state(rank, step), step=step) for step in options["steps"]]
        # a result handed out is never overwritten, even when its generation's file is dropped
        source = rep.peers(rank, world)[1]
        held_intact = all(torch.equal(result["model"]["weight"], state(source, step)["model"]["weight"])
                          for result, step in zip(results, options["steps"]))
        return {"held_intact": held_intact,
                "segments": sorted(os.path.basename(s.path) for s in stager.segments.find_segments(rep.storage_dir))}
    return {"sent": sent, "segments": sorted(os.path.basename(s.path) for s in stager.segments.find_segments(rep.storage_dir))}


def action_stage_too_big(rank, world, directory, options):
    """Stages step 1, then a step 2 too big for the shared-memory directory: every rank must
    raise the same StagerError and keep step 1."""
    rep = replicator(rank, directory, options)
    rep.stage(state(rank, 1), step=1)
    big = state(rank, 2)
    big["model"]["huge"] = torch.zeros(1 << 20)  # 4 MiB
    try:
        rep.stage(big, step=2)
    except stager.StagerError as err:
        error = str(err)
    else:
        error = None
    return {"error": error, "segments": sorted(os.path.basename(s.path)
                                               for s in stager.segments.find_segments(rep.storage_dir))}


def action_restore(rank, world, directory, options):
    rep = replicator(rank, directory, options)
    into = zeroed(rank)
    weight = into["model"]["weight"]
    try:
        result = rep.restore(into=into)
    except stager.StagerError as err:
        return {"error": str(err)}
    step = rep.last_restore["step"]
    expected = incremental_state(rank, step) if options.get("incremental") else state(rank, step)
    same = (torch.equal(result["model"]["weight"], expected["model"]["weight"])
            and torch.equal(result["model"]["bias"], expected["model"]["bias"])
            and result["model"]["row"].untyped_storage().data_ptr() == result["model"]["weight"].untyped_storage().data_ptr()
            and result["model"]["weight"] is weight and result["meta"] == expected["meta"])
    return {"step": step, "same": same, "tier": rep.last_restore["tier"], "server": rep.last_restore["server"],
            "received": rep.last_restore["received_bytes"]}


def main():
    rank, world, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    actions = json.loads(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    ok = True
    try:
        for action, options in actions:
            try:
                result = globals()["action_" + action](rank, world, directory, options)
            except Exception:
                result = {"exception": traceback.format_exc()}
                ok = False
            print("RESULT " + json.dumps({"scenario": action, **result}), flush=True)
    finally:
        dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
