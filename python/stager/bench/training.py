"""``training`` section of ``stager bench``: what checkpointing costs a training loop.

Two ranks (spawned, gloo on 127.0.0.1; NCCL on CUDA, see below) train an MLP built here (``blocks``
residual blocks ``width -> 4 width -> width``, no downloads) sharded with FSDP2 (``fully_shard``) on
random data, with Adam. Every ``every`` steps the loop checkpoints the model + optimizer state
(``get_state_dict``: DTensors) the way torchtitan does: ``dcp.async_save`` on a gloo group of its
own (``process_group=``; dcp's collectives on the training group would deadlock against FSDP's),
after waiting for the previous upload. Variants, run in one process pair in rotating order (round
r starts with variant r), each for ``steps`` measured steps after two untimed checkpoint
cycles (the first saves set up threads, files and the host memory staging reuses):

* ``none``: no checkpoint;
* ``PyTorch stager + PyTorch writer``: ``torch.distributed.checkpoint.staging.DefaultStager``
  (async staging; pinned/shared memory and non-blocking copies off on CPU, where PyTorch refuses
  them) and ``torch.distributed.checkpoint.FileSystemWriter``;
* ``stager stager + PyTorch writer``: ``stager.DefaultStager`` and PyTorch's writer;
* ``stager stager + stager writer``: ``stager.DefaultStager`` and ``stager.FileSystemWriter``;
* ``PyTorch stage() alone`` / ``stager stage() alone``: the stager's ``stage()`` every ``every``
  steps, no dcp (the staging share of the cost);
* ``stager ReplicationStager`` / ``+ persist``: ``ReplicationStager.stage()`` every ``every``
  steps (partner exchange over the dcp group), without and with its replica file.

Rows (workload ``<blocks>x<width> MLP, save every <every> steps``): one per variant whose seconds
are the mean step time (what a run's length is made of); ``extra`` holds median and p95 step
times, the overhead against ``none`` (mean and median), the time ``async_save`` (or ``stage()``)
blocks the training thread, the time from ``async_save`` to "upload done" (the upload Future) and
the checkpoint bytes per second over that time, and the CPU seconds per step of both ranks (all
their threads: training, staging, upload, writer) with the extra over ``none``, which stays
meaningful on a machine other jobs keep busy. Step times are the slower rank's, per step.
Extra rows: ``limit: direct write (both ranks)`` (each rank writes its checkpoint's bytes with
``O_DIRECT`` and fsyncs, both at once), and cold ``dcp.load`` of the last checkpoint with each
reader (page cache of the files dropped before each load).

``STAGER_BENCH_TRAINING`` overrides the workload: ``steps=12,every=2,blocks=8,width=1024,batch=16``
(``rounds`` defaults to ``--repeats``). ``STAGER_BENCH_TRAINING_DEVICE=cuda`` runs the GPU variant:
CUDA tensors, NCCL for training, gloo for dcp (one rank per GPU, at most 2); without CUDA it is
skipped.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any, cast

import torch

from .common import BenchContext, Row, SectionSkipped, run_ranks

SECTION = "training"

NONE = "none"
TORCH_TORCH = "PyTorch stager + PyTorch writer"
STAGER_TORCH = "stager stager + PyTorch writer"
STAGER_STAGER = "stager stager + stager writer"
TORCH_STAGE = "PyTorch stage() alone"
STAGER_STAGE = "stager stage() alone"
REPLICATE = "stager ReplicationStager.stage()"
REPLICATE_PERSIST = "stager ReplicationStager.stage() + persist"
VARIANTS = [NONE, TORCH_TORCH, STAGER_TORCH, STAGER_STAGER, TORCH_STAGE, STAGER_STAGE, REPLICATE, REPLICATE_PERSIST]
SAVING = {TORCH_TORCH, STAGER_TORCH, STAGER_STAGER}

DIRECT_LIMIT = "limit: direct write (both ranks)"
LOAD_TORCH = "dcp.load cold, PyTorch FileSystemReader"
LOAD_STAGER = "dcp.load cold, stager FileSystemReader"
LOAD_STAGER_ON_TORCH = "dcp.load cold, stager FileSystemReader on PyTorch's checkpoint"

DEFAULTS = {"steps": 12, "every": 2, "blocks": 8, "width": 1024, "batch": 16}


def settings_from_env(ctx: BenchContext) -> dict[str, Any]:
    settings: dict[str, Any] = dict(DEFAULTS, rounds=ctx.repeats)
    for part in filter(None, os.environ.get("STAGER_BENCH_TRAINING", "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in settings:
            raise SystemExit(f"STAGER_BENCH_TRAINING: unknown setting {key!r}; known: {', '.join(settings)}")
        settings[key.strip()] = int(value)
    settings["device"] = os.environ.get("STAGER_BENCH_TRAINING_DEVICE", "cpu")
    only = [v.strip() for v in os.environ.get("STAGER_BENCH_TRAINING_ONLY", "").split(",") if v.strip()]
    unknown = [v for v in only if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"STAGER_BENCH_TRAINING_ONLY: unknown variants {unknown}; known: {VARIANTS}")
    settings["variants"] = [v for v in VARIANTS if not only or v in only or v == NONE]
    return settings


def run(ctx: BenchContext) -> list[Row]:
    settings = settings_from_env(ctx)
    world = 2
    if settings["device"] == "cuda":
        if not torch.cuda.is_available():
            raise SectionSkipped("STAGER_BENCH_TRAINING_DEVICE=cuda but CUDA is not available")
        world = min(2, torch.cuda.device_count())
    settings["world"] = world
    if world < 2:  # one GPU: no partner to replicate to
        settings["variants"] = [v for v in settings["variants"] if v not in (REPLICATE, REPLICATE_PERSIST)]
    settings["workdir"] = os.path.join(ctx.workdir, "training")
    ctx.drop_workloads()
    # Generous: a step of the default workload takes about 0.5 s on 2 busy cores.
    deadline_s = 600 + 10 * settings["rounds"] * len(settings["variants"]) * (
        settings["steps"] + settings["every"]) * max(1.0, settings["width"] * settings["blocks"] / 8192)
    try:
        # Not daemonic: the ranks start dcp's PROCESS checkpointer, which needs children of its own.
        report = run_ranks(ctx, world, _worker, settings, what="training", deadline_s=deadline_s, daemon=False)
    finally:
        shutil.rmtree(settings["workdir"], ignore_errors=True)
    return _rows(ctx, settings, report)


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _rows(ctx: BenchContext, settings: dict, report: dict[str, Any]) -> list[Row]:
    workload = (f"{settings['blocks']}x{settings['width']} MLP FSDP2 x{settings['world']} "
                f"{settings['device']}, save every {settings['every']} steps")
    steps = report["steps"]
    base_mean = statistics.fmean(steps[NONE])
    base_median = statistics.median(steps[NONE])
    rows: list[Row] = []
    for name in settings["variants"]:
        if name in report["failed"]:
            ctx.log(f"  [{SECTION}] {name} failed: {report['failed'][name]}")
            continue
        samples = steps[name]
        mean = statistics.fmean(samples)
        extra: dict[str, Any] = {
            "step_median_s": round(statistics.median(samples), 6),
            "step_p95_s": round(_p95(samples), 6),
            "step_mean_s": round(mean, 6),
            "cpu_s_per_step": round(statistics.median(report["cpu"][name]), 4),
        }
        if name != NONE:
            extra["overhead_mean"] = round(mean / base_mean - 1, 4)
            extra["overhead_median"] = round(statistics.median(samples) / base_median - 1, 4)
            extra["extra_cpu_s_per_step"] = round(extra["cpu_s_per_step"] - statistics.median(report["cpu"][NONE]), 4)
            blocked = report["blocked"][name]
            extra["blocks_median_s"] = round(statistics.median(blocked), 6)
            extra["blocks_max_s"] = round(max(blocked), 6)
            done = report["upload"].get(name)
            if done:
                extra["to_upload_done_median_s"] = round(statistics.median(done), 6)
                if report["checkpoint_bytes"].get(name):
                    extra["upload_gb_per_s"] = round(report["checkpoint_bytes"][name] / statistics.median(done) / 1e9, 3)
            summary = (f"overhead {extra['overhead_mean']:+.1%}, blocks {extra['blocks_median_s'] * 1e3:.1f} ms, "
                       f"{extra['extra_cpu_s_per_step']:+.2f} CPU s/step")
            if done:
                summary += f", upload done {extra['to_upload_done_median_s']:.2f} s"
            extra["summary"] = summary
        else:
            extra["summary"] = f"median {extra['step_median_s']:.3f} s, p95 {extra['step_p95_s']:.3f} s"
        rows.append(Row(section=SECTION, workload=workload, name=name, seconds=mean,
                        samples=[round(s, 6) for s in samples], limit=None,
                        baseline=TORCH_TORCH if name in (STAGER_TORCH, STAGER_STAGER) else None, extra=extra))
    nbytes = report["checkpoint_bytes"].get(STAGER_STAGER) or 0
    if report.get("direct_limit"):
        rows.append(ctx.row(SECTION, workload, DIRECT_LIMIT, report["direct_limit"], nbytes=report["limit_bytes"],
                            extra={"how": "each rank writes its checkpoint's bytes with O_DIRECT, then fsync, both at once"}))
    if report.get("load"):
        load_workload = f"{workload}: load"
        for name in (LOAD_TORCH, LOAD_STAGER, LOAD_STAGER_ON_TORCH):
            if report["load"].get(name):
                rows.append(ctx.row(SECTION, load_workload, name, report["load"][name], nbytes=nbytes,
                                    baseline=LOAD_TORCH if name != LOAD_TORCH else None))
    return rows


# ---- the ranks -------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, settings: dict, results: Any) -> None:
    try:
        import warnings

        import torch.distributed as dist

        warnings.simplefilter("ignore")
        cuda = settings["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))
        try:
            report = _Loop(rank, world, settings, results).run()
        finally:
            dist.destroy_process_group()
        results.put(("report", report) if rank == 0 else ("done", None))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


class _Loop:
    """One rank's training loop and the variants' checkpointing."""

    def __init__(self, rank: int, world: int, settings: dict, results: Any) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.rank, self.world, self.settings, self.results = rank, world, settings, results
        self.device = torch.device("cuda", rank) if settings["device"] == "cuda" else torch.device("cpu")
        # Every rank is a member of each group, so none is torch's NON_GROUP_MEMBER.
        groups = {name: cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=10)))
                  for name in ("dcp", "control", REPLICATE, REPLICATE_PERSIST)}
        self.dcp_group = groups["dcp"]
        # Barriers and result exchange; replication variants get a group each, since a transport
        # that timed out leaves its group unusable.
        self.control = groups["control"]
        self.replica_groups = {REPLICATE: groups[REPLICATE], REPLICATE_PERSIST: groups[REPLICATE_PERSIST]}
        torch.manual_seed(0)
        width = settings["width"]
        blocks = [_Block(width) for _ in range(settings["blocks"])]
        self.model = torch.nn.Sequential(*blocks).to(self.device)
        mesh = init_device_mesh(self.device.type, (world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(rank)
        self.batches = [torch.randn(settings["batch"], width, generator=gen).to(self.device) for _ in range(4)]
        self.directory = os.path.join(settings["workdir"], f"rank{rank}")
        os.makedirs(settings["workdir"], exist_ok=True)
        self.step_index = 0

    def log(self, message: str) -> None:
        if self.rank == 0:
            self.results.put(("log", message))

    def sync(self) -> None:

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> None:
        x = self.batches[self.step_index % len(self.batches)]
        self.step_index += 1
        self.model(x).square().mean().backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.sync()

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def run(self) -> dict[str, Any]:
        import torch.distributed as dist

        s = self.settings
        for _ in range(2):  # warm up: allocator, FSDP buffers, Adam state
            self.train_step()
        steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
        blocked: dict[str, list[float]] = {name: [] for name in VARIANTS}
        upload: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
        checkpoint_bytes: dict[str, int] = {}
        failed: dict[str, str] = {}
        variants = s["variants"]
        for round_index in range(s["rounds"]):
            shift = round_index % len(variants)
            for name in variants[shift:] + variants[:shift]:
                if name in failed:
                    continue
                self.log(f"  round {round_index + 1}/{s['rounds']}: {name}")
                error = None
                try:
                    step_times, block_times, upload_times, nbytes, cpu_per_step = self.run_variant(name)
                except Exception as err:
                    error = f"{type(err).__name__}: {err}"[:500]
                # Both ranks drop a variant that failed on either, so they stay in step.
                flag = torch.tensor([0 if error is None else 1])
                dist.all_reduce(flag, group=self.control)
                if int(flag):
                    failed[name] = error or "failed on the other rank"
                    self.log(f"  {name} failed: {failed[name]}")
                    continue
                steps[name] += step_times
                blocked[name] += block_times
                upload[name] += upload_times
                cpu[name].append(cpu_per_step)
                if nbytes:
                    checkpoint_bytes[name] = nbytes
        report: dict[str, Any] = {"steps": steps, "blocked": blocked, "upload": upload,
                                  "checkpoint_bytes": checkpoint_bytes, "failed": failed,
                                  "cpu": cpu}
        self.log("  direct-write limit")
        report["direct_limit"], report["limit_bytes"] = self.direct_write_limit()
        self.log("  cold loads")
        report["load"] = self.cold_loads()
        dist.barrier(group=self.control)
        return report

    # ---- one variant ---------------------------------------------------------------------------
    def run_variant(self, name: str) -> tuple[list[float], list[float], list[float], int, float]:
        import resource

        import torch.distributed as dist

        s = self.settings
        every = max(1, s["every"])
        checkpoint = self.checkpointer(name)
        previous: Any = None  # the Future of the checkpoint in flight
        saves: list[tuple[float, list[float]]] = []  # (call time, [done time]) of measured saves
        block_times: list[float] = []
        step_times: list[float] = []
        # Two untimed checkpoint cycles: the first saves set everything up (threads, files, and the
        # host memory of two staged copies: a stage starts while the previous result is held).
        warmup = 2 * every
        total = warmup + s["steps"]
        gc.collect()
        dist.barrier(group=self.control)
        cpu_start = 0.0
        for index in range(total):
            if index == warmup:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                cpu_start = usage.ru_utime + usage.ru_stime
            start = time.perf_counter()
            self.train_step()
            if checkpoint is not None and (index + 1) % every == 0:
                if previous is not None:
                    previous.result()  # as torchtitan: one checkpoint in flight at a time
                state = self.state_dict()
                began = time.perf_counter()
                previous = checkpoint(state)
                returned = time.perf_counter()
                done_at: list[float] = []
                if previous is None:
                    done_at.append(returned)
                else:
                    previous.add_done_callback(lambda _, done_at=done_at: done_at.append(time.perf_counter()))
                if index >= warmup:
                    block_times.append(returned - began)
                    saves.append((began, done_at))
            elapsed = time.perf_counter() - start
            if index >= warmup:
                step_times.append(elapsed)
        if previous is not None:
            previous.result()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = torch.tensor([usage.ru_utime + usage.ru_stime - cpu_start], dtype=torch.float64)
        uploads = [done_at[0] - began for began, done_at in saves if done_at]
        closer = getattr(checkpoint, "close", None)
        if closer is not None:
            closer()
        nbytes = self.checkpoint_nbytes(name)
        # The slower rank's time per step (they wait for each other in FSDP's collectives anyway).
        times = torch.tensor(step_times, dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.control)
        dist.all_reduce(cpu, group=self.control)  # both ranks' CPU seconds (every thread)
        return times.tolist(), block_times, uploads, nbytes, float(cpu) / max(1, s["steps"])

    def variant_dir(self, name: str) -> str:
        safe = "".join(c if c.isalnum() else "_" for c in name)
        return os.path.join(self.settings["workdir"], safe)

    def checkpoint_nbytes(self, name: str) -> int:
        directory = self.variant_dir(name)
        if name not in SAVING or not os.path.isdir(directory):
            return 0
        return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                   if not f.startswith("."))

    def checkpointer(self, name: str) -> Any:
        """A callable taking the state_dict and returning a Future (or None when it blocks)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager as TorchStager
        from torch.distributed.checkpoint.staging import StagingOptions as TorchOptions

        import stager

        cuda = self.device.type == "cuda"
        if name == NONE:
            return None

        def torch_stager() -> Any:
            return TorchStager(TorchOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                            use_async_staging=True, use_non_blocking_copy=cuda))

        def stager_stager() -> Any:
            return stager.DefaultStager(stager.StagingOptions(use_shared_memory=False))

        if name in SAVING:
            directory = self.variant_dir(name)
            writer: Callable[[str], Any]
            if name == TORCH_TORCH:
                async_stager, writer = torch_stager(), dcp.FileSystemWriter
            elif name == STAGER_TORCH:
                async_stager, writer = stager_stager(), dcp.FileSystemWriter
            else:
                async_stager, writer = stager_stager(), stager.FileSystemWriter
            return _Saver(async_stager, lambda: writer(directory), self.dcp_group)
        if name in (TORCH_STAGE, STAGER_STAGE):
            return _Stage(torch_stager() if name == TORCH_STAGE else stager_stager())
        # Without persisting: memory only (persist_format=None). A bounded timeout: a stage that
        # cannot complete fails the variant instead of the run.
        persist = name == REPLICATE_PERSIST
        return _Stage(stager.ReplicationStager(pg=self.replica_groups[name],
                                               storage_dir=os.path.join(self.settings["workdir"], "replicas"),
                                               persist_format="stager" if persist else None,
                                               timeout=datetime.timedelta(seconds=60)))

    # ---- limits and loads ----------------------------------------------------------------------
    def direct_write_limit(self) -> tuple[list[float], int]:
        import torch.distributed as dist

        nbytes = self.checkpoint_nbytes(STAGER_STAGER) // self.world or (64 << 20)
        path = os.path.join(self.settings["workdir"], f"limit.{self.rank}")
        samples = []
        for _ in range(3):
            dist.barrier(group=self.control)
            start = time.perf_counter()
            _direct_write(path, nbytes)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.control)
            samples.append(float(elapsed))
            os.unlink(path)
        return samples, nbytes * self.world

    def cold_loads(self) -> dict[str, list[float]]:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        import stager

        out: dict[str, list[float]] = {LOAD_TORCH: [], LOAD_STAGER: [], LOAD_STAGER_ON_TORCH: []}
        sources = {LOAD_TORCH: (self.variant_dir(TORCH_TORCH), dcp.FileSystemReader),
                   LOAD_STAGER: (self.variant_dir(STAGER_STAGER), stager.FileSystemReader),
                   LOAD_STAGER_ON_TORCH: (self.variant_dir(TORCH_TORCH), stager.FileSystemReader)}
        for _ in range(max(1, min(3, self.settings["rounds"]))):
            for name, (directory, reader) in sources.items():
                if not os.path.isdir(directory):
                    continue
                state = self.state_dict()
                dist.barrier(group=self.control)
                if self.rank == 0:
                    _drop_cache(directory)
                dist.barrier(group=self.control)
                start = time.perf_counter()
                dcp.load(state, storage_reader=reader(directory), process_group=self.dcp_group)
                self.sync()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.control)
                out[name].append(float(elapsed))
        return out


