"""``replication`` section of ``stager bench``: partner replication over gloo with 2 local ranks.

Two processes (spawned, gloo on 127.0.0.1) swap their state_dicts, for the large synthetic
transformer + Adam dict (``--size``) and the tiny-tensor dict (``--tiny``). Every timed call starts
after a barrier on both ranks, and its time is the slower rank's (an all-reduce of the two).

Rows per workload (``<workload> exchange`` and ``<workload> exchange+persist``):

* ``limit: gloo exchange of one buffer``: both ranks send and receive one buffer of the same total
  bytes at once (``send`` and ``recv`` posted together), the wire's limit for one message;
* ``stager ReplicationStager`` (``persist_format=None``) and PyTorch's ``_ReplicationStager`` with
  its persistence switched off (same exchange, no file);
* ``limit: disk write+fsync (both ranks)``: each rank writes the same bytes from one buffer with
  large writes and fsyncs, both at once (they share the disk, as replicas do);
* ``max(exchange, write)``: the slower of stager's exchange and the disk limit (a computed row),
  the bound for exchange + persist;
* ``stager ReplicationStager + persist`` (``.stager`` file, stager's durable writer, written while
  the bytes arrive) and PyTorch's ``_ReplicationStager`` (``torch.save`` ``.pt`` + fsync +
  rename). The previous replica is removed (untimed) before each of these calls, as the disk
  limit's file is, so no row pays for freeing the blocks of the file it replaces.

Rows of one workload are measured interleaved, round by round. PyTorch on the tiny dict takes
seconds per call (one message and one wait per tensor), so it runs at most 2 rounds.

DTensor rows (``dtensor large exchange``, ``dtensor tiny exchange``; :func:`_dtensor_exchange`):
stager's ReplicationStager (no persisting) on DTensors sharded over both ranks, on the same bytes
as plain tensors (their local shards), and PyTorch's _ReplicationStager on the same DTensors.
"""

from __future__ import annotations

import datetime
import os
import statistics
import traceback
from collections.abc import Callable
from typing import Any

from .common import BenchContext, Row, run_ranks, timed_on_all_ranks, write_and_fsync

SECTION = "replication"

WIRE_LIMIT = "limit: gloo exchange of one buffer"
DISK_LIMIT = "limit: disk write+fsync (both ranks)"
BOUND = "max(exchange, write)"
STAGER = "stager ReplicationStager"
TORCH = "PyTorch _ReplicationStager"
STAGER_PERSIST = "stager ReplicationStager + persist (.stager)"
TORCH_PERSIST = "PyTorch _ReplicationStager + persist (.pt)"

_TORCH_TINY_ROUNDS = 2


#: Bytes per rank of the replication workload: two ranks on one machine each hold the dict, the
#: replica, the limit's send and receive buffers and PyTorch's copies (about 6x the dict), so a
#: 2 GB dict per rank would not fit a 24 GB machine.
MAX_BYTES_PER_RANK = 1_000_000_000


def run(ctx: BenchContext) -> list[Row]:
    size_bytes = min(ctx.size_bytes, MAX_BYTES_PER_RANK)
    if size_bytes < ctx.size_bytes:
        ctx.log(f"  replication uses {size_bytes / 1e9:.1f} GB per rank (2 ranks on one machine)")
    ctx.drop_workloads()  # the ranks build their own; free this process's copy for them
    settings = {"size_bytes": size_bytes, "tiny_count": ctx.tiny_count, "repeats": ctx.repeats,
                "threads": ctx.threads, "workdir": ctx.workdir}
    report = run_ranks(ctx, 2, _worker, settings, what="replication",
                       deadline_s=600 + 60 * ctx.repeats * max(1.0, ctx.size_bytes / 1e9))
    rows: list[Row] = []
    for workload, data in report.items():
        rows += _dtensor_rows(ctx, workload, data) if workload.startswith("dtensor") else _rows(ctx, workload, data)
    return rows


