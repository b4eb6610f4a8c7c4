"""``staging`` section of ``stager bench``: stager's stagers vs PyTorch's vs the machine's limits.

Two workloads, each measured against the same rows:

* ``large``: the synthetic transformer + Adam state_dict (``--size``): bandwidth;
* ``tiny``: ``--tiny`` small tensors: the cost per tensor.

Rows per workload:

* the machine's limits (``stager._native.copy_limit_seconds``, a plain parallel memcpy of one
  buffer of the same size, split evenly over the same number of threads, independent of stager's
  engine): into already-touched memory, into fresh private memory, into fresh shared memory;
* stager's ``DefaultStager`` with private and with shared memory: repeat calls (results dropped
  between calls, so the pool recycles; compared with the touched-memory limit), the first call of
  a new stager (fresh memory; compared with the fresh limit of the same kind), the first call after
  ``reserve()`` (compared with the touched-memory limit);
* PyTorch's ``DefaultStager`` with the same options as far as a machine without CUDA allows, and
  both ``BlockingAsyncStager``s (no cache, a new stager per call: PyTorch's allocates with the C
  allocator, which recycles freed memory; stager's recycles through its process-wide pool);
* for ``tiny``: ``torch._foreach_copy_`` into preallocated tensors, PyTorch's per-tensor floor in C++;
  and what a staged result of ``--tiny`` small tensors costs in resident memory per tensor, each
  stager in a fresh process (``tiny result memory``, at least 20,000 tensors: RSS after the stage
  minus before, over the tensor count, with the source dict already built).

And for the large workload with two busy-loop processes at nice 0 beside the stager (``large,
2 busy processes``: what dataloader workers do to a GPU node's cores): the first call of a new
stager against PyTorch's under the same load, interleaved, and stager's repeat calls against its
repeat calls on the same machine without the busy processes (target: at most 2x).

And for the large workload with async staging: how long ``stage()`` takes to return its Future,
and how fast a pure-Python loop in the caller's thread runs while the stage is in flight, relative
to the same loop alone (stager vs PyTorch's DefaultStager).

DTensor workloads (``dtensor large``: 256 weights of 4 MiB plus their biases, about 1 GB;
``dtensor tiny``: ``--tiny`` small DTensors), ``Shard(0)`` on a 1-rank gloo mesh, as FSDP2 hands
them to ``dcp.async_save``: repeat calls of stager's and PyTorch's ``DefaultStager`` with
``StagingOptions(False, False, False, False)`` on the same DTensors, and of stager's on the same
bytes as plain tensors (their local tensors), interleaved. And the async stage of 5,000 tiny
DTensors while the caller's thread runs a Python loop (stager vs PyTorch).

First-call rows and their fresh-memory limits are measured interleaved (limit, stager, PyTorch,
limit, ...), so all of them see the same state of the machine's memory: on VMs, memory given back
to the OS comes back at a speed that varies with how long ago it was freed.
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.distributed.checkpoint import staging as torch_staging

from .. import _native
from ..options import StagingOptions
from ..stagers import BlockingAsyncStager, DefaultStager
from .common import BenchContext, Row, tiny_state_dict

SECTION = "staging"

LIMIT_TOUCHED = "limit: copy into touched memory"
LIMIT_FRESH = {False: "limit: copy into fresh private memory", True: "limit: copy into fresh shared memory"}
FLOOR = "torch _foreach_copy_ floor"


def _memory(shared: bool) -> str:
    return "shared" if shared else "private"


def _name(who: str, kind: str, shared: bool) -> str:
    return f"{who} DefaultStager {_memory(shared)} {kind}"


TORCH_OPTIONS_NOTE = (
    "use_pinned_memory=True (ignored: no CUDA), use_shared_memory={shared}, use_async_staging=True, "
    "use_non_blocking_copy=False (True asserts without an accelerator)"
)
STAGER_OPTIONS_NOTE = (
    "StagingOptions() defaults except use_shared_memory={shared}: pinned and non-blocking are no-ops "
    "without CUDA; async staging, timed until the Future's result"
)


def run(ctx: BenchContext) -> list[Row]:
    previous_threads = torch.get_num_threads()
    # PyTorch's copy_ splits large copies over its intra-op threads: give it as many as stager has.
    torch.set_num_threads(ctx.threads)
    try:
        rows: list[Row] = []
        large = ctx.large_state_dict()
        rows += _workload(ctx, "large", large)
        rows += _async_rows(ctx, large)
        rows += _busy_rows(ctx, large)
        rows += _workload(ctx, "tiny", ctx.tiny_state_dict())
        rows += _result_memory_rows(ctx)
        rows += _dtensor_rows(ctx)
        return rows
    finally:
        torch.set_num_threads(previous_threads)


# ---- stagers under test ---------------------------------------------------------------------------
def _stager_options(ctx: BenchContext, shared: bool) -> StagingOptions:
    return StagingOptions(use_shared_memory=shared, num_threads=ctx.threads)


def _torch_options(shared: bool) -> Any:
    return torch_staging.StagingOptions(
        use_pinned_memory=True, use_shared_memory=shared, use_async_staging=True, use_non_blocking_copy=False
    )


def _torch_default_stager(shared: bool) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Ignoring pin_memory flag ... CUDA is not available"
        return torch_staging.DefaultStager(_torch_options(shared))


def _stage(stager: Any, state_dict: Any) -> Any:
    result = stager.stage(state_dict)
    return result.result() if hasattr(result, "result") else result


def _close_quietly(stager: Any) -> None:
    try:
        stager.close()
    except Exception:
        pass


# ---- resident memory of a staged result of tiny tensors -------------------------------------------
_RESULT_MEMORY_SCRIPT = """
import gc, json, sys, time, warnings
import torch
count, who = int(sys.argv[1]), sys.argv[2]
from stager.bench.common import tiny_state_dict
sd = tiny_state_dict(count)
if who == "stager":
    import stager
    s = stager.DefaultStager(stager.StagingOptions(False, False, False, False))
