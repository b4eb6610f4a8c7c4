"""Staged results in shared memory cross a process boundary by reference: one descriptor per
buffer, not per tensor, with values and storage sharing intact (real spawn, real pipes)."""

import multiprocessing as mp
import os

import torch

import stager


def _child(conn):
    staged = conn.recv()
    fds = len(os.listdir("/proc/self/fd"))
    view, base = staged["view"], staged["base"]
    tied = view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    keys = sorted(k for k in staged if k.startswith("t"))
    # Plain lists back: tensors would need this process alive until the parent took them.
    values = [staged[k].tolist() for k in keys]
    conn.send((fds, tied, keys, values, view.tolist(), base.tolist()))
    conn.close()


def test_twenty_thousand_tensors_cross_to_a_spawned_process():
    sd = {f"t{i}": torch.full((3,), float(i)) for i in range(20_000)}
    sd["base"] = torch.arange(12.0).reshape(3, 4)
    sd["view"] = sd["base"][1:, ::2]
    with stager.DefaultStager(stager.StagingOptions(use_shared_memory=True, use_async_staging=False)) as s:
        staged = s.stage(sd)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child, args=(child,))
    process.start()
    try:
        parent.send(staged)
        assert parent.poll(120), "child did not answer"
        fds, tied, keys, values, view, base = parent.recv()
    finally:
        process.join(60)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0
    assert fds < 100, f"child holds {fds} descriptors"
    assert tied
    assert view == sd["view"].tolist() and base == sd["base"].tolist()
    assert len(keys) == 20_000
    assert values == [sd[k].tolist() for k in keys]


def test_private_memory_results_still_pickle_through_torch():
    sd = {"w": torch.randn(5)}
    staged = stager.DefaultStager(stager.StagingOptions(use_shared_memory=False, use_async_staging=False)).stage(sd)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child, args=(child,))
    process.start()
    staged["base"] = torch.zeros(2)
    staged["view"] = staged["base"][1:]
    parent.send(staged)
    assert parent.poll(120)
    _, tied, keys, _, _, _ = parent.recv()
    process.join(60)
    assert tied and keys == []
