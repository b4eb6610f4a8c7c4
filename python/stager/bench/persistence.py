"""``persistence`` section of ``stager bench``: saving and loading files, against the disk's
physical limits.

All files go to ``ctx.workdir`` (a real disk; see ``common._bench_tmp_root``). Rows, for the large
synthetic transformer + Adam state_dict (``--size``):

* ``large save``: the disk's write limit (the same byte count from one page-aligned buffer,
  written with ``O_DIRECT`` in 8 MiB requests, 4 in flight, then ``fsync``: what the device
  takes, with no page cache in the way), ``dd oflag=direct conv=fsync`` as a second reference,
  ``stager.save`` (temp file, write, fsync, rename, directory fsync), PyTorch's replica
  persistence (``torch.save`` to a temp file + fsync + rename + directory fsync) and
  ``safetensors.torch.save_file`` + fsync (on the flattened dict). The target is removed before
  each timed call (untimed), so no row pays for freeing the previous file's blocks.
* ``large stage+save``: ``DefaultStager.stage`` alone, ``stager.save`` of the staged dict alone,
  the two one after the other, and ``stager.save(sd, path, stager=...)`` which writes each
  storage as soon as its copy lands; compared with max(stage, write) (a computed row).
* ``large load (cold cache)``: each file's pages are dropped from the page cache before every
  timed call (fsync, ``posix_fadvise(DONTNEED)``); the disk's read limit (the file read with
  ``O_DIRECT``, 8 MiB requests, 4 in flight, into one page-aligned buffer), ``dd iflag=direct``,
  ``stager.load`` (verify=True), ``torch.load`` of the ``.pt`` file and
  ``safetensors.torch.load_file`` (mmap-backed: one byte per page is touched so every page is
  really read).
* ``large dcp save``: ``dcp.save`` (one process, ``no_dist``) with ``stager.FileSystemWriter``
  (dcp's own format: ``torch.save`` records written from memory) and with PyTorch's
  ``FileSystemWriter``, against the direct-write limit (target: stager >= 0.9x the limit).
* ``large dcp load (cold cache)``: ``dcp.load`` of the checkpoint PyTorch's writer wrote, with
  ``stager.FileSystemReader`` and with PyTorch's reader, the directory's pages dropped before each
  call, against the cold read limit of its data file (targets: stager >= 2x PyTorch's reader and
  >= 0.8x the limit).
* ``large dcp.async_save, budget 1/4 of the state``: stager's stager + writer with a memory budget
  of a quarter of the state (streamed) against the unbounded pipelined save, with the RSS
  high-water growth per budget and the caller's staging_completion wait (``bench/bounded.py``).

Where the filesystem has no direct I/O (tmpfs), the limits fall back to buffered writes +
``fdatasync`` / buffered reads and say so in their note.

And for ``--tiny`` small tensors (the cost per tensor): ``stager.save`` vs ``torch.save`` + fsync +
rename + directory fsync, and ``stager.load`` vs ``torch.load`` with a warm page cache.

**Spread.** Every row keeps its samples; its note gives min / median / max (GB/s for the large
rows) and the spread, (max - min) / median, next to the spread of its workload's limit row: this
machine's disk is bursty (the same write + fsync takes 0.5 s or 4 s), and a row whose spread is
no wider than the limit's is within the disk's noise (the note says so). Rows of
one workload are measured interleaved (limit, stager, PyTorch, ... then again, the order rotated
every round, after an untimed ``sync``), so they all see the same state of the disk and the page
cache; use ``--repeats`` of at least the number of rows in a workload (5) for stable medians.
"""

from __future__ import annotations

import gc
import mmap
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .. import _native, files
from ..files import durable_torch_save
from ..options import StagingOptions
from ..stagers import DefaultStager
from . import bounded
from .common import BenchContext, Row

SECTION = "persistence"

