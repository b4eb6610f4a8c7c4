"""``persistence`` section of ``stager bench``: saving and loading files, against the disk's limits.

All files go to ``ctx.workdir`` (a real disk; see ``common._bench_tmp_root``). Rows, for the large
synthetic transformer + Adam state_dict (``--size``):

* ``save``: the disk's limit (one buffer of the same bytes written with large writes, ``fsync``,
  same directory), ``stager.save`` (temp file, fsync, rename, directory fsync), PyTorch's replica
  persistence (``torch.save`` to a temp file + fsync + rename + directory fsync) and
  ``safetensors.torch.save_file`` + fsync (on the flattened dict; safetensors takes only a flat
  dict of tensors). The target is removed before each timed call (untimed), so no row pays for
  freeing the previous file's blocks.
* ``stage+save``: ``DefaultStager.stage`` alone, ``stager.save`` of the staged dict alone, the two
  one after the other, and ``stager.save(sd, path, stager=...)`` which writes each storage as soon
  as its copy lands; compared with max(stage, write) (a computed row).
* ``load (cold cache)``: each file's pages are dropped from the page cache before every timed call
  (``posix_fadvise(DONTNEED)`` after an fsync); the disk's limit (sequential large reads of the
  stager file into one buffer), ``stager.load`` (verify=True), ``torch.load`` of the ``.pt`` file
  and ``safetensors.torch.load_file`` (whose tensors are mmap-backed: one byte per page is touched
  so every page is really read).

And for ``--tiny`` small tensors (the cost per tensor): ``stager.save`` vs ``torch.save`` + fsync +
rename + directory fsync, and ``stager.load`` vs ``torch.load`` with a warm page cache.

Rows of one workload are measured interleaved (limit, stager, PyTorch, ... then again, the order
rotated every round, after an untimed ``sync``), so they all see the same state of the disk and
the page cache: this machine's disk is bursty (the same 1 GB write + fsync takes 0.5 s to 4 s), so
use ``--repeats`` of at least the number of rows in a workload (4) for stable medians.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Callable

import torch

from .. import files
from ..options import StagingOptions
from ..replication import durable_torch_save
from ..stagers import DefaultStager
from .common import BenchContext, Row, write_and_fsync

SECTION = "persistence"

SAVE_LIMIT = "limit: disk write+fsync of one buffer"
READ_LIMIT = "limit: disk cold read of the file"
TORCH_SAVE = "torch.save+fsync+rename+dir fsync"
TORCH_LOAD = "torch.load"
STAGE_WRITE_MAX = "max(stage, write)"

_CHUNK = 64 << 20


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


def _interleaved(ctx: BenchContext, label: str, cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]]) -> dict[str, list[float]]:
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


def run(ctx: BenchContext) -> list[Row]:
    sd = ctx.large_state_dict()
    nbytes = ctx.nbytes_of(sd)
    ntensors = ctx.count_tensors(sd)
    workdir = ctx.workdir
    rows: list[Row] = []

    def row(workload: str, name: str, samples: list[float], **kwargs: Any) -> Row:
        return ctx.row(SECTION, workload, name, samples, nbytes=nbytes, ntensors=ntensors, **kwargs)

    # ---- save -----------------------------------------------------------------------------
    limit_path = os.path.join(workdir, "limit.bin")
    stager_path = os.path.join(workdir, "stager.safetensors")
    torch_path = os.path.join(workdir, "torch.pt")
    st_path = os.path.join(workdir, "flat.safetensors")
    blob = torch.empty(nbytes, dtype=torch.uint8)
    blob.random_(0, 256)
    blob_view = memoryview(blob.numpy())
    flat = _flatten(sd, "", {})

    def write_limit() -> None:
        write_and_fsync(limit_path, blob_view)

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

    save_cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        (SAVE_LIMIT, write_limit, lambda: _remove(limit_path)),
        ("stager.save", lambda: files.save(sd, stager_path), lambda: _remove(stager_path)),
        (TORCH_SAVE, torch_save, lambda: _remove(torch_path)),
    ]
    try:
        import safetensors.torch  # noqa: F401

        save_cases.append(("safetensors save_file+fsync", safetensors_save, lambda: _remove(st_path)))
    except ImportError:
        ctx.log("  safetensors is not installed: no safetensors rows")
    samples = _interleaved(ctx, "save", save_cases)
    for name, _, _ in save_cases:
        is_limit = name == SAVE_LIMIT
        rows.append(row("large save", name, samples[name], limit=None if is_limit else SAVE_LIMIT,
                        baseline=None if is_limit or name == TORCH_SAVE else TORCH_SAVE))
    _remove(limit_path)
    del blob, blob_view

    # ---- stage + save ----------------------------------------------------------------------
    pipe_path = os.path.join(workdir, "pipelined.safetensors")
    with DefaultStager(StagingOptions(use_async_staging=False, use_shared_memory=False, num_threads=ctx.threads)) as stager:
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

        stage_cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
            ("DefaultStager.stage only", lambda: stager.stage(sd), None),
            ("stager.save of the staged dict only", write_staged, prestage),
            ("stage, then save (sequential)", sequential, lambda: _remove(pipe_path)),
            ("stager.save(stager=) pipelined", lambda: files.save(sd, pipe_path, stager=stager), lambda: _remove(pipe_path)),
        ]
        samples = _interleaved(ctx, "stage+save", stage_cases)
    stage_s = statistics.median(samples["DefaultStager.stage only"])
    write_s = statistics.median(samples["stager.save of the staged dict only"])
    bound = Row(section=SECTION, workload="large stage+save", name=STAGE_WRITE_MAX, seconds=max(stage_s, write_s),
                nbytes=nbytes, ntensors=ntensors, extra={"computed": "max of the two rows above"})
    rows += [
        row("large stage+save", "DefaultStager.stage only", samples["DefaultStager.stage only"]),
        row("large stage+save", "stager.save of the staged dict only", samples["stager.save of the staged dict only"]),
        bound,
        row("large stage+save", "stage, then save (sequential)", samples["stage, then save (sequential)"], limit=STAGE_WRITE_MAX),
        row("large stage+save", "stager.save(stager=) pipelined", samples["stager.save(stager=) pipelined"], limit=STAGE_WRITE_MAX),
    ]
    _remove(pipe_path)

    # ---- load, cold cache ------------------------------------------------------------------
    files.save(sd, stager_path)
    torch_save()
    has_safetensors = any(name.startswith("safetensors") for name, _, _ in save_cases)
    if has_safetensors:
        safetensors_save()
    read_buffer = bytearray(os.path.getsize(stager_path))

    def read_limit() -> None:
        view = memoryview(read_buffer)
        with open(stager_path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                n = f.readinto(view[done : done + _CHUNK])
                if not n:
                    break
                done += n

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

    load_cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        (READ_LIMIT, read_limit, lambda: _drop_cache(stager_path)),
        ("stager.load (verify=True)", lambda: files.load(stager_path), lambda: _drop_cache(stager_path)),
        (TORCH_LOAD, torch_load, lambda: _drop_cache(torch_path)),
    ]
    if has_safetensors:
        load_cases.append(("safetensors load_file", safetensors_load, lambda: _drop_cache(st_path)))
    samples = _interleaved(ctx, "load (cold cache)", load_cases)
    for name, _, _ in load_cases:
        is_limit = name == READ_LIMIT
        rows.append(row("large load (cold cache)", name, samples[name], limit=None if is_limit else READ_LIMIT,
                        baseline=None if is_limit or name == TORCH_LOAD else TORCH_LOAD))
    del read_buffer
    for path in (stager_path, torch_path, st_path):
        _remove(path)
    rows += _tiny_rows(ctx)
    return rows


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

    save_cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        ("stager.save", lambda: files.save(sd, stager_path), lambda: _remove(stager_path)),
        (TORCH_SAVE, torch_save, lambda: _remove(torch_path)),
    ]
    samples = _interleaved(ctx, "tiny save", save_cases)
    rows = [
        ctx.row(SECTION, "tiny save", name, samples[name], nbytes=nbytes, ntensors=ntensors,
                baseline=None if name == TORCH_SAVE else TORCH_SAVE)
        for name, _, _ in save_cases
    ]
    load_cases: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
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