else:
    from torch.distributed.checkpoint import staging
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = staging.DefaultStager(staging.StagingOptions(False, False, False, False))
def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
warm = {k: sd[k] for k in list(sd)[:64]}
s.stage(warm)  # first-call setup (threads, pool) is not the result's cost
del warm
before = rss()
start = time.perf_counter()
result = s.stage(sd)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_bytes": rss() - before, "count": count}))
"""


def _result_memory_rows(ctx: BenchContext) -> list[Row]:
    import json
    import subprocess
    import sys

    workload = "tiny result memory"
    count = max(ctx.tiny_count, 20_000)  # fewer would be a handful of pages: noise
    rows: list[Row] = []
    measured: dict[str, list[dict]] = {"stager": [], "torch": []}
    for _ in range(max(1, min(ctx.repeats, 3))):
        for who in measured:
            out = subprocess.run([sys.executable, "-c", _RESULT_MEMORY_SCRIPT, str(count), who],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                ctx.log(f"  [{workload}] {who} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            measured[who].append(json.loads(out.stdout.strip().splitlines()[-1]))
    names = {"stager": "stager DefaultStager result", "torch": "torch DefaultStager result"}
    for who, runs in measured.items():
        if not runs:
            continue
        per_tensor = [run["rss_bytes"] / count for run in runs]
        rows.append(ctx.row(
            SECTION, workload, names[who], [run["seconds"] for run in runs], ntensors=count,
            baseline=None if who == "torch" else names["torch"],
            extra={"rss_bytes_per_tensor": [round(v) for v in per_tensor],
                   "summary": f"RSS {statistics.median(per_tensor):.0f} B/tensor "
                              f"({min(per_tensor):.0f}-{max(per_tensor):.0f})"}))
    return rows


# ---- one workload -----------------------------------------------------------------------------------
def _workload(ctx: BenchContext, workload: str, state_dict: Any) -> list[Row]:
    nbytes = ctx.nbytes_of(state_dict)
    ntensors = ctx.count_tensors(state_dict)
    size = dict(nbytes=nbytes, ntensors=ntensors)
    rows: list[Row] = []
    failures: dict[str, str] = {}

    def add(name: str, samples: list[float], **kwargs: Any) -> None:
        if samples:
            rows.append(ctx.row(SECTION, workload, name, samples, **size, **kwargs))

    ctx.log(f"  [{workload}] {nbytes / 1e9:.3f} GB in {ntensors} tensors, {ctx.threads} threads")
    # The limits copy one buffer of the same size, allocated and touched once per workload.
    source = torch.empty(max(nbytes, 1), dtype=torch.uint8).fill_(0x5A).numpy()

    touched_samples: list[float] = []
    tiny = workload == "tiny"
    if tiny:
        add(FLOOR, _foreach_copy_samples(ctx, state_dict),
            extra={"note": "PyTorch's per-tensor floor in C++: copies into preallocated, touched tensors"})
    # Per tensor, the bytes are nothing: tiny rows are held against PyTorch's C++ floor.
    touched_limit = FLOOR if tiny else LIMIT_TOUCHED

    for shared in (False, True):
        memory = _memory(shared)
        stager_name = _name("stager", "repeat", shared)
        torch_name = _name("torch", "repeat", shared)
        # Repeat calls, interleaved with the touched-memory limit (the machine's limit for them:
        # one copy of as many bytes into memory that is already faulted in). stager's results are
        # dropped between calls, so its pool hands the memory back; PyTorch reuses its cached
        # storages (and so overwrites earlier results).
        stager = DefaultStager(_stager_options(ctx, shared))
        _stage(stager, state_dict)  # warm up
        torch_stager = _torch_default_stager(shared)
        _, error = _guarded(partial(_stage_all, torch_stager, state_dict))  # warm up (may hit EMFILE)
        runs: dict[str, Callable[[], float]] = {
            LIMIT_TOUCHED: partial(_one_limit_sample, ctx, source, "touched"),
            stager_name: partial(_timed_stage, stager, state_dict),
        }
        if error:
            failures[torch_name] = error
            _close_quietly(torch_stager)
            torch_stager = None  # its Future holds the failed stage's storages (and their files)
            gc.collect()
        else:
            runs[torch_name] = partial(_timed_stage, torch_stager, state_dict)
        samples_by_name, errors = _interleaved(ctx, f"{workload}: repeat calls, {memory} memory", runs)
        failures.update(errors)
        stats = stager.pool_stats()
        _close_quietly(stager)
        _close_quietly(torch_stager)
        del stager, torch_stager, runs  # drop them (and their pools) before the next rows
        gc.collect()
        touched_samples += samples_by_name[LIMIT_TOUCHED]
        add(stager_name, samples_by_name[stager_name], limit=touched_limit, baseline=torch_name,
            extra={"options": STAGER_OPTIONS_NOTE.format(shared=shared), "pool_allocations": stats["allocations"],
                   "pool_reuses": stats["reuses"], "results_independent": True})
        add(torch_name, samples_by_name.get(torch_name, []), limit=touched_limit,
            extra={"options": TORCH_OPTIONS_NOTE.format(shared=shared), "results_independent": False,
                   "note": "reuses its cached storages: a later stage overwrites earlier results"})

        # stager, first call after reserve(): the pool was pre-faulted in the background.
        reserve_name = _name("stager", "first call after reserve()", shared)
        samples = _reserved_first_call_samples(ctx, f"{workload}: {reserve_name}", state_dict, shared, nbytes, ntensors)
        add(reserve_name, samples, limit=touched_limit, baseline=torch_name,
            extra={"options": STAGER_OPTIONS_NOTE.format(shared=shared)})

        # First calls (fresh memory) and the fresh-memory limit, interleaved.
        stager_first = _name("stager", "first call", shared)
        torch_first = _name("torch", "first call", shared)
        limit_fresh = LIMIT_FRESH[shared]
        samples_by_name, errors = _interleaved(ctx, f"{workload}: first calls, {memory} memory", {
            limit_fresh: partial(_one_limit_sample, ctx, source, memory),
            stager_first: partial(_first_call_seconds, partial(_fresh_stager, ctx, shared), state_dict),
            torch_first: partial(_first_call_seconds, partial(_torch_default_stager, shared), state_dict),
        })
        failures.update(errors)
        add(limit_fresh, samples_by_name[limit_fresh], extra={"threads": ctx.threads})
        first_limit = FLOOR if tiny else limit_fresh
        add(stager_first, samples_by_name[stager_first], limit=first_limit, baseline=torch_first,
            extra={"options": STAGER_OPTIONS_NOTE.format(shared=shared)})
        add(torch_first, samples_by_name[torch_first], limit=first_limit,
            extra={"options": TORCH_OPTIONS_NOTE.format(shared=shared)})

    # BlockingAsyncStager without a cache, a new stager per call; both recycle the memory the
    # previous call's dropped result freed (the C allocator / stager's process-wide pool).
    samples_by_name, errors = _interleaved(ctx, f"{workload}: BlockingAsyncStager", {
        "stager BlockingAsyncStager": lambda: _first_call_seconds(BlockingAsyncStager, state_dict),
        "torch BlockingAsyncStager": lambda: _first_call_seconds(torch_staging.BlockingAsyncStager, state_dict),
    })
    failures.update(errors)
    note = "cache_staged_state_dict=False (True pins memory, which needs CUDA), a new stager per call"
    blocking_limit = FLOOR if tiny else LIMIT_TOUCHED
    add("stager BlockingAsyncStager", samples_by_name["stager BlockingAsyncStager"],
        limit=blocking_limit, baseline="torch BlockingAsyncStager", extra={"options": note})
    add("torch BlockingAsyncStager", samples_by_name["torch BlockingAsyncStager"],
        limit=blocking_limit, extra={"options": note})
    # The touched-memory limit's samples were taken between the repeat calls; its row goes first.
    add(LIMIT_TOUCHED, touched_samples,
        extra={"threads": ctx.threads, "how": "parallel copy of one buffer (non-temporal stores), even split, scoped threads"})
    rows.insert(0, rows.pop())

    for name, error in failures.items():
        ctx.log(f"  [{workload}] {name} failed: {error}")
    if failures:
        # Say it where the reader looks: on the stager rows that lost their baseline.
        for row in rows:
            if row.baseline in failures:
                row.extra["baseline_failed"] = failures[row.baseline]
                row.extra.setdefault("summary", "PyTorch failed: " + failures[row.baseline].split(":")[0])
    return rows


def _limit_samples(ctx: BenchContext, source: Any, target: str, label: str | None, repeats: int | None = None) -> list[float]:
    """The machine's limit: ``repeats`` parallel copies of ``source`` (a touched uint8 array of the
    workload's size, kept for the whole workload so fresh-memory samples don't take the memory the
    OS has just freed) into ``target`` memory, with the benchmark's thread count."""
    repeats = repeats or ctx.repeats
    if label is not None:
        ctx.log(f"  {label}")
    gc.collect()
    return list(_native.copy_limit_seconds(source.nbytes, ctx.threads, target, repeats, source))


