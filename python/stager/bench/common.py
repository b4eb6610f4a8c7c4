"""Shared pieces of ``stager bench``: the context every section gets, rows, timing, the table."""

from __future__ import annotations

import gc
import multiprocessing
import os
import platform
import queue
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..options import default_num_threads


class SectionSkipped(Exception):
    """Raised by a section that cannot run on this machine (e.g. no CUDA); the message says why."""


@dataclass
class Row:
    """One measured line of the table.

    ``limit`` and ``baseline`` name other rows (by ``name``, within the same ``section`` and
    ``workload``): the machine's limit and the PyTorch row this one is compared against.
    Rows that *are* limits or baselines leave them None.
    """

    section: str
    workload: str
    name: str
    seconds: float
    nbytes: int = 0
    ntensors: int = 0
    limit: str | None = None
    baseline: str | None = None
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        return self.nbytes / self.seconds / 1e9 if self.nbytes and self.seconds > 0 else None

    @property
    def us_per_tensor(self) -> float | None:
        return self.seconds / self.ntensors * 1e6 if self.ntensors else None

    def _find(self, rows: list[Row], name: str | None) -> Row | None:
        if name is None:
            return None
        for row in rows:
            if row.section == self.section and row.workload == self.workload and row.name == name:
                return row
        return None

    def ratio_to_limit(self, rows: list[Row]) -> float | None:
        """Throughput relative to the limit row (1.0 = at the limit)."""
        limit = self._find(rows, self.limit)
        return limit.seconds / self.seconds if limit and self.seconds > 0 else None

    def speedup_vs_baseline(self, rows: list[Row]) -> float | None:
        """How many times faster than the baseline (PyTorch) row."""
        baseline = self._find(rows, self.baseline)
        return baseline.seconds / self.seconds if baseline and self.seconds > 0 else None

    def to_json(self, rows: list[Row]) -> dict[str, Any]:
        return {
            "section": self.section,
            "workload": self.workload,
            "name": self.name,
            "seconds_median": self.seconds,
            "seconds_samples": self.samples,
            "nbytes": self.nbytes,
            "ntensors": self.ntensors,
            "gb_per_s": self.gbps,
            "us_per_tensor": self.us_per_tensor,
            "limit": self.limit,
            "ratio_to_limit": self.ratio_to_limit(rows),
            "baseline": self.baseline,
            "speedup_vs_baseline": self.speedup_vs_baseline(rows),
            **({"extra": self.extra} if self.extra else {}),
        }


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not match:
        raise SystemExit(f"cannot read size {text!r}; use e.g. 2GB, 512MB, 1e9")
    number = float(match.group(1))
    unit = match.group(2).upper()
    base = 1024 if match.group(3) else 1000
    return int(number * base ** " KMGT".index(unit or " "))


