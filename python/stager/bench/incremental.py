"""``incremental`` section of ``stager bench``: copy only what changed (``skip_unchanged=True``).

Two workloads built from real modules and changed by a real optimizer step between saves
(untimed), each staged repeatedly by three stagers measured interleaved, round by round:

* ``lora``: a frozen base of ``--size`` bytes (square linear layers) with rank-8 LoRA adapters and
  Adam over the adapters only (about 1 % of the bytes change per step);
* ``full fine-tune``: a smaller stack of the same layers, every parameter trained by SGD, so
  every byte changes: the price of the bookkeeping.

Rows per workload: stager's ``DefaultStager`` with ``skip_unchanged``, the same without, and
PyTorch's ``DefaultStager`` (``StagingOptions(False, False, False, False)``: synchronous, no
pinning, no shared memory, as a machine without CUDA allows); each row notes the bytes it copied.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch.distributed.checkpoint import staging as torch_staging

from ..options import StagingOptions
from ..stagers import DefaultStager
from .common import BenchContext, Row

SECTION = "incremental"

SKIP = "stager DefaultStager skip_unchanged"
FULL = "stager DefaultStager"
TORCH = "torch DefaultStager"
RANK = 8


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
    options = dict(use_async_staging=False, use_shared_memory=False, num_threads=ctx.threads)
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


def run(ctx: BenchContext) -> list[Row]:
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    try:
        rows = _measure(ctx, "lora", _Workload(max(ctx.size_bytes // 2, 1 << 20), 2048, full_fine_tune=False))
        gc.collect()
        rows += _measure(ctx, "full fine-tune", _Workload(max(ctx.size_bytes // 8, 1 << 20), 1024,
                                                          full_fine_tune=True))
        return rows
    finally:
        torch.set_num_threads(previous_threads)