def _foreach_copy_samples(ctx: BenchContext, state_dict: dict) -> list[float]:
    sources = [t for t in state_dict.values() if isinstance(t, torch.Tensor)]
    targets = [torch.empty_like(t).fill_(1) for t in sources]
    return ctx.measure("tiny: torch _foreach_copy_ floor", lambda: torch._foreach_copy_(targets, sources), warmup=1)


def _reserved_first_call_samples(ctx: BenchContext, label: str, state_dict: Any, shared: bool,
                                 nbytes: int, ntensors: int) -> list[float]:
    samples = []
    reserve = nbytes + 64 * ntensors  # each storage is 64-byte aligned in the pool buffer
    for _ in ctx.progress(range(ctx.repeats), label):
        with DefaultStager(_stager_options(ctx, shared)) as stager:
            stager.reserve(reserve)
            deadline = time.monotonic() + 600
            while stager.pool_stats()["free_bytes"] < reserve and time.monotonic() < deadline:
                time.sleep(0.002)  # a checkpoint comes long after reserve(): don't time the pre-fault
            gc.collect()
            start = time.perf_counter()
            result = _stage(stager, state_dict)
            samples.append(time.perf_counter() - start)
            del result
    return samples


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()``; its result is dropped outside the timed region."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def _one_limit_sample(ctx: BenchContext, source: Any, target: str) -> float:
    """One sample of the copy limit into ``target`` memory."""
    return _limit_samples(ctx, source, target, None, repeats=1)[0]