class BenchContext:
    """What a section gets: settings, shared workloads (built once), timing and progress helpers."""

    def __init__(self, *, size_bytes: int, tiny_count: int, repeats: int, threads: int | None,
                 workdir: str | None, progress: bool) -> None:
        self.size_bytes = size_bytes
        self.tiny_count = tiny_count
        self.repeats = repeats
        self.threads = threads or default_num_threads()
        self.show_progress = (progress and sys.stderr.isatty()) or progress == "force"
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="stager-bench-", dir=_bench_tmp_root())
        os.makedirs(self.workdir, exist_ok=True)
        self._large: dict | None = None
        self._tiny: dict | None = None

    # ---- workloads -------------------------------------------------------------------------
    def large_state_dict(self) -> dict:
        """A synthetic transformer's model + Adam state_dict of about ``size_bytes`` (fp32)."""
        if self._large is None:
            self._large = synthetic_transformer_state_dict(self.size_bytes)
        return self._large

    def tiny_state_dict(self) -> dict:
        """``tiny_count`` small tensors (biases, norms, step counters): the per-tensor cost."""
        if self._tiny is None:
            self._tiny = tiny_state_dict(self.tiny_count)
        return self._tiny

    @staticmethod
    def nbytes_of(state_dict: Any) -> int:
        seen: set[int] = set()
        total = 0

        def walk(value: Any) -> None:
            nonlocal total
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    walk(v)

        walk(state_dict)
        return total

    @staticmethod
    def count_tensors(state_dict: Any) -> int:
        if isinstance(state_dict, torch.Tensor):
            return 1
        if isinstance(state_dict, dict):
            return sum(BenchContext.count_tensors(v) for v in state_dict.values())
        if isinstance(state_dict, (list, tuple)):
            return sum(BenchContext.count_tensors(v) for v in state_dict)
        return 0

    # ---- timing ------------------------------------------------------------------------------
    def measure(self, label: str, fn: Callable[[], Any], *, repeats: int | None = None,
                setup: Callable[[], Any] | None = None, warmup: int = 0) -> list[float]:
        """Runs ``setup()`` (untimed) then times ``fn()``, ``repeats`` times; returns the samples.
        The result of ``fn`` is dropped before the next round."""
        repeats = repeats or self.repeats
        samples = []
        for index in self.progress(range(warmup + repeats), label):
            if setup is not None:
                setup()
            gc.collect()
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
            del result
            if index >= warmup:
                samples.append(elapsed)
        return samples

    def row(self, section: str, workload: str, name: str, samples: list[float], **kwargs: Any) -> Row:
        return Row(section=section, workload=workload, name=name, seconds=statistics.median(samples),
                   samples=[round(s, 6) for s in samples], **kwargs)

    def progress(self, iterable: Iterable, desc: str) -> Iterable:
        if not self.show_progress:
            self.log(f"  {desc}")
            return iterable
        try:
            from tqdm import tqdm
        except ImportError:
            self.log(f"  {desc}")
            return iterable
        return tqdm(iterable, desc=f"  {desc}", leave=False, file=sys.stderr)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def machine(self) -> dict[str, Any]:
        info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": self.threads,
                                "torch": torch.__version__}
        try:
            with open("/proc/meminfo") as f:
                info["memory_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        info["cpu"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        return info

    def drop_workloads(self) -> None:
        """Frees the cached state_dicts (rebuilt on next use), e.g. before spawning workers."""
        self._large = self._tiny = None
        gc.collect()

    def close(self) -> None:
        self._large = self._tiny = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def write_and_fsync(path: str, data: memoryview, chunk: int = 64 << 20) -> None:
    """The disk's limit for writing ``data``: plain large writes, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for begin in range(0, len(data), chunk):
            view = data[begin : begin + chunk]
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _bench_tmp_root() -> str | None:
    """A directory on a real disk (not tmpfs) so persistence rows measure the disk."""
    for candidate in (os.environ.get("STAGER_BENCH_DIR"), os.getcwd()):
        if candidate and os.access(candidate, os.W_OK):
            return candidate
    return None


def tiny_state_dict(count: int, seed: int = 1) -> dict:
    """``count`` small tensors of 4 to 32 floats under ``block<i>.param<j>`` keys: the bench's
    per-tensor workload (biases, norms, step counters)."""
    gen = torch.Generator().manual_seed(seed)
    return {f"block{i // 8}.param{i % 8}": torch.randn(4 + i % 29, generator=gen) for i in range(count)}


def synthetic_transformer_state_dict(total_bytes: int, *, hidden: int = 1024, vocab: int = 32_000) -> dict:
    """A GPT-like model's state_dict plus Adam's (exp_avg, exp_avg_sq, step per parameter),
    with as many layers as fit in ``total_bytes`` of fp32 (model + 2 optimizer moments)."""
    gen = torch.Generator().manual_seed(0)
    per_layer = [
        ("attn.qkv.weight", (3 * hidden, hidden)), ("attn.qkv.bias", (3 * hidden,)),
        ("attn.out.weight", (hidden, hidden)), ("attn.out.bias", (hidden,)),
        ("ln1.weight", (hidden,)), ("ln1.bias", (hidden,)),
        ("mlp.up.weight", (4 * hidden, hidden)), ("mlp.up.bias", (4 * hidden,)),
        ("mlp.down.weight", (hidden, 4 * hidden)), ("mlp.down.bias", (hidden,)),
        ("ln2.weight", (hidden,)), ("ln2.bias", (hidden,)),
    ]
    layer_numel = sum(torch.Size(shape).numel() for _, shape in per_layer)
    embed_numel = vocab * hidden
    budget_numel = max(total_bytes // 4 // 3, layer_numel + 1)
    embed = budget_numel > 2 * embed_numel + layer_numel
    layers = max(1, (budget_numel - (embed_numel if embed else 0)) // layer_numel)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if embed:
        shapes.append(("embed.weight", (vocab, hidden)))
    for layer in range(layers):
        shapes.extend((f"layers.{layer}.{name}", shape) for name, shape in per_layer)
    shapes.append(("final_ln.weight", (hidden,)))
    model = {name: torch.empty(shape).normal_(generator=gen) for name, shape in shapes}
    state = {
        index: {"step": torch.tensor(float(index)), "exp_avg": torch.empty_like(p).normal_(generator=gen),
                "exp_avg_sq": torch.empty_like(p).uniform_(generator=gen)}
        for index, p in enumerate(model.values())
    }
    optim = {"state": state, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                "weight_decay": 0.0, "params": list(range(len(model)))}]}
    return {"model": model, "optim": optim}


def format_table(rows: list[Row]) -> str:
    """A plain-text table: seconds, GB/s, µs per tensor, ratio to the limit, speedup vs PyTorch,
    and each row's ``extra["summary"]`` when any row has one."""
    header = ["section", "workload", "row", "seconds", "GB/s", "us/tensor", "x limit", "x PyTorch"]
    # A row may carry a short text for the table in extra["summary"] (figures that aren't times).
    notes = any(row.extra.get("summary") for row in rows)
    if notes:
        header.append("note")
    lines = [header]
    for row in rows:
        ratio = row.ratio_to_limit(rows)
        speedup = row.speedup_vs_baseline(rows)
        lines.append([
            row.section, row.workload, row.name, f"{row.seconds:.4f}",
            f"{row.gbps:.2f}" if row.gbps is not None else "",
            f"{row.us_per_tensor:.2f}" if row.us_per_tensor is not None else "",
            f"{ratio:.2f}" if ratio is not None else "",
            f"{speedup:.1f}" if speedup is not None else "",
        ] + ([str(row.extra.get("summary", ""))] if notes else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def run_ranks(ctx: BenchContext, world: int, target: Callable[..., None], settings: dict, *, what: str,
              deadline_s: float, daemon: bool = True) -> dict[str, Any]:
    """Runs ``target(rank, world, port, settings, results)`` on ``world`` spawned processes (a
    gloo group on 127.0.0.1:``port``) and returns rank 0's report once every rank is done.

    Ranks put ``("log", text)`` (shown as they come), then ``("report", dict)`` (rank 0) or
    ``("done", None)``, or ``("error", text)`` on failure, on ``results``. A rank that dies, or
    ranks that take longer than ``deadline_s``, end the section with an error naming ``what``;
    every rank is joined (killed if it hangs) before this returns. ``daemon=False`` for ranks that
    start processes of their own (dcp's PROCESS checkpointer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = multiprocessing.get_context("spawn")
    results = mp.Queue()
    procs = [mp.Process(target=target, args=(rank, world, port, settings, results), daemon=daemon)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    report: dict[str, Any] | None = None
    errors: list[str] = []
    deadline = time.monotonic() + deadline_s
    try:
        pending = world
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{what} benchmark workers did not finish in time")
            try:
                kind, payload = results.get(timeout=min(5.0, remaining))
            except queue.Empty:  # check the workers are alive
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(
                        f"a {what} benchmark worker died (exit codes {[p.exitcode for p in procs]})") from None
                continue
            if kind == "log":
                ctx.log(payload)
                continue
            pending -= 1
            if kind == "error":
                errors.append(payload)
            elif kind == "report":
                report = payload
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RuntimeError(f"{what} benchmark failed:\n" + "\n".join(errors))
    assert report is not None, f"{what}: rank 0 sent no report"
    return report


def timed_on_all_ranks(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
    """Seconds of ``fn()`` on the slowest rank of the default process group: ``setup()``
    (untimed), a barrier so every rank starts together, the call, then the maximum over ranks.
    The result of ``fn`` is dropped before the reduction."""
    import torch.distributed as dist

    if setup is not None:
        setup()
    gc.collect()
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())
