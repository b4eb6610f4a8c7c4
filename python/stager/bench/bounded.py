"""Rows of the ``persistence`` section for a checkpoint larger than the memory budget
(DESIGN.md, "Bounded host memory").

Workload ``large dcp.async_save, budget 1/4 of the state``: ``dcp.async_save`` (THREAD
checkpointer, one process) of the large state_dict with stager's ``DefaultStager`` and
``FileSystemWriter``, timed from the call until ``upload_completion``:

* ``unbounded pipelined save``: no budget (the whole state staged into one pool buffer, the
  writer writing each storage as its copy lands): the baseline;
* ``budget = state/4, streamed``: ``memory_budget_bytes`` a quarter of the state (targets: time
  >= 0.85x the unbounded save, i.e. a ``vs PyTorch`` column >= 0.85 against that row, and peak
  host-memory growth <= 1.25x the budget).

Each sample also records the checkpoint's host memory: the stager pool's ``peak_bytes`` for that
save (its buffers stay mapped between saves, as in training, so they are part of the process's
RSS before the save starts) plus the process's RSS high-water growth during the save (``VmHWM``
after resetting it through ``/proc/self/clear_refs``: everything else the save touched), and
the caller's wait for ``staging_completion``. The rows ``staging_completion wait, ...`` give
those waits (what bounding costs the training loop); each row's ``extra`` has the host memory /
budget ratios (min / median / max; target <= 1.25 for the streamed save).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from .common import BenchContext, Row

WORKLOAD = "large dcp.async_save, budget 1/4 of the state"
UNBOUNDED = "unbounded pipelined save"
BOUNDED = "budget = state/4, streamed"
WAIT_UNBOUNDED = "staging_completion wait, unbounded"
WAIT_BOUNDED = "staging_completion wait, budget = state/4"


def _high_water() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def rows(ctx: BenchContext, sd: Any, nbytes: int, interleaved: Callable[..., dict[str, list[float]]],
         row: Callable[..., Row]) -> list[Row]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

    from .. import filesystem
    from ..options import StagingOptions
    from ..stagers import DefaultStager

    budget = max(nbytes // 4, 1 << 20)
    directory = os.path.join(ctx.workdir, "dcp-bounded")
    waits: dict[str, list[float]] = {UNBOUNDED: [], BOUNDED: []}
    growth: dict[str, list[float]] = {UNBOUNDED: [], BOUNDED: []}
    stagers = {
        UNBOUNDED: DefaultStager(StagingOptions(use_shared_memory=False, num_threads=ctx.threads)),
        BOUNDED: DefaultStager(StagingOptions(use_shared_memory=False, num_threads=ctx.threads,
                                              memory_budget_bytes=budget)),
    }

    def clear() -> None:
        filesystem.wait_for_cleanup(directory)
        shutil.rmtree(directory, ignore_errors=True)

    def save(name: str) -> Callable[[], None]:
        def run() -> None:
            measured = _reset_high_water()
            before = _high_water()
            start = time.perf_counter()
            response = dcp.async_save(sd, storage_writer=filesystem.FileSystemWriter(directory),
                                      async_stager=stagers[name], no_dist=True,
                                      async_checkpointer_type=AsyncCheckpointerType.THREAD)
            # with an async_stager, async_save returns both completions (else one Future)
            assert isinstance(response, AsyncSaveResponse), type(response)
            response.staging_completion.result()
            waits[name].append(time.perf_counter() - start)
            response.upload_completion.result()
            after = _high_water()
            if measured and before is not None and after is not None:
                growth[name].append(after - before + stagers[name].pool_stats()["peak_bytes"])
        return run

    out: list[Row] = []
    try:
        # Warm both pools (the unbounded one maps the whole state once, as training would).
        for name in stagers:
            clear()
            save(name)()
        for name in stagers:
            waits[name].clear()
            growth[name].clear()
        samples = interleaved(ctx, "dcp.async_save, bounded", [(UNBOUNDED, save(UNBOUNDED), clear),
                                                                 (BOUNDED, save(BOUNDED), clear)])
        for name in (UNBOUNDED, BOUNDED):
            ratios = sorted(g / budget for g in growth[name])
            extra: dict[str, Any] = {"budget_bytes": budget,
                                     "peak_bytes": stagers[name].pool_stats()["peak_bytes"]}
            if ratios:
                extra["host_memory_over_budget"] = {"min": round(ratios[0], 3),
                                               "median": round(statistics.median(ratios), 3),
                                               "max": round(ratios[-1], 3)}
                extra["how"] = (f"host memory (pool peak + RSS growth) / budget: min {ratios[0]:.2f} "
                                f"med {statistics.median(ratios):.2f} max {ratios[-1]:.2f} (target <= 1.25 bounded)")
            out.append(row(WORKLOAD, name, samples[name], baseline=None if name == UNBOUNDED else UNBOUNDED,
                           extra=extra))
        out.append(row(WORKLOAD, WAIT_UNBOUNDED, waits[UNBOUNDED]))
        out.append(row(WORKLOAD, WAIT_BOUNDED, waits[BOUNDED], baseline=WAIT_UNBOUNDED))
    finally:
        clear()
        for stager in stagers.values():
            stager.close()
    return out
