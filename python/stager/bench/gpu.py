"""``gpu`` section of ``stager bench``: staging a state_dict off the GPU, stager vs PyTorch vs the link.

Workload ``large from GPU``: the synthetic transformer + Adam state_dict (``--size``) moved to the
current CUDA device. Rows:

* ``limit: one D2H copy into pinned memory``: a single device-to-host copy of as many bytes into
  memory pinned beforehand: what the link gives;
* ``one D2H copy into pageable memory``: the same into ordinary (already touched) memory;
* stager ``DefaultStager`` repeat calls (pool pinned once, recycled), first call of a new stager
  after ``reserve()`` (pinned in the background beforehand) and first call without it;
* PyTorch's ``DefaultStager`` (its defaults: pinned, shared, async, non-blocking) first and repeat
  calls: the baselines.

Workload ``training stall``: a loop of bf16 matmuls on the same GPU, timed alone and while an
async stage of the state_dict runs beside it (stager's and PyTorch's); the row's ``extra`` gives
the slowdown in percent. The loop is calibrated to last about two seconds, longer than the stage.

Every stage is timed until its result is available (``Future.result()``), after a
``torch.cuda.synchronize()`` so earlier work is not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from .. import _native
from ..device import native_cuda_available
from ..options import StagingOptions
from ..plan import plan_state_dict
from ..stagers import DefaultStager
from .common import BenchContext, Row, SectionSkipped

SECTION = "gpu"
LARGE = "large from GPU"
STALL = "training stall"
LIMIT = "limit: one D2H copy into pinned memory"
PAGEABLE = "one D2H copy into pageable memory"
STAGER_REPEAT = "stager DefaultStager repeat"
STAGER_FIRST_RESERVED = "stager DefaultStager first call after reserve()"
STAGER_FIRST = "stager DefaultStager first call (no reserve)"
TORCH_REPEAT = "torch DefaultStager repeat"
TORCH_FIRST = "torch DefaultStager first call"
LOOP_ALONE = "matmul loop alone"
LOOP_STAGER = "matmul loop + stager async stage"
LOOP_TORCH = "matmul loop + torch async stage"


def run(ctx: BenchContext) -> list[Row]:
    if not torch.cuda.is_available():
        raise SectionSkipped("no CUDA device")
    if not native_cuda_available():
        raise SectionSkipped(f"stager's CUDA path is unavailable: {_native.cuda_unavailable_reason()}")
    device = torch.device("cuda", torch.cuda.current_device())
    ctx.log(f"  moving the state_dict to {device} ({torch.cuda.get_device_name(device)})")
    state_dict = _to_device(ctx.large_state_dict(), device)
    torch.cuda.synchronize(device)
    rows: list[Row] = []
    try:
        rows += _transfer_rows(ctx, state_dict, device)
        rows += _stall_rows(ctx, state_dict, device)
    finally:
        del state_dict
        torch.cuda.empty_cache()
    return rows


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)((k, _to_device(v, device)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _stage(stager: Any, state_dict: Any) -> Any:
    result = stager.stage(state_dict)
    return result.result() if hasattr(result, "result") else result


def _torch_stager() -> Any:
    from torch.distributed.checkpoint import staging as torch_staging

    return torch_staging.DefaultStager(torch_staging.StagingOptions())


def _guarded(fn: Callable[[], list[float]]) -> tuple[list[float], str | None]:
    try:
        return fn(), None
    except Exception as err:
        return [], f"{type(err).__name__}: {err}"


# ---- transfer rows ------------------------------------------------------------------------------
def _transfer_rows(ctx: BenchContext, state_dict: Any, device: torch.device) -> list[Row]:
    nbytes = ctx.nbytes_of(state_dict)
    ntensors = ctx.count_tensors(state_dict)
    size = dict(nbytes=nbytes, ntensors=ntensors)
    rows: list[Row] = []
    failures: dict[str, str] = {}
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731

    def add(name: str, samples: list[float], **kwargs: Any) -> None:
        if samples:
            rows.append(ctx.row(SECTION, LARGE, name, samples, **size, **kwargs))

    ctx.log(f"  [{LARGE}] {nbytes / 1e9:.3f} GB in {ntensors} tensors")

    # The link: one copy of as many bytes, into pinned and into pageable (touched) memory.
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0x5A)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(0)

    def pinned_copy() -> None:
        pinned.copy_(source, non_blocking=True)
        sync()

    add(LIMIT, ctx.measure(f"{LARGE}: {LIMIT}", pinned_copy, setup=sync, warmup=1),
        extra={"how": "tensor.copy_(non_blocking=True) into torch.empty(pin_memory=True), then synchronize"})
    pinned = None  # type: ignore[assignment]  # free the pinned copy before the pageable one is made
    pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    add(PAGEABLE, ctx.measure(f"{LARGE}: {PAGEABLE}", lambda: pageable.copy_(source), setup=sync,
                              repeats=max(1, min(ctx.repeats, 3))),
        limit=LIMIT, extra={"how": "tensor.copy_ into already touched ordinary memory"})
    pageable = source = None  # type: ignore[assignment]  # free them before the next rows
    torch.cuda.empty_cache()

    options = StagingOptions(num_threads=ctx.threads)
    note = "StagingOptions() defaults (pinned, shared, async, non-blocking); timed until the Future's result"

    # stager, repeat calls: the pool was pinned on the first (warm-up) call and is recycled.
    with DefaultStager(options) as stager:
        samples = ctx.measure(f"{LARGE}: {STAGER_REPEAT}", lambda: _stage(stager, state_dict), setup=sync, warmup=2)
        stats = stager.pool_stats()
        is_pinned = stager._engine.pool.pinned
    add(STAGER_REPEAT, samples, limit=LIMIT, baseline=TORCH_REPEAT,
        extra={"options": note, "pool_pinned": is_pinned, "pool_allocations": stats["allocations"],
               "pool_reuses": stats["reuses"]})

    # PyTorch, repeat calls (its cached pinned storages are reused).
    def torch_repeat() -> list[float]:
        stager = _torch_stager()
        try:
            return ctx.measure(f"{LARGE}: {TORCH_REPEAT}", lambda: _stage(stager, state_dict), setup=sync, warmup=2)
        finally:
            stager.close()

    samples, error = _guarded(torch_repeat)
    if error:
        failures[TORCH_REPEAT] = error
    add(TORCH_REPEAT, samples, limit=LIMIT, extra={"options": "torch StagingOptions() defaults"})

    # First calls: a new stager each time. stager's pool is reserved (pinned) beforehand, untimed.
    reserve_bytes = plan_state_dict(state_dict).total_nbytes
    add(STAGER_FIRST_RESERVED,
        _first_calls(ctx, STAGER_FIRST_RESERVED, lambda: DefaultStager(options), state_dict, reserve_bytes),
        limit=LIMIT, baseline=TORCH_FIRST, extra={"options": note, "reserved_bytes": reserve_bytes})
    add(STAGER_FIRST, _first_calls(ctx, STAGER_FIRST, lambda: DefaultStager(options), state_dict, None),
        limit=LIMIT, baseline=TORCH_FIRST, extra={"options": note, "note": "pins its pool buffer inside the call"})
    samples, error = _guarded(lambda: _first_calls(ctx, TORCH_FIRST, _torch_stager, state_dict, None))
    if error:
        failures[TORCH_FIRST] = error
    add(TORCH_FIRST, samples, limit=LIMIT, extra={"options": "torch StagingOptions() defaults"})

    for row in rows:
        if row.baseline in failures:
            row.extra["baseline_failed"] = failures[row.baseline]
    for name, error in failures.items():
        ctx.log(f"  [{LARGE}] {name} failed: {error}")
    return rows


def _first_calls(ctx: BenchContext, name: str, make: Callable[[], Any], state_dict: Any,
                 reserve: int | None) -> list[float]:
    samples = []
    for _ in ctx.progress(range(ctx.repeats), f"{LARGE}: {name}"):
        stager = make()
        try:
            if reserve is not None:
                stager.reserve(reserve)
                stager._engine.pool.finish_reservations()
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = _stage(stager, state_dict)
            samples.append(time.perf_counter() - start)
            del result
        finally:
            stager.close()
    return samples


# ---- training stall -----------------------------------------------------------------------------
def _stall_rows(ctx: BenchContext, state_dict: Any, device: torch.device) -> list[Row]:
    n = 4096
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def loop(steps: int) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    loop(20)  # warm-up (cuBLAS heuristics, clocks)
    per_step = loop(200) / 200
    steps = max(50, int(2.0 / max(per_step, 1e-6)))
    flops = 2 * n**3 * steps
    ctx.log(f"  [{STALL}] {steps} bf16 {n}x{n} matmuls per loop ({per_step * 1e3:.3f} ms each)")

    def alongside(stager: Any) -> tuple[float, float]:
        _stage(stager, state_dict)  # warm: pool pinned / torch's cache filled
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        future = stager.stage(state_dict)
        loop_seconds = loop(steps)
        result = future.result() if hasattr(future, "result") else future
        stage_seconds = time.perf_counter() - start
        del result
        return loop_seconds, stage_seconds

    def measure_alongside(name: str, make: Callable[[], Any]) -> tuple[list[float], list[float]]:
        stager = make()
        loops, stages = [], []
        try:
            for _ in ctx.progress(range(ctx.repeats), f"{STALL}: {name}"):
                loop_seconds, stage_seconds = alongside(stager)
                loops.append(loop_seconds)
                stages.append(stage_seconds)
        finally:
            stager.close()
        return loops, stages

    rows: list[Row] = []
    alone = [loop(steps) for _ in ctx.progress(range(ctx.repeats), f"{STALL}: {LOOP_ALONE}")]
    base = statistics.median(alone)
    rows.append(ctx.row(SECTION, STALL, LOOP_ALONE, alone,
                        extra={"steps": steps, "matmul": f"bf16 {n}x{n}", "tflops": round(flops / base / 1e12, 1)}))
    staged_bytes = ctx.nbytes_of(state_dict)
    for name, make, baseline in (
        (LOOP_STAGER, lambda: DefaultStager(StagingOptions(num_threads=ctx.threads)), LOOP_TORCH),
        (LOOP_TORCH, _torch_stager, None),
    ):
        (loops, stages), error = _guarded_pair(partial(measure_alongside, name, make))
        if error:
            ctx.log(f"  [{STALL}] {name} failed: {error}")
            continue
        median = statistics.median(loops)
        rows.append(ctx.row(SECTION, STALL, name, loops, limit=LOOP_ALONE, baseline=baseline, extra={
            "slowdown_pct": round((median / base - 1) * 100, 2),
            "stage_seconds_median": round(statistics.median(stages), 4),
            "staged_bytes": staged_bytes,
            "note": "loop time while an async stage (repeat call) runs beside it; the stage must end within the loop",
        }))
    return rows


def _guarded_pair(fn: Callable[[], tuple[list[float], list[float]]]) -> tuple[tuple[list[float], list[float]], str | None]:
    try:
        return fn(), None
    except Exception as err:
        return ([], []), f"{type(err).__name__}: {err}"
