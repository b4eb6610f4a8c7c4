"""One process saving a state_dict larger than its memory budget (tests/test_bounded_memory.py):
``python bounded_worker.py MODE DIR BUDGET LAYOUT SEED``.

Builds ``state(LAYOUT, SEED)``, resets the RSS high-water mark (``/proc/self/clear_refs``), then
``dcp.async_save``s it into DIR with stager's DefaultStager (``memory_budget_bytes=BUDGET``) and
FileSystemWriter on the THREAD checkpointer:

* ``save``: waits for staging_completion, changes every tensor (training goes on), waits for the
  upload; prints ``RESULT {...}`` with the high-water growth, the pool's peak and the timings;
* ``hold``: prints ``SAVING`` and waits for the upload, so the test can SIGKILL it mid-write;
* ``file``: ``stager.save(sd, DIR/state.stager, stager=...)`` instead (blocking), then the
  same report.

A failed save prints ``RESULT {"error": ...}`` and exits 1.
"""

import json
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import stager

MiB = 1 << 20


def state(layout, seed):
    """The state_dict of a layout: ``many`` (twelve 2 MiB tensors and small ones, 24.6 MiB),
    ``big`` (one 16 MiB tensor among small ones)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "many":
        tensors = {f"layer{i}.weight": torch.randn(512, 1024, generator=gen) for i in range(12)}
        tensors.update({f"layer{i}.bias": torch.randn(1000 + i, generator=gen) for i in range(12)})
        tensors["half"] = torch.randn(300_000, generator=gen).to(torch.bfloat16)
    elif layout == "big":
        tensors = {"embedding": torch.randn(4 * MiB, generator=gen), "norm": torch.randn(4096, generator=gen),
                   "head": torch.randn(64, 1024, generator=gen)}
    else:
        raise ValueError(layout)
    return {"model": tensors, "step": seed, "note": f"layout {layout}"}


def nbytes(tree):
    return sum(t.numel() * t.element_size() for t in tree["model"].values())


def high_water():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class _Saved(Exception):
    """The blocking save of mode ``file`` is done."""


def main():
    warnings.filterwarnings("ignore")
    mode, directory, budget, layout, seed = sys.argv[1:6]
    sd = state(layout, int(seed))
    async_stager = stager.DefaultStager(stager.StagingOptions(use_shared_memory=False,
                                                              memory_budget_bytes=int(budget)))
    writer = stager.FileSystemWriter(directory)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the high-water mark restarts at the current RSS
    before = high_water()
    started = time.perf_counter()
    try:
        if mode == "file":
            stager.save(sd, f"{directory}/state.stager", stager=async_stager)
            staged = time.perf_counter() - started
            raise _Saved
        response = dcp.async_save(sd, storage_writer=writer, async_stager=async_stager,
                                  async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=True)
        if mode == "hold":
            print("SAVING", flush=True)
            response.upload_completion.result(timeout=120)
            return 0
        response.staging_completion.result(timeout=120)
        staged = time.perf_counter() - started
        for tensor in sd["model"].values():
            tensor.add_(1)  # training goes on: the checkpoint must hold the values before this
        response.upload_completion.result(timeout=120)
    except _Saved:
        pass
    except Exception as err:  # reported to the test, which asserts on it
        print("RESULT " + json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        return 1
    finally:
        async_stager.close()
    print("RESULT " + json.dumps({
        "growth": high_water() - before, "budget": int(budget), "state_nbytes": nbytes(sd),
        "peak_bytes": async_stager.pool_stats()["peak_bytes"], "staged_s": staged,
        "saved_s": time.perf_counter() - started,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
