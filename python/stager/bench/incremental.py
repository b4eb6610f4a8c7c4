"""``incremental`` section of ``stager bench``: copy only what changed (``skip_unchanged=True``).

Two workloads built from real modules and changed by a real optimizer step between saves
(untimed), each staged repeatedly by three stagers measured interleaved, round by round:

* ``lora``: a frozen base of half ``--size`` (square linear layers of width 2048) with rank-4 LoRA
  adapters and Adam over the adapters only (1.2 % of the bytes change per step: the adapters and
  their two Adam moments, 3 x 2 x 4 x 2048 floats per 2048 x 2048 base layer);
* ``full fine-tune``: a smaller stack of the same layers, every parameter trained by SGD, so
  every byte changes: the price of the bookkeeping.

Rows per workload: stager's ``DefaultStager`` with ``skip_unchanged``, the same without, and
PyTorch's ``DefaultStager`` (``StagingOptions(False, False, False, False)``: synchronous, no
pinning, no shared memory, as a machine without CUDA allows); each row notes the bytes it copied.

Then ``<workload> exchange``: two spawned ranks (gloo on 127.0.0.1, the helpers of the
``recovery`` section) each hold the same workload (at most :data:`MAX_EXCHANGE_BYTES_PER_RANK`)
and swap it with ``ReplicationStager(persist_format=None)``, with and without
``skip_unchanged``, after the same untimed optimizer step per round, interleaved round by round.
A timed call starts after a barrier and its time is the slower rank's. Each row notes the bytes
this rank sent on the wire (``last_sent``: headers, metadata, state bytes and the agreement's
all-gathers). Both stagers keep the replica of their previous call, as in training (the one with
``skip_unchanged`` builds from it); two untimed rounds, each after an optimizer step, bring both
to the steady state where the pool recycles the replica two steps old.
"""

from __future__ import annotations

import datetime
import gc
import statistics
import time
import traceback
from functools import partial
from typing import Any

import torch
from torch.distributed.checkpoint import staging as torch_staging

from ..options import StagingOptions
from ..stagers import DefaultStager
from .common import BenchContext, Row, run_ranks, timed_on_all_ranks

SECTION = "incremental"

SKIP = "stager DefaultStager skip_unchanged"
FULL = "stager DefaultStager"
TORCH = "torch DefaultStager"
#: LoRA rank: 4 makes the adapters and their Adam state ~1 % of the dict, as issue 12 describes.
RANK = 4

EXCHANGE_SKIP = "stager ReplicationStager skip_unchanged"
EXCHANGE_FULL = "stager ReplicationStager"
#: Bytes of the exchanged workload per rank: each of the two local ranks holds it, both stagers'
#: replicas and the one being received.
MAX_EXCHANGE_BYTES_PER_RANK = 1_000_000_000