def _rows(ctx: BenchContext, workload: str, data: dict[str, Any]) -> list[Row]:
    samples = data["samples"]
    size = {"nbytes": data["nbytes"], "ntensors": data["ntensors"]}
    exchange, persisted = f"{workload} exchange", f"{workload} exchange+persist"
    rows = [
        ctx.row(SECTION, exchange, WIRE_LIMIT, samples[WIRE_LIMIT], **size),
        ctx.row(SECTION, exchange, STAGER, samples[STAGER], limit=WIRE_LIMIT, baseline=TORCH, **size),
        ctx.row(SECTION, exchange, TORCH, samples[TORCH], limit=WIRE_LIMIT, **size),
        ctx.row(SECTION, persisted, DISK_LIMIT, samples[DISK_LIMIT], **size),
    ]
    bound = max(statistics.median(samples[STAGER]), statistics.median(samples[DISK_LIMIT]))
    rows.append(Row(section=SECTION, workload=persisted, name=BOUND, seconds=bound, **size,
                    extra={"computed": f"max of '{STAGER}' ({exchange}) and '{DISK_LIMIT}'"}))
    rows.append(ctx.row(SECTION, persisted, STAGER_PERSIST, samples[STAGER_PERSIST], limit=BOUND,
                        baseline=TORCH_PERSIST, **size))
    rows.append(ctx.row(SECTION, persisted, TORCH_PERSIST, samples[TORCH_PERSIST], limit=BOUND, **size))
    return rows


# ---- the two ranks -----------------------------------------------------------------------------------


def _clear(directory: str) -> None:
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))


def _worker(rank: int, world: int, port: int, settings: dict, results: Any) -> None:
    try:
        import warnings

        import torch
        import torch.distributed as dist

        # PyTorch's PGTransport warns about a read-only buffer on every send; once is enough.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(minutes=30))
        try:
            report = _measure(rank, settings, results)
        finally:
            dist.destroy_process_group()
        results.put(("report", report) if rank == 0 else ("done", None))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _measure(rank: int, settings: dict, results: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.staging import _ReplicationStager

    from ..replication import ReplicationStager

    def log(message: str) -> None:
        if rank == 0:
            results.put(("log", message))

    ctx = BenchContext(size_bytes=settings["size_bytes"], tiny_count=settings["tiny_count"],
                       repeats=settings["repeats"], threads=settings["threads"], workdir=settings["workdir"],
                       progress=False)
    pg = dist.distributed_c10d._get_default_group()
    partner = 1 - rank
    timeout = datetime.timedelta(minutes=10)
    base = os.path.join(settings["workdir"], "replication", f"rank{rank}")
    stager_dir, torch_dir = os.path.join(base, "stager"), os.path.join(base, "torch")
    ours = ReplicationStager(pg, timeout, storage_dir=os.path.join(base, "memory"), persist_format=None)
    ours_persist = ReplicationStager(pg, timeout, storage_dir=stager_dir, persist_format="stager")
    theirs = _ReplicationStager(pg, timeout, torch.device("cpu"), storage_dir=os.path.join(base, "torch-memory"))
    theirs._persist_state_dict = lambda *args: None  # type: ignore[method-assign]  # the same exchange without the file
    theirs_persist = _ReplicationStager(pg, timeout, torch.device("cpu"), storage_dir=torch_dir)

    timed = timed_on_all_ranks

    def measure(workload: str, sd: Any) -> dict[str, Any]:
        nbytes, ntensors = ctx.nbytes_of(sd), ctx.count_tensors(sd)
        log(f"  [{workload}] {nbytes / 1e9:.3f} GB in {ntensors} tensors, 2 ranks over gloo")
        send_buf = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)
        recv_buf = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
        limit_path = os.path.join(base, "limit.bin")
        os.makedirs(base, exist_ok=True)

        def wire_limit() -> None:
            works = [pg.recv([recv_buf], partner, 77), pg.send([send_buf], partner, 77)]
            for work in works:
                work.wait(timeout)

        def disk_limit() -> None:
            write_and_fsync(limit_path, send_buf.numpy().data)

        def remove_limit_file() -> None:
            try:
                os.unlink(limit_path)
            except FileNotFoundError:
                pass

        cases: list[tuple[str, Callable[[], Any]]] = [
            (WIRE_LIMIT, wire_limit),
            (STAGER, lambda: ours.stage(sd)),
            (TORCH, lambda: theirs.stage(sd)),
            (DISK_LIMIT, disk_limit),
            (STAGER_PERSIST, lambda: ours_persist.stage(sd)),
            (TORCH_PERSIST, lambda: theirs_persist.stage(sd)),
        ]
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        # Like the persistence section: no timed call pays for freeing the blocks of the file it
        # replaces (the previous replica is removed, untimed, before each persisted call). The
        # memory-only stager drops the replica it holds first too (PyTorch's holds none), so no
        # row holds two replicas at once.
        setups = {DISK_LIMIT: remove_limit_file, STAGER: ours.close,
                  STAGER_PERSIST: lambda: _clear(stager_dir), TORCH_PERSIST: lambda: _clear(torch_dir)}
        # One untimed round of stager's rows warms its pools (later checkpoints reuse them).
        timed(lambda: ours.stage(sd), ours.close)
        timed(lambda: ours_persist.stage(sd))
        for round_ in range(ctx.repeats):
            for name, fn in cases:
                if name in (TORCH, TORCH_PERSIST) and workload == "tiny" and round_ >= _TORCH_TINY_ROUNDS:
                    continue
                samples[name].append(timed(fn, setups.get(name)))
            log(f"  [{workload}] round {round_ + 1}/{ctx.repeats}: "
                + ", ".join(f"{name} {values[-1]:.3f}s" for name, values in samples.items() if values))
        remove_limit_file()
        ours.close()
        ours_persist.close()
        return {"nbytes": nbytes, "ntensors": ntensors, "samples": samples}

    report: dict[str, Any] = {}
    report["large"] = measure("large", ctx.large_state_dict())
    ctx.drop_workloads()
    report["tiny"] = measure("tiny", ctx.tiny_state_dict())
    ctx.drop_workloads()
    report.update(_dtensor_exchange(ctx, pg, timeout, log))
    return report