SAVE_LIMIT = "limit: O_DIRECT write+fsync, 4 in flight"
READ_LIMIT = "limit: O_DIRECT cold read, 4 in flight"
DD_WRITE = "dd oflag=direct conv=fsync"
DD_READ = "dd iflag=direct"
TORCH_SAVE = "torch.save+fsync+rename+dir fsync"
TORCH_LOAD = "torch.load"
STAGE_WRITE_MAX = "max(stage, write)"

#: Bytes per request of the limits, and requests in flight (the writer's and reader's own).
_REQUEST = 8 << 20
_IN_FLIGHT = 4
_BLOCK = 4096

Case = tuple[str, Callable[[], Any], Callable[[], Any] | None]


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _flatten(value: Any, prefix: str, out: dict) -> dict:
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, child in value.items():
            _flatten(child, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            _flatten(child, f"{prefix}.{index}" if prefix else str(index), out)
    return out


class DiskLimits:
    """The device's limits for a byte count: direct, aligned, several requests in flight.

    One page-aligned buffer (an anonymous mapping with transparent huge pages, as stager's pool
    uses, every page touched) of ``nbytes`` rounded up to a block; writes and reads are 8 MiB requests issued by 4 threads (``os.pwrite`` /
    ``os.preadv`` release the GIL), the way stager's writer and reader issue theirs. ``direct``
    says whether the filesystem took ``O_DIRECT``.
    """

    def __init__(self, workdir: str, nbytes: int) -> None:
        self.nbytes = nbytes
        self.capacity = max(_BLOCK, -(-nbytes // _BLOCK) * _BLOCK)
        # Private (mmap's default, shared, is shmem: no transparent huge pages there).
        self.buffer = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # Like stager's pool: huge pages make a direct request a few physically contiguous
            # segments instead of 2,048 4 KiB pages, so the device gets larger requests (2x the
            # read rate on this VM's disk).
            self.buffer.madvise(mmap.MADV_HUGEPAGE)
        torch.frombuffer(self.buffer, dtype=torch.uint8).random_(0, 256)
        self.view = memoryview(self.buffer)
        self.pool = ThreadPoolExecutor(_IN_FLIGHT, thread_name_prefix="stager-bench-io")
        self.direct = self._probe(os.path.join(workdir, "probe.bin"))

    @staticmethod
    def _probe(path: str) -> bool:
        try:
            with open(path, "wb") as f:
                f.write(b"x")
            return _native.io_mode(path) == "direct"
        finally:
            _remove(path)

    def _open(self, path: str, flags: int) -> int:
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:
                self.direct = False
        return os.open(path, flags, 0o644)

    def write(self, path: str) -> None:
        """``nbytes`` to a new file at ``path``, then fsync."""
        fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            def put(offset: int) -> None:
                end = min(offset + _REQUEST, self.capacity)
                while offset < end:
                    offset += os.pwrite(fd, self.view[offset:end], offset)

            list(self.pool.map(put, range(0, self.capacity, _REQUEST)))
            if self.capacity != self.nbytes:
                os.ftruncate(fd, self.nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: str) -> None:
        """The whole file at ``path`` (at most ``capacity`` bytes) into the buffer."""
        size = os.path.getsize(path)
        fd = self._open(path, os.O_RDONLY)
        try:
            def get(offset: int) -> None:
                end = min(offset + _REQUEST, self.capacity)
                while offset < end:
                    n = os.preadv(fd, [self.view[offset:end]], offset)
                    if n <= 0:
                        return
                    offset += n

            list(self.pool.map(get, range(0, min(-(-size // _BLOCK) * _BLOCK, self.capacity), _REQUEST)))
        finally:
            os.close(fd)

    def close(self) -> None:
        self.pool.shutdown()
        self.view.release()
        self.buffer.close()


def _dd(args: list[str]) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(["dd", *args, "status=none"], check=True, stdout=subprocess.DEVNULL)

    return run


def _interleaved(ctx: BenchContext, label: str, cases: list[Case]) -> dict[str, list[float]]:
    """Times each (name, fn, setup) once per round, ``ctx.repeats`` rounds; returns samples."""
    samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for round_index in ctx.progress(range(ctx.repeats), label):
        # Rotate the order every round: this VM's disk absorbs a burst quickly and then slows
        # down, so a fixed order would favour whichever row comes first.
        shift = round_index % len(cases)
        for name, fn, setup in cases[shift:] + cases[:shift]:
            os.sync()  # start every row with no dirty pages from the previous one (untimed)
            if setup is not None:
                setup()
            gc.collect()
            start = time.perf_counter()
            result = fn()
            samples[name].append(time.perf_counter() - start)
            del result
    return samples


def _spread(samples: list[float]) -> float:
    return (max(samples) - min(samples)) / statistics.median(samples) if samples else 0.0


def add_spread_notes(rows: list[Row], limit_names: set[str]) -> None:
    """Puts min / median / max and the spread (next to its limit's) into each row's note."""
    for row in rows:
        if not row.samples or ("summary" in row.extra and "sizes" not in row.extra):
            continue
        limit = next((r for r in rows if r.workload == row.workload and r.name == row.limit), None)
        spread = _spread(row.samples)
        if row.nbytes and all(s > 0 for s in row.samples) and row.nbytes / max(row.samples) >= 1e7:
            rates = sorted(row.nbytes / s / 1e9 for s in row.samples)
            figures = f"GB/s min {rates[0]:.2f} med {statistics.median(rates):.2f} max {rates[-1]:.2f}"
        elif row.ntensors:
            per = sorted(s / row.ntensors * 1e6 for s in row.samples)
            figures = f"us/tensor min {per[0]:.2f} med {statistics.median(per):.2f} max {per[-1]:.2f}"
        else:
            ordered = sorted(row.samples)
            figures = f"s min {ordered[0]:.4f} med {statistics.median(ordered):.4f} max {ordered[-1]:.4f}"
        note = f"{figures}, spread {spread:.0%} (n={len(row.samples)})"
        if row.name in limit_names:
            note += ", the disk's own noise"
        elif limit is not None and limit.samples:
            limit_spread = _spread(limit.samples)
            note += f" vs limit {limit_spread:.0%}"
            if spread <= limit_spread * 1.25 + 0.02:
                note += ": no wider than the disk's own noise"
        # Rows that also measure sizes (bytes per tensor) keep them in front.
        row.extra["summary"] = f"{row.extra['sizes']}; {note}" if "sizes" in row.extra else note
        row.extra.setdefault("spread", round(spread, 4))


def run(ctx: BenchContext) -> list[Row]:
    sd = ctx.large_state_dict()
    nbytes = ctx.nbytes_of(sd)
    ntensors = ctx.count_tensors(sd)
    workdir = ctx.workdir
    rows: list[Row] = []

    def row(workload: str, name: str, samples: list[float], **kwargs: Any) -> Row:
        return ctx.row(SECTION, workload, name, samples, nbytes=nbytes, ntensors=ntensors, **kwargs)

    stager_path = os.path.join(workdir, "stager.safetensors")
    torch_path = os.path.join(workdir, "torch.pt")
    st_path = os.path.join(workdir, "flat.safetensors")
    limit_path = os.path.join(workdir, "limit.bin")
    dd_path = os.path.join(workdir, "dd.bin")
    flat = _flatten(sd, "", {})
    has_dd = shutil.which("dd") is not None
    try:
        import safetensors.torch  # noqa: F401

        has_safetensors = True
    except ImportError:
        has_safetensors = False
        ctx.log("  safetensors is not installed: no safetensors rows")
    if not has_dd:
        ctx.log("  dd is not installed: no dd rows")
    limits = DiskLimits(workdir, nbytes)
    how = "O_DIRECT" if limits.direct else "no O_DIRECT here: buffered + fdatasync"
    try:
        # ---- save ----------------------------------------------------------------------------
        def torch_save() -> None:
            durable_torch_save(sd, torch_path)

        def safetensors_save() -> None:
            from safetensors.torch import save_file

            save_file(flat, st_path)
            fd = os.open(st_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        save_cases: list[Case] = [
            (SAVE_LIMIT, lambda: limits.write(limit_path), lambda: _remove(limit_path)),
            ("stager.save", lambda: files.save(sd, stager_path), lambda: _remove(stager_path)),
            (TORCH_SAVE, torch_save, lambda: _remove(torch_path)),
        ]
        if has_dd:
            save_cases.insert(1, (DD_WRITE, _dd(["if=/dev/zero", f"of={dd_path}", f"bs={_REQUEST}", f"count={nbytes}",
                                                 "iflag=count_bytes", "oflag=direct", "conv=fsync"]),
                                  lambda: _remove(dd_path)))
        if has_safetensors:
            save_cases.append(("safetensors save_file+fsync", safetensors_save, lambda: _remove(st_path)))
        samples = _interleaved(ctx, "save", save_cases)
        for name, _, _ in save_cases:
            is_limit = name == SAVE_LIMIT
            extra = {"how": how} if is_limit else {}
            rows.append(row("large save", name, samples[name], limit=None if is_limit else SAVE_LIMIT,
                            baseline=None if is_limit or name in (TORCH_SAVE, DD_WRITE) else TORCH_SAVE, extra=extra))
        for path in (limit_path, dd_path):
            _remove(path)

        # ---- stage + save --------------------------------------------------------------------
        pipe_path = os.path.join(workdir, "pipelined.safetensors")
        options = StagingOptions(use_async_staging=False, use_shared_memory=False, num_threads=ctx.threads)
        with DefaultStager(options) as stager:
            stager.stage(sd)  # warm the pool: every row below reuses its memory
            holder: dict[str, Any] = {}

            def prestage() -> None:
                _remove(pipe_path)
                holder["staged"] = stager.stage(sd)

            def write_staged() -> None:
                files.save(holder.pop("staged"), pipe_path)

            def sequential() -> None:
                staged = stager.stage(sd)
                files.save(staged, pipe_path)

            stage_cases: list[Case] = [
                ("DefaultStager.stage only", lambda: stager.stage(sd), None),
                ("stager.save of the staged dict only", write_staged, prestage),
                ("stage, then save (sequential)", sequential, lambda: _remove(pipe_path)),
                ("stager.save(stager=) pipelined", lambda: files.save(sd, pipe_path, stager=stager),
                 lambda: _remove(pipe_path)),
            ]
            samples = _interleaved(ctx, "stage+save", stage_cases)
        stage_s = statistics.median(samples["DefaultStager.stage only"])
        write_s = statistics.median(samples["stager.save of the staged dict only"])
        bound = Row(section=SECTION, workload="large stage+save", name=STAGE_WRITE_MAX,
                    seconds=max(stage_s, write_s), nbytes=nbytes, ntensors=ntensors,
                    extra={"computed": "max of the two rows above", "summary": "computed: max of the two rows above"})
        rows += [
            row("large stage+save", "DefaultStager.stage only", samples["DefaultStager.stage only"]),
            row("large stage+save", "stager.save of the staged dict only",
                samples["stager.save of the staged dict only"]),
            bound,
            row("large stage+save", "stage, then save (sequential)", samples["stage, then save (sequential)"],
                limit=STAGE_WRITE_MAX),
            row("large stage+save", "stager.save(stager=) pipelined", samples["stager.save(stager=) pipelined"],
                limit=STAGE_WRITE_MAX),
        ]
        _remove(pipe_path)

        # ---- load, cold cache ------------------------------------------------------------------
        files.save(sd, stager_path)
        torch_save()
        if has_safetensors:
            safetensors_save()

        def torch_load() -> Any:
            with open(torch_path, "rb") as f:  # a file object: never routed to a safetensors reader
                return torch.load(f, weights_only=True)

        def safetensors_load() -> Any:
            from safetensors.torch import load_file

            out = load_file(st_path)
            for tensor in out.values():  # mmap-backed: read every page
                if tensor.numel():
                    tensor.reshape(-1).view(torch.uint8)[::4096].sum()
            return out

        load_cases: list[Case] = [
            (READ_LIMIT, lambda: limits.read(stager_path), lambda: _drop_cache(stager_path)),
            ("stager.load (verify=True)", lambda: files.load(stager_path), lambda: _drop_cache(stager_path)),
            (TORCH_LOAD, torch_load, lambda: _drop_cache(torch_path)),
        ]
        if has_dd:
            load_cases.insert(1, (DD_READ, _dd([f"if={stager_path}", "of=/dev/null", f"bs={_REQUEST}", "iflag=direct"]),
                                  lambda: _drop_cache(stager_path)))
        if has_safetensors:
            load_cases.append(("safetensors load_file", safetensors_load, lambda: _drop_cache(st_path)))
        samples = _interleaved(ctx, "load (cold cache)", load_cases)
        for name, _, _ in load_cases:
            is_limit = name == READ_LIMIT
            extra = {"how": how.replace("fdatasync", "page cache")} if is_limit else {}
            rows.append(row("large load (cold cache)", name, samples[name], limit=None if is_limit else READ_LIMIT,
                            baseline=None if is_limit or name in (TORCH_LOAD, DD_READ) else TORCH_LOAD, extra=extra))
        for path in (stager_path, torch_path, st_path):
            _remove(path)
        rows += _dcp_rows(ctx, sd, limits, how, row)
        rows += bounded.rows(ctx, sd, nbytes, _interleaved, row)
    finally:
        limits.close()
        for path in (stager_path, torch_path, st_path, limit_path, dd_path):
            _remove(path)
    rows += _tiny_rows(ctx)
    add_spread_notes(rows, {SAVE_LIMIT, READ_LIMIT})
    return rows


DCP_SAVE_STAGER = "dcp.save, stager.FileSystemWriter"
DCP_SAVE_TORCH = "dcp.save, PyTorch FileSystemWriter"
DCP_LOAD_STAGER = "dcp.load, stager.FileSystemReader on PyTorch's checkpoint"
DCP_LOAD_TORCH = "dcp.load, PyTorch FileSystemReader"


def _dcp_rows(ctx: BenchContext, sd: Any, limits: DiskLimits, how: str, row: Callable[..., Row]) -> list[Row]:
    """dcp's storage layer, one process: saves against the direct-write limit, and cold loads of
    a checkpoint PyTorch's writer wrote against the cold read limit and PyTorch's reader."""
    import torch.distributed.checkpoint as dcp

    from .. import filesystem

    stager_dir = os.path.join(ctx.workdir, "dcp-stager")
    torch_dir = os.path.join(ctx.workdir, "dcp-torch")
    limit_path = os.path.join(ctx.workdir, "dcp-limit.bin")

    def clear(directory: str) -> Callable[[], None]:
        def run() -> None:
            filesystem.wait_for_cleanup(directory)
            shutil.rmtree(directory, ignore_errors=True)
        return run

    def drop(directory: str) -> Callable[[], None]:
        def run() -> None:
            for name in os.listdir(directory):
                _drop_cache(os.path.join(directory, name))
        return run

    rows: list[Row] = []
    try:
        save_cases: list[Case] = [
            (SAVE_LIMIT, lambda: limits.write(limit_path), lambda: _remove(limit_path)),
            (DCP_SAVE_STAGER, lambda: dcp.save(sd, storage_writer=filesystem.FileSystemWriter(stager_dir),
                                               no_dist=True), clear(stager_dir)),
            (DCP_SAVE_TORCH, lambda: dcp.save(sd, storage_writer=dcp.FileSystemWriter(torch_dir), no_dist=True),
             clear(torch_dir)),
        ]
        samples = _interleaved(ctx, "dcp save", save_cases)
        for name, _, _ in save_cases:
            is_limit = name == SAVE_LIMIT
            rows.append(row("large dcp save", name, samples[name], limit=None if is_limit else SAVE_LIMIT,
                            baseline=None if name != DCP_SAVE_STAGER else DCP_SAVE_TORCH,
                            extra={"how": how} if is_limit else {}))
        _remove(limit_path)
        # The last torch sample's checkpoint stays for the loads.
        (data_file,) = [n for n in os.listdir(torch_dir) if n.endswith(".distcp")]
        target = _zeros_like(sd)
        load_cases: list[Case] = [
            (READ_LIMIT, lambda: limits.read(os.path.join(torch_dir, data_file)), drop(torch_dir)),
            (DCP_LOAD_STAGER, lambda: dcp.load(target, storage_reader=filesystem.FileSystemReader(torch_dir),
                                               no_dist=True), drop(torch_dir)),
            (DCP_LOAD_TORCH, lambda: dcp.load(target, storage_reader=dcp.FileSystemReader(torch_dir), no_dist=True),
             drop(torch_dir)),
        ]
        samples = _interleaved(ctx, "dcp load (cold cache)", load_cases)
        for name, _, _ in load_cases:
            is_limit = name == READ_LIMIT
            rows.append(row("large dcp load (cold cache)", name, samples[name], limit=None if is_limit else READ_LIMIT,
                            baseline=DCP_LOAD_TORCH if name == DCP_LOAD_STAGER else None,
                            extra={"how": how.replace("fdatasync", "page cache")} if is_limit else {}))
    finally:
        _remove(limit_path)
        for directory in (stager_dir, torch_dir):
            clear(directory)()
    return rows


def _zeros_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {key: _zeros_like(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_zeros_like(item) for item in value]
    return value


def _tiny_rows(ctx: BenchContext) -> list[Row]:
    """``--tiny`` small tensors: the cost per tensor of saving and of loading (warm page cache)."""
    sd = ctx.tiny_state_dict()
    nbytes = ctx.nbytes_of(sd)
    ntensors = ctx.count_tensors(sd)
    stager_path = os.path.join(ctx.workdir, "tiny.safetensors")
    torch_path = os.path.join(ctx.workdir, "tiny.pt")

    def torch_save() -> None:
        durable_torch_save(sd, torch_path)

    def torch_load() -> Any:
        with open(torch_path, "rb") as f:
            return torch.load(f, weights_only=True)

    save_cases: list[Case] = [
        ("stager.save", lambda: files.save(sd, stager_path), lambda: _remove(stager_path)),
        (TORCH_SAVE, torch_save, lambda: _remove(torch_path)),
    ]
    samples = _interleaved(ctx, "tiny save", save_cases)  # leaves each case's last file in place
    with open(stager_path, "rb") as f:
        header_nbytes = int.from_bytes(f.read(8), "little")
    # What each file costs per tensor: stager's JSON header (the part a million tensors strain),
    # and each whole file.
    sizes = {"stager.save": os.path.getsize(stager_path), TORCH_SAVE: os.path.getsize(torch_path)}
    per_tensor = max(ntensors, 1)
    extras = {
        "stager.save": {"header_bytes": header_nbytes, "file_bytes": sizes["stager.save"],
                        "sizes": f"header {header_nbytes / per_tensor:.0f} B/tensor, "
                                 f"file {sizes['stager.save'] / per_tensor:.0f} B/tensor"},
        TORCH_SAVE: {"file_bytes": sizes[TORCH_SAVE], "sizes": f"file {sizes[TORCH_SAVE] / per_tensor:.0f} B/tensor"},
    }
    rows = [
        ctx.row(SECTION, "tiny save", name, samples[name], nbytes=nbytes, ntensors=ntensors,
                baseline=None if name == TORCH_SAVE else TORCH_SAVE, extra=extras[name])
        for name, _, _ in save_cases
    ]
    load_cases: list[Case] = [
        ("stager.load (verify=True)", lambda: files.load(stager_path), None),
        (TORCH_LOAD, torch_load, None),
    ]
    samples = _interleaved(ctx, "tiny load (warm cache)", load_cases)
    rows += [
        ctx.row(SECTION, "tiny load (warm cache)", name, samples[name], nbytes=nbytes, ntensors=ntensors,
                baseline=None if name == TORCH_LOAD else TORCH_LOAD)
        for name, _, _ in load_cases
    ]
    for path in (stager_path, torch_path):
        _remove(path)
    return rows