def _timed_stage(stager: Any, state_dict: Any) -> float:
    """Seconds of one stage of ``state_dict`` by ``stager``, until its result is ready."""
    return _timed(lambda: _stage(stager, state_dict))


def _stage_all(stager: Any, state_dict: Any) -> list[Any]:
    return [_stage(stager, state_dict)]


def _fresh_stager(ctx: BenchContext, shared: bool) -> DefaultStager:
    return DefaultStager(_stager_options(ctx, shared))


def _first_call_seconds(make: Callable[[], Any], state_dict: Any) -> float:
    """Seconds of the first stage() of a new stager (construction and close() not timed)."""
    stager = make()
    try:
        gc.collect()
        start = time.perf_counter()
        result = _stage(stager, state_dict)
        elapsed = time.perf_counter() - start
        del result
        return elapsed
    finally:
        _close_quietly(stager)


def _guarded(fn: Callable[[], list[float]]) -> tuple[list[float], str | None]:
    try:
        return fn(), None
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    # A failed stage's traceback (kept by PyTorch's stager in its Future) holds every storage made
    # so far in reference cycles: with shared memory, one open file each. Free them now.
    gc.collect()
    return [], message


def _interleaved(ctx: BenchContext, label: str, runs: dict[str, Callable[[], float]]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Takes one sample of each run in turn, ``repeats`` rounds. A run that raises is dropped and
    its error returned."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    errors: dict[str, str] = {}
    for _ in ctx.progress(range(ctx.repeats), label):
        for name, fn in runs.items():
            if name in errors:
                continue
            try:
                samples[name].append(fn())
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {err}"
                samples[name] = []
            gc.collect()
    return samples, errors


# ---- async staging: Future latency and the caller's thread -----------------------------------------
def _spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


SPIN_CHUNK = 2_000


def _loop_rate(seconds: float) -> float:
    """Iterations per second of the pure-Python loop run alone for ``seconds``."""
    iterations = 0
    start = time.perf_counter()
    while True:
        _spin(SPIN_CHUNK)
        iterations += SPIN_CHUNK
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return iterations / elapsed


def _async_samples(ctx: BenchContext, label: str, stager: Any, state_dict: Any) -> dict[str, list[float]]:
    """Future latency samples (stage() to its return), then per round: the loop alone for about a
    stage's time, and an async stage with the loop running in this thread until it finishes."""
    out: dict[str, list[float]] = {"future": [], "stage": [], "ratio": [], "alone": [], "lost": []}
    _stage(stager, state_dict)  # warm up: repeat-call state (stager's pool, PyTorch's cache)
    # Future latency: cheap to sample, and noisy on a shared machine, so take more samples.
    # No gc.collect() right before stage(): a training loop doesn't run one there, and a long
    # collection just before makes the OS preempt this thread for the woken staging thread, which
    # then holds the GIL for a switch interval or two (measured: 5-40 ms on a loaded 2-core VM).
    for _ in ctx.progress(range(max(10, 2 * ctx.repeats)), f"{label}: stage() returns Future"):
        start = time.perf_counter()
        future = stager.stage(state_dict)
        out["future"].append(time.perf_counter() - start)
        result = future.result()
        del result, future
        gc.collect()
        time.sleep(0.02)
    for _ in ctx.progress(range(ctx.repeats), f"{label}: caller's Python loop"):
        gc.collect()
        duration = max(statistics.median(out["stage"]) if out["stage"] else 0.2, 0.05)
        alone = _loop_rate(duration)
        iterations = 0
        start = time.perf_counter()
        future = stager.stage(state_dict)
        while not future.done():
            _spin(SPIN_CHUNK)
            iterations += SPIN_CHUNK
        end = time.perf_counter()
        result = future.result()
        del result
        out["stage"].append(end - start)
        out["alone"].append(alone)
        out["ratio"].append(iterations / (end - start) / alone)
        # The caller's work lost to the stage: its time minus what the loop got done in it. A
        # stage whose work is all inside stage() shows 0% speed but loses only that call's time.
        out["lost"].append(max(0.0, (end - start) - iterations / alone))
    return out


def _async_rows(ctx: BenchContext, state_dict: Any) -> list[Row]:
    workload = "large"
    nbytes = ctx.nbytes_of(state_dict)
    ntensors = ctx.count_tensors(state_dict)
    rows: list[Row] = []
    measured: dict[str, dict[str, list[float]]] = {}
    stager = DefaultStager(_stager_options(ctx, shared=False))
    try:
        measured["stager"] = _async_samples(ctx, "large: stager DefaultStager async", stager, state_dict)
    finally:
        stager.close()
    torch_stager = _torch_default_stager(shared=False)
    try:
        measured["torch"] = _async_samples(ctx, "large: torch DefaultStager async", torch_stager, state_dict)
    except Exception as err:
        ctx.log(f"  torch DefaultStager async failed: {type(err).__name__}: {err}")
    finally:
        _close_quietly(torch_stager)

    for who, data in measured.items():
        rows.append(ctx.row(
            SECTION, workload, f"{who} DefaultStager async: stage() returns Future", data["future"],
            nbytes=0, ntensors=0,
            baseline="torch DefaultStager async: stage() returns Future" if who == "stager" else None,
            extra={"summary": f"Future after {statistics.median(data['future']) * 1e3:.3f} ms",
                   "ms": round(statistics.median(data["future"]) * 1e3, 4), "target_ms": 1.0,
                   "min_ms": round(min(data["future"]) * 1e3, 4),
                   "options": (STAGER_OPTIONS_NOTE if who == "stager" else TORCH_OPTIONS_NOTE).format(shared=False)},
        ))
    for who, data in measured.items():
        ratio = statistics.median(data["ratio"])
        lost = statistics.median(data["lost"])
        rows.append(ctx.row(
            SECTION, workload, f"{who} DefaultStager async: stage with caller's Python loop running", data["stage"],
            nbytes=nbytes, ntensors=ntensors,
            extra={"summary": f"caller's loop at {ratio:.0%} of its speed alone, {lost * 1e3:.0f} ms of its work lost",
                   "caller_loop_speed_vs_alone": round(ratio, 4), "caller_seconds_lost": round(lost, 4),
                   "caller_loop_speed_samples": [round(r, 4) for r in data["ratio"]],
                   "loop_alone_iterations_per_s": round(statistics.median(data["alone"])),
                   "target": ">= 0.90 of the loop's speed alone",
                   "note": "seconds: the async stage's wall time while the caller's thread runs a pure-Python loop"},
        ))
    return rows


# ---- beside busy processes -------------------------------------------------------------------------
BUSY_PROCESSES = 2


def _busy_rows(ctx: BenchContext, state_dict: Any) -> list[Row]:
    """First calls (stager vs PyTorch) and stager's repeat calls with ``BUSY_PROCESSES`` busy-loop
    processes at nice 0 beside them; the repeat calls also without them, first, for the ratio."""
    workload = f"large, {BUSY_PROCESSES} busy processes"
    size = dict(nbytes=ctx.nbytes_of(state_dict), ntensors=ctx.count_tensors(state_dict))
    stager = DefaultStager(_stager_options(ctx, shared=False))
    busy: list[subprocess.Popen] = []
    try:
        _stage(stager, state_dict)  # warm up
        idle = [_timed(lambda: _stage(stager, state_dict)) for _ in ctx.progress(range(ctx.repeats), f"{workload}: idle repeat calls")]
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY_PROCESSES)]
        time.sleep(0.2)  # let them start spinning
        samples, errors = _interleaved(ctx, f"{workload}: first and repeat calls", {
            "stager DefaultStager private first call": lambda: _first_call_seconds(
                lambda: DefaultStager(_stager_options(ctx, shared=False)), state_dict),
            "torch DefaultStager private first call": lambda: _first_call_seconds(
                lambda: _torch_default_stager(shared=False), state_dict),
            "stager DefaultStager private repeat": lambda: _timed(lambda: _stage(stager, state_dict)),
        })
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()
        _close_quietly(stager)
    for name, error in errors.items():
        ctx.log(f"  [{workload}] {name} failed: {error}")
    note = f"{BUSY_PROCESSES} processes running `while True: pass` at nice 0 beside the bench"
    rows: list[Row] = []
    first = "stager DefaultStager private first call"
    if samples[first]:
        rows.append(ctx.row(SECTION, workload, first, samples[first], **size,
                            baseline="torch DefaultStager private first call",
                            extra={"note": note, "target": ">= 1.0x PyTorch's first call",
                                   "options": STAGER_OPTIONS_NOTE.format(shared=False)}))
    torch_first = "torch DefaultStager private first call"
    if samples[torch_first]:
        rows.append(ctx.row(SECTION, workload, torch_first, samples[torch_first], **size,
                            extra={"note": note, "options": TORCH_OPTIONS_NOTE.format(shared=False)}))
    repeat = "stager DefaultStager private repeat"
    if samples[repeat] and idle:
        ratio = statistics.median(samples[repeat]) / statistics.median(idle)
        rows.append(ctx.row(SECTION, workload, repeat, samples[repeat], **size,
                            extra={"note": note, "summary": f"{ratio:.2f}x its time without the busy processes",
                                   "vs_idle_repeat": round(ratio, 3), "idle_samples": [round(x, 6) for x in idle],
                                   "target": "<= 2.0x its idle-machine time",
                                   "options": STAGER_OPTIONS_NOTE.format(shared=False)}))
    return rows