# ---- DTensor exchange (the DTensor leaves' rows, measured by the same two ranks) ----------------------

DTENSOR_STAGER = "stager ReplicationStager DTensor"
DTENSOR_PLAIN = "stager ReplicationStager plain tensors (same bytes)"
DTENSOR_TORCH = "PyTorch _ReplicationStager DTensor"


def _dtensor_exchange(ctx: BenchContext, pg: Any, timeout: datetime.timedelta, log: Callable[[str], None]) -> dict:
    """Samples of the DTensor exchange rows: the staging section's DTensor workloads (256 weights
    of 4 MiB plus biases, capped at the section's bytes per rank; ``--tiny`` small ones), each
    rank's tensors its ``Shard(0)`` shards on a 2-rank mesh."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.staging import _ReplicationStager
    from torch.distributed.device_mesh import init_device_mesh

    from ..replication import ReplicationStager
    from .staging import _dtensor_workloads, dtensor_state_dict

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ours = ReplicationStager(pg, timeout, persist_format=None)
    theirs = _ReplicationStager(pg, timeout, torch.device("cpu"))
    theirs._persist_state_dict = lambda *args: None  # type: ignore[method-assign]

    timed = timed_on_all_ranks

    def measure(name: str, plain: dict) -> dict[str, Any]:
        workload = f"{name} exchange"
        dtensors = dtensor_state_dict(plain, mesh)
        nbytes = ctx.nbytes_of(plain)
        log(f"  [{workload}] {nbytes / 1e9:.3f} GB in {len(plain)} DTensors per rank, 2 ranks over gloo")
        cases = [(DTENSOR_STAGER, lambda: ours.stage(dtensors)), (DTENSOR_PLAIN, lambda: ours.stage(plain)),
                 (DTENSOR_TORCH, lambda: theirs.stage(dtensors))]
        samples: dict[str, list[float]] = {case: [] for case, _ in cases}
        timed(lambda: ours.stage(dtensors))  # warm the pools
        for round_ in range(ctx.repeats):
            for case, fn in cases:
                if case == DTENSOR_TORCH and "tiny" in name and round_ >= _TORCH_TINY_ROUNDS:
                    continue
                samples[case].append(timed(fn))
            log(f"  [{workload}] round {round_ + 1}/{ctx.repeats}: "
                + ", ".join(f"{case} {values[-1]:.3f}s" for case, values in samples.items() if values))
        return {workload: {"nbytes": nbytes, "ntensors": len(plain), "samples": samples}}

    report: dict[str, Any] = {}
    workloads = _dtensor_workloads(ctx)
    while workloads:  # one at a time: the large one is freed before the tiny one is built
        name = next(iter(workloads))
        report.update(measure(name, workloads.pop(name)))
    return report


def _dtensor_rows(ctx: BenchContext, workload: str, data: dict[str, Any]) -> list[Row]:
    samples = data["samples"]
    size = {"nbytes": data["nbytes"], "ntensors": data["ntensors"]}
    plain = statistics.median(samples[DTENSOR_PLAIN])
    vs_plain = plain / statistics.median(samples[DTENSOR_STAGER])
    return [
        ctx.row(SECTION, workload, DTENSOR_STAGER, samples[DTENSOR_STAGER], baseline=DTENSOR_TORCH, **size,
                extra={"speed_vs_plain_tensors": round(vs_plain, 3), "target_vs_plain_tensors": 0.85,
                       "summary": f"{vs_plain:.2f}x the plain-tensor exchange"}),
        ctx.row(SECTION, workload, DTENSOR_PLAIN, samples[DTENSOR_PLAIN], baseline=DTENSOR_TORCH, **size),
        ctx.row(SECTION, workload, DTENSOR_TORCH, samples[DTENSOR_TORCH], **size),
    ]