class _Block(torch.nn.Module):
    """``x + W2 gelu(W1 x)``: one residual MLP block, sharded by FSDP2 as a unit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _Saver:
    """``dcp.async_save`` of the state with one stager and a fresh writer per save."""

    def __init__(self, async_stager: Any, make_writer: Any, group: Any) -> None:
        self.async_stager = async_stager
        self.make_writer = make_writer
        self.group = group

    def __call__(self, state: dict) -> Any:
        import torch.distributed.checkpoint as dcp

        response = dcp.async_save(state, storage_writer=self.make_writer(), async_stager=self.async_stager,
                                  process_group=self.group)
        return getattr(response, "upload_completion", response)

    def close(self) -> None:
        self.async_stager.close()


class _Stage:
    """A stager's ``stage()`` alone: its Future (async stagers) or None (it blocked)."""

    def __init__(self, async_stager: Any) -> None:
        self.async_stager = async_stager

    def __call__(self, state: dict) -> Any:
        from concurrent.futures import Future

        result = self.async_stager.stage(state)
        return result if isinstance(result, Future) else None

    def close(self) -> None:
        self.async_stager.close()


def _direct_write(path: str, nbytes: int, chunk: int = 8 << 20) -> None:
    """Writes ``nbytes`` with ``O_DIRECT`` from one page-aligned buffer, then fsyncs (a buffered
    write where the filesystem refuses ``O_DIRECT``)."""
    import mmap

    buffer = mmap.mmap(-1, chunk)
    buffer.write(b"\x5a" * chunk)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o644)
    except OSError:
        fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(buffer)
        done = 0
        while done < nbytes:
            done += os.write(fd, view[: min(chunk, -(-(nbytes - done) // 4096) * 4096)])
        os.fsync(fd)
    finally:
        os.close(fd)
        view.release()
        buffer.close()


def _drop_cache(directory: str) -> None:
    """Evicts the files of ``directory`` from the page cache (they are clean: written and synced)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