class _LoRALinear(torch.nn.Module):
    """A frozen square weight plus a trainable low-rank update."""

    def __init__(self, width: int, trainable_base: bool) -> None:
        super().__init__()
        self.base = torch.nn.Linear(width, width, bias=False)
        self.base.weight.requires_grad_(trainable_base)
        self.lora_a = torch.nn.Parameter(torch.randn(RANK, width) * 0.01)
        self.lora_b = torch.nn.Parameter(torch.zeros(width, RANK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


class _Workload:
    def __init__(self, total_bytes: int, width: int, full_fine_tune: bool) -> None:
        layers = max(1, total_bytes // (width * width * 4))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*(_LoRALinear(width, full_fine_tune) for _ in range(layers)))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (torch.optim.SGD(trainable, lr=1e-3) if full_fine_tune
                          else torch.optim.Adam(trainable, lr=1e-3))
        self.width = width
        self.step()  # optimizer state exists from here on

    def step(self) -> None:
        x = torch.randn(4, self.width)
        self.optimizer.zero_grad(set_to_none=False)
        self.model(x).square().mean().backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}


def _stagers(ctx: BenchContext) -> dict[str, Any]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_stager = torch_staging.DefaultStager(torch_staging.StagingOptions(False, False, False, False))
    options: dict[str, Any] = dict(use_async_staging=False, use_shared_memory=False, num_threads=ctx.threads)
    return {
        SKIP: DefaultStager(StagingOptions(skip_unchanged=True, **options)),
        FULL: DefaultStager(StagingOptions(**options)),
        TORCH: torch_stager,
    }


def _measure(ctx: BenchContext, name: str, workload: _Workload) -> list[Row]:
    state = workload.state_dict()
    nbytes = ctx.nbytes_of(state)
    ntensors = ctx.count_tensors(state)
    ctx.log(f"  [{name}] {nbytes / 1e9:.3f} GB in {ntensors} tensors")
    stagers = _stagers(ctx)
    for stager in stagers.values():  # first calls (fresh memory, empty trackers) are not measured
        del state
        state = workload.state_dict()
        stager.stage(state)
    samples: dict[str, list[float]] = {row: [] for row in stagers}
    copied: dict[str, list[int]] = {row: [] for row in stagers}
    order = list(stagers)
    for round_index in ctx.progress(range(ctx.repeats), f"{name}: stage after an optimizer step"):
        workload.step()  # untimed: what changed between two checkpoints
        shift = round_index % len(order)
        for row in order[shift:] + order[:shift]:
            state = workload.state_dict()
            gc.collect()
            start = time.perf_counter()
            result = stagers[row].stage(state)
            samples[row].append(time.perf_counter() - start)
            del result
            tracker = getattr(getattr(stagers[row], "_engine", None), "unchanged", None)
            copied[row].append(tracker.copied_nbytes if tracker is not None else nbytes)
    for stager in stagers.values():
        stager.close()
    rows = []
    for row, times in samples.items():
        median_copied = sorted(copied[row])[len(copied[row]) // 2]
        summary = f"copies {median_copied / 1e6:.1f} MB ({100 * median_copied / max(nbytes, 1):.1f} %)"
        rows.append(ctx.row(SECTION, name, row, times, nbytes=nbytes, ntensors=ntensors,
                            baseline=None if row == TORCH else TORCH,
                            extra={"copied_bytes": median_copied, "summary": summary}))
    skip, full = (next(r for r in rows if r.name == n) for n in (SKIP, FULL))
    skip.extra["summary"] += f"; {full.seconds / skip.seconds:.1f}x the full stager"
    return rows


def _workloads(size_bytes: int) -> list[tuple[str, int, int, bool]]:
    """(name, bytes, layer width, full fine-tune) of the two workloads."""
    return [("lora", max(size_bytes // 2, 1 << 20), 2048, False),
            ("full fine-tune", max(size_bytes // 8, 1 << 20), 1024, True)]


def run(ctx: BenchContext) -> list[Row]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    try:
        rows: list[Row] = []
        for name, nbytes, width, full_fine_tune in _workloads(ctx.size_bytes):
            rows += _measure(ctx, name, _Workload(nbytes, width, full_fine_tune))
            gc.collect()
    finally:
        torch.set_num_threads(previous_threads)
    return rows + _exchange_rows(ctx)


# ---- exchange (two ranks) -------------------------------------------------------------------------


def _exchange_rows(ctx: BenchContext) -> list[Row]:
    size_bytes = min(ctx.size_bytes, 2 * MAX_EXCHANGE_BYTES_PER_RANK)
    settings = {"size_bytes": size_bytes, "repeats": ctx.repeats, "threads": ctx.threads,
                "workloads": [(f"{name} exchange", min(nbytes, MAX_EXCHANGE_BYTES_PER_RANK), width, full)
                              for name, nbytes, width, full in _workloads(size_bytes)]}
    ctx.drop_workloads()
    report = run_ranks(ctx, 2, _exchange_worker, settings, what="incremental exchange",
                       deadline_s=600 + 60 * ctx.repeats * max(1.0, size_bytes / 1e9))
    rows: list[Row] = []
    for workload, data in report.items():
        size = {"nbytes": data["nbytes"], "ntensors": data["ntensors"]}
        measured = {}
        for name in (EXCHANGE_SKIP, EXCHANGE_FULL):
            wire, state_bytes = (statistics.median(data[key][name]) for key in ("wire", "data"))
            summary = (f"sends {wire / 1e6:.1f} MB on the wire ({100 * wire / max(data['nbytes'], 1):.2f} % of the "
                       f"dict; {state_bytes / 1e6:.1f} MB of it state bytes)")
            measured[name] = ctx.row(SECTION, workload, name, data["samples"][name], **size,
                                     extra={"wire_bytes": int(wire), "wire_state_bytes": int(state_bytes),
                                            "summary": summary})
        skip, full = measured[EXCHANGE_SKIP], measured[EXCHANGE_FULL]
        skip.extra["time_vs_without"] = skip.seconds / full.seconds if full.seconds > 0 else None
        skip.extra["summary"] += f"; {full.seconds / skip.seconds:.1f}x faster than without skip_unchanged"
        rows += [skip, full]
    return rows


def _exchange_worker(rank: int, world: int, port: int, settings: dict, results: Any) -> None:
    try:
        import torch.distributed as dist

        torch.set_num_threads(max(1, settings["threads"] // world))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        try:
            report = _measure_exchange(rank, settings, results)
        finally:
            dist.destroy_process_group()
        results.put(("report", report) if rank == 0 else ("done", None))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _measure_exchange(rank: int, settings: dict, results: Any) -> dict[str, Any]:
    import torch.distributed as dist

    from ..replication import ReplicationStager

    def log(message: str) -> None:
        if rank == 0:
            results.put(("log", message))

    pg = dist.distributed_c10d._get_default_group()
    timeout = datetime.timedelta(minutes=10)

    timed = timed_on_all_ranks

    def measure(workload_name: str, workload: _Workload) -> dict[str, Any]:
        state = workload.state_dict()
        size = BenchContext.nbytes_of(state)
        ntensors = BenchContext.count_tensors(state)
        log(f"  [{workload_name}] {size / 1e9:.3f} GB in {ntensors} tensors per rank, 2 ranks over gloo")
        stagers = {EXCHANGE_SKIP: ReplicationStager(pg, timeout, persist_format=None, skip_unchanged=True),
                   EXCHANGE_FULL: ReplicationStager(pg, timeout, persist_format=None)}
        for _ in range(2):  # warm the pools (both hold a replica while receiving the next one)
            workload.step()
            state = workload.state_dict()
            for replicator in stagers.values():
                timed(partial(replicator.stage, state))
        samples: dict[str, list[float]] = {name: [] for name in stagers}
        wire: dict[str, list[int]] = {name: [] for name in stagers}
        data: dict[str, list[int]] = {name: [] for name in stagers}
        order = list(stagers)
        for round_ in range(settings["repeats"]):
            workload.step()  # untimed: what changed between two checkpoints
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                replicator = stagers[name]
                state = workload.state_dict()
                samples[name].append(timed(partial(replicator.stage, state)))
                wire[name].append(replicator.last_sent.total)
                data[name].append(replicator.last_sent.data)
            log(f"  [{workload_name}] round {round_ + 1}/{settings['repeats']}: "
                + ", ".join(f"{name} {samples[name][-1]:.3f}s ({wire[name][-1] / 1e6:.1f} MB)" for name in order))
        for replicator in stagers.values():
            replicator.close()
        return {"nbytes": size, "ntensors": ntensors, "samples": samples, "wire": wire, "data": data}

    report: dict[str, Any] = {}
    for workload_name, nbytes, width, full_fine_tune in settings["workloads"]:
        report[workload_name] = measure(workload_name, _Workload(nbytes, width, full_fine_tune))
        gc.collect()
    return report