# ---- DTensor leaves --------------------------------------------------------------------------------
DTENSOR_OPTIONS_NOTE = "StagingOptions(False, False, False, False): sync, private unpinned memory"
DTENSOR_ASYNC_COUNT = 5_000


def dtensor_state_dict(plain: dict, mesh: Any) -> dict:
    """``plain`` (name -> tensor) as DTensors sharded on dim 0 of ``mesh``, each tensor this rank's
    local shard of a global tensor ``mesh.size()`` times as long (no collective, no copy)."""
    from torch.distributed.tensor import DTensor, Shard

    out = {}
    for name, local in plain.items():
        shape = (local.shape[0] * mesh.size(), *local.shape[1:])
        out[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                       stride=torch.empty(0).new_empty(shape, device="meta").stride())
    return out


def _one_rank_mesh() -> tuple[Any, bool]:
    """A 1-rank gloo mesh (and whether this call created the process group)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    created = False
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        created = True
    return init_device_mesh("cpu", (dist.get_world_size(),)), created


def _dtensor_workloads(ctx: BenchContext) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(2)
    weights = max(1, min(256, ctx.size_bytes // (4 << 20)))
    large: dict[str, torch.Tensor] = {}
    for layer in range(weights):
        large[f"layers.{layer}.weight"] = torch.empty(1024, 1024).normal_(generator=gen)
        large[f"layers.{layer}.bias"] = torch.empty(1024).normal_(generator=gen)
    tiny = tiny_state_dict(ctx.tiny_count, seed=3)  # tensors of their own, not the plain tiny rows
    return {"dtensor large": large, "dtensor tiny": tiny}


def _dtensor_rows(ctx: BenchContext) -> list[Row]:
    import torch.distributed as dist

    mesh, created = _one_rank_mesh()
    try:
        rows: list[Row] = []
        for workload, plain in _dtensor_workloads(ctx).items():
            rows += _dtensor_workload(ctx, workload, plain, dtensor_state_dict(plain, mesh))
        tiny = _dtensor_workloads(ctx)["dtensor tiny"]
        rows += _dtensor_async_rows(ctx, dtensor_state_dict(dict(list(tiny.items())[:DTENSOR_ASYNC_COUNT]), mesh))
        return rows
    finally:
        if created:
            dist.destroy_process_group()


def _dtensor_workload(ctx: BenchContext, workload: str, plain: dict, dtensors: dict) -> list[Row]:
    size = dict(nbytes=ctx.nbytes_of(plain), ntensors=len(plain))
    ctx.log(f"  [{workload}] {size['nbytes'] / 1e9:.3f} GB in {size['ntensors']} DTensors (Shard(0), 1-rank gloo mesh)")
    options = StagingOptions(False, False, False, False, num_threads=ctx.threads)
    ours = DefaultStager(options)
    theirs = torch_staging.DefaultStager(torch_staging.StagingOptions(False, False, False, False))
    names = {
        "stager": "stager DefaultStager DTensor repeat",
        "plain": "stager DefaultStager plain tensors (same bytes) repeat",
        "torch": "torch DefaultStager DTensor repeat",
    }
    try:
        for stager, sd in ((ours, dtensors), (ours, plain), (theirs, dtensors)):
            _stage(stager, sd)  # warm up: pool / cached storages
        samples, errors = _interleaved(ctx, f"{workload}: repeat calls", {
            names["stager"]: lambda: _timed(lambda: _stage(ours, dtensors)),
            names["plain"]: lambda: _timed(lambda: _stage(ours, plain)),
            names["torch"]: lambda: _timed(lambda: _stage(theirs, dtensors)),
        })
    finally:
        _close_quietly(ours)
        _close_quietly(theirs)
    for name, error in errors.items():
        ctx.log(f"  [{workload}] {name} failed: {error}")
    rows = []
    plain_seconds = statistics.median(samples[names["plain"]]) if samples[names["plain"]] else None
    for key, name in names.items():
        if not samples[name]:
            continue
        extra: dict[str, Any] = {"options": DTENSOR_OPTIONS_NOTE}
        if key == "stager" and plain_seconds:
            vs_plain = plain_seconds / statistics.median(samples[name])
            extra.update(speed_vs_plain_tensors=round(vs_plain, 3), target_vs_plain_tensors=0.85,
                         target_vs_torch=2.0, summary=f"{vs_plain:.2f}x the plain-tensor speed")
        rows.append(ctx.row(SECTION, workload, name, samples[name], **size,
                            baseline=names["torch"] if key != "torch" else None, extra=extra))
    return rows


def _dtensor_async_rows(ctx: BenchContext, dtensors: dict) -> list[Row]:
    """Async stage of tiny DTensors while the caller runs a Python loop (issue: 10 s against
    PyTorch's 4.4 s when DTensors took a per-tensor torch copy)."""
    workload = "dtensor tiny async"
    ctx.log(f"  [{workload}] {len(dtensors)} DTensors, async stage beside a busy caller")
    measured: dict[str, dict[str, list[float]]] = {}
    ours = DefaultStager(StagingOptions(use_shared_memory=False, num_threads=ctx.threads))
    try:
        measured["stager"] = _async_samples(ctx, f"{workload}: stager DefaultStager", ours, dtensors)
    finally:
        ours.close()
    theirs = _torch_default_stager(shared=False)
    try:
        measured["torch"] = _async_samples(ctx, f"{workload}: torch DefaultStager", theirs, dtensors)
    except Exception as err:  # a failed baseline must not take the benchmark down
        ctx.log(f"  torch DefaultStager async failed: {type(err).__name__}: {err}")
    finally:
        _close_quietly(theirs)
    rows = []
    name = "DefaultStager async DTensor: stage with caller's Python loop running"
    for who, data in measured.items():
        ratio = statistics.median(data["ratio"])
        lost = statistics.median(data["lost"])
        rows.append(ctx.row(
            SECTION, workload, f"{who} {name}", data["stage"], nbytes=0, ntensors=len(dtensors),
            baseline=f"torch {name}" if who == "stager" else None,
            extra={"summary": f"caller's loop at {ratio:.0%} of its speed alone, {lost * 1e3:.0f} ms of its work lost",
                   "caller_loop_speed_vs_alone": round(ratio, 4), "caller_seconds_lost": round(lost, 4),
                   "note": "seconds: the async stage's wall time while the caller's thread runs a pure-Python loop"},
        ))
    return rows
