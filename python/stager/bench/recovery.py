"""``recovery`` section of ``stager bench``: restore() and k-way replication over gloo, 2 and 4 ranks.

Each configuration spawns its ranks (gloo on 127.0.0.1); every timed call starts after a barrier
on all ranks and its time is the slowest rank's (an all-reduce MAX). Each rank holds the large
synthetic transformer + Adam dict (``--size``, at most :data:`BYTES_FOR_ALL_RANKS` over the ranks); rank r's
replica is held by its PyTorch partner ``(r + world // 2) % world``, so a restore where every
rank was restarted is a full swap: each rank serves its partner's state and receives its own.

Rows of ``restore, <n> ranks`` (measured interleaved, round by round, after the wire limit):

* ``limit: gloo exchange of one buffer``: every rank sends one buffer of the dict's bytes to its
  partner while receiving one (``send`` and ``recv`` posted together);
* ``stager restore() (restarted: copies on disk)``: fresh ReplicationStagers on the old
  ``storage_dir``s (inventory, reading and checking the ``.stager`` replica, sending it, receiving
  this rank's state); its limit is ``limit: cold direct read, then gloo exchange``, the sum of
  the round's ``limit: cold direct read of the replica file`` (each rank reads the replica it
  serves with O_DIRECT, 8 MiB requests, 4 in flight, into touched memory, all ranks at once) and
  its gloo exchange: the reader fills the pool buffer before the transport sends it;
* ``stager restore() (survivors: replicas in memory)``: the stagers that replicated, restoring from
  the replicas they hold in memory;
* ``stager restore() (restarted, survive_restart: own copies in shared memory)``: fresh stagers
  after a restart with ``survive_restart=True, keep_own=True``: each rank takes its own copy out
  of its node's shared memory (checksums verified, no copy, nothing on the wire);
* ``stager restore() (restarted, node replaced: holders' shared memory)``: ``survive_restart``
  without own copies (as for the ranks of a replaced node): each rank's copy comes from its
  holder's shared memory over gloo;
* ``stager restore(into=model) (restarted, survive_restart: own copies in shared memory)``: the
  same, into the tensors of an existing state_dict (checksums verified over the segment, then one
  parallel copy by the copy engine into the targets);
* ``limit: memory copy of one buffer``: one parallel copy (all copy threads) of the dict's bytes
  from one touched buffer into another, on every rank at once like the restore rows (a barrier
  before each sample, the slowest rank's time): the limit of the shared-memory rows;
* ``PyTorch: torch.load replica + PGTransport``: what a PyTorch user does with
  ``_ReplicationStager``'s ``.pt`` files: ``torch.load`` the partner's replica, then PyTorch's
  ``PGTransport`` sends it to the partner and receives this rank's (lower rank sends first).

Rows of ``peak host memory, <n> ranks``: ``ReplicationStager(keep_own=True)`` with and without
``survive_restart`` (two nodes, each rank's own copy on its disk and, with survive_restart, in
shared memory), three stages each; the row's time is the third stage's, and its ``extra`` holds the
peak host memory during that stage summed over the ranks: each rank's anonymous resident memory
(``RssAnon``: its dict, pool buffers, torch) plus the shared-memory segments of its
``storage_dir`` (tmpfs pages are RAM whether mapped or not), sampled every 2 ms.

Rows of ``replication, <n> ranks`` (4 ranks, one rank per failure domain, memory only):

* ``limit: gloo exchange of one buffer`` / ``limit: gloo, two buffers each way``: one buffer to
  and from one peer, or to two peers while receiving from two;
* ``stager ReplicationStager replicas=1`` and ``replicas=2`` (each rank's state to 1 or 2
  holders at once); ``replicas=2`` carries its ratio to ``replicas=1`` in ``extra``.
"""

from __future__ import annotations

import datetime
import gc
import os
import shutil
import statistics
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from .common import BenchContext, Row, run_ranks, timed_on_all_ranks

SECTION = "recovery"

WIRE = "limit: gloo exchange of one buffer"
WIRE_TWO = "limit: gloo, two buffers each way"
DISK = "stager restore() (restarted: copies on disk)"
MEMORY = "stager restore() (survivors: replicas in memory)"
TORCH = "PyTorch: torch.load replica + PGTransport"
SHM = "stager restore() (restarted, survive_restart: own copies in shared memory)"
SHM_HOLDER = "stager restore() (restarted, node replaced: holders' shared memory)"
SHM_INTO = "stager restore(into=model) (restarted, survive_restart: own copies in shared memory)"
MEMCPY = "limit: memory copy of one buffer"
READ = "limit: cold direct read of the replica file"
READ_WIRE = "limit: cold direct read, then gloo exchange"
ONE = "stager ReplicationStager replicas=1"
PEAK_PLAIN = "stager ReplicationStager keep_own stage(): peak host memory"
PEAK_SHM = "stager ReplicationStager keep_own survive_restart stage(): peak host memory"
TWO = "stager ReplicationStager replicas=2"

#: Bytes per rank: each rank on one machine holds its dict (the target of restore(into=)), a
#: survivor's replica in memory, the shared-memory copies of both survive_restart layouts and the
#: copy being restored, about 5x the dict, so the ranks of one run share this budget (1 GB per rank with 2 ranks, 0.5 GB with 4)
#: to stay inside a 24 GB machine.
BYTES_FOR_ALL_RANKS = 2_000_000_000
WORLDS = (2, 4)


def run(ctx: BenchContext) -> list[Row]:
    ctx.drop_workloads()  # the ranks build their own
    rows: list[Row] = []
    for world in WORLDS:
        size_bytes = min(ctx.size_bytes, BYTES_FOR_ALL_RANKS // world)
        if size_bytes < ctx.size_bytes:
            ctx.log(f"  recovery uses {size_bytes / 1e9:.2f} GB per rank with {world} ranks (all on one machine)")
        settings = {"size_bytes": size_bytes, "tiny_count": ctx.tiny_count, "repeats": ctx.repeats,
                    "threads": ctx.threads, "workdir": os.path.join(ctx.workdir, f"recovery-{world}")}
        try:
            report = _spawn(ctx, world, settings)
        finally:
            _release_segments(str(settings["workdir"]), world)
            shutil.rmtree(str(settings["workdir"]), ignore_errors=True)
        for workload, data in report.items():
            rows += _rows(ctx, workload, data)
    return rows


def _release_segments(workdir: str, world: int) -> None:
    """Removes the shared-memory copies the ranks made, also when a rank died before its own
    release (a killed rank's segments would otherwise hold RAM until a reboot)."""
    from .. import segments

    for rank in range(world):
        for layout in ("shm-own", "shm-holders", "peak-1"):
            segments.release_shared_memory(os.path.join(workdir, f"rank{rank}", layout))


def _spawn(ctx: BenchContext, world: int, settings: dict) -> dict[str, Any]:
    """This section's worker on ``world`` ranks (see ``common.run_ranks``)."""
    return run_ranks(ctx, world, _worker, settings, what="recovery",
                     deadline_s=600 + 90 * ctx.repeats * max(1.0, settings["size_bytes"] / 1e9))


def _rows(ctx: BenchContext, workload: str, data: dict[str, Any]) -> list[Row]:
    samples = data["samples"]
    size = {"nbytes": data["nbytes"], "ntensors": data["ntensors"]}
    if workload.startswith("restore"):
        return [
            ctx.row(SECTION, workload, WIRE, samples[WIRE], **size),
            ctx.row(SECTION, workload, MEMCPY, samples[MEMCPY], **size),
            ctx.row(SECTION, workload, SHM, samples[SHM], limit=MEMCPY, baseline=TORCH, **size),
            ctx.row(SECTION, workload, SHM_INTO, samples[SHM_INTO], limit=MEMCPY, baseline=TORCH, **size),
            ctx.row(SECTION, workload, SHM_HOLDER, samples[SHM_HOLDER], limit=WIRE, baseline=TORCH, **size),
            ctx.row(SECTION, workload, READ, samples[READ], **size),
            ctx.row(SECTION, workload, READ_WIRE, [r + w for r, w in zip(samples[READ], samples[WIRE])], **size),
            ctx.row(SECTION, workload, DISK, samples[DISK], limit=READ_WIRE, baseline=TORCH, **size),
            ctx.row(SECTION, workload, MEMORY, samples[MEMORY], limit=WIRE, baseline=TORCH, **size),
            ctx.row(SECTION, workload, TORCH, samples[TORCH], limit=WIRE, **size),
        ]
    if workload.startswith("peak"):
        plain, shm = data["peak_bytes"][PEAK_PLAIN], data["peak_bytes"][PEAK_SHM]
        ratio = shm / plain if plain else None
        return [
            ctx.row(SECTION, workload, PEAK_PLAIN, samples[PEAK_PLAIN], **size,
                    extra={"peak_host_bytes": plain, "summary": f"peak {plain / 1e9:.2f} GB"}),
            ctx.row(SECTION, workload, PEAK_SHM, samples[PEAK_SHM], **size,
                    extra={"peak_host_bytes": shm, "peak_vs_survive_restart_false": ratio,
                           "summary": f"peak {shm / 1e9:.2f} GB, {ratio:.2f}x survive_restart=False"
                           if ratio else ""}),
        ]
    one, two = statistics.median(samples[ONE]), statistics.median(samples[TWO])
    ratio = two / one if one > 0 else None
    return [
        ctx.row(SECTION, workload, WIRE, samples[WIRE], **size),
        ctx.row(SECTION, workload, WIRE_TWO, samples[WIRE_TWO], **size),
        ctx.row(SECTION, workload, ONE, samples[ONE], limit=WIRE, **size),
        ctx.row(SECTION, workload, TWO, samples[TWO], limit=WIRE_TWO, **size,
                extra={"time_vs_replicas_1": ratio, "summary": f"{ratio:.2f}x the replicas=1 time" if ratio else ""}),
    ]


# ---- the ranks ---------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, settings: dict, results: Any) -> None:
    try:
        import warnings

        import torch
        import torch.distributed as dist

        # PyTorch's PGTransport warns about a read-only buffer on every send; once is enough.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        try:
            report = _measure(rank, world, settings, results)
        finally:
            dist.destroy_process_group()
        results.put(("report", report) if rank == 0 else ("done", None))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _measure(rank: int, world: int, settings: dict, results: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint._pg_transport import PGTransport as TorchTransport
    from torch.distributed.checkpoint.staging import _ReplicationStager

    from ..replication import ReplicationStager

    def log(message: str) -> None:
        if rank == 0:
            results.put(("log", message))

    ctx = BenchContext(size_bytes=settings["size_bytes"], tiny_count=settings["tiny_count"],
                       repeats=settings["repeats"], threads=settings["threads"], workdir=settings["workdir"],
                       progress=False)
    pg = dist.distributed_c10d._get_default_group()
    partner = (rank + world // 2) % world
    timeout = datetime.timedelta(minutes=10)
    base = os.path.join(settings["workdir"], f"rank{rank}")
    stager_dir, torch_dir = os.path.join(base, "stager"), os.path.join(base, "torch")

    timed = timed_on_all_ranks

    def exchange(send: torch.Tensor, peers_out: list[int], receives: list[tuple[torch.Tensor, int]]) -> None:
        works = [pg.recv([buffer], src, 91) for buffer, src in receives]
        works += [pg.send([send], dst, 91) for dst in peers_out]
        for work in works:
            work.wait(timeout)

    def replication(sd: Any, nbytes: int, ntensors: int) -> dict[str, Any]:
        """replicas=1 vs replicas=2, memory only, one rank per failure domain."""
        workload = f"replication, {world} ranks"
        samples: dict[str, list[float]] = {WIRE: [], WIRE_TWO: [], ONE: [], TWO: []}
        send = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)
        receives = [(torch.empty(nbytes, dtype=torch.uint8), (rank - 1) % world),
                    (torch.empty(nbytes, dtype=torch.uint8), (rank - 2) % world)]
        peer = (rank + world // 2) % world
        for _ in range(ctx.repeats):
            samples[WIRE].append(timed(lambda: exchange(send, [peer], [(receives[0][0], peer)])))
            samples[WIRE_TWO].append(timed(lambda: exchange(send, [(rank + 1) % world, (rank + 2) % world],
                                                            receives)))
        # Free the limits' buffers before the stagers fill theirs (the closures above are done).
        send = receives = None  # type: ignore[assignment]
        gc.collect()
        stagers = {ONE: ReplicationStager(pg, timeout, persist_format=None, replicas=1, ranks_per_node=1),
                   TWO: ReplicationStager(pg, timeout, persist_format=None, replicas=2, ranks_per_node=1)}
        def drop_replicas() -> None:
            """No stager holds replicas during another's call: each starts from the same pool."""
            for replicator in stagers.values():
                replicator.close()

        for replicator in stagers.values():  # warm the pools
            timed(partial(replicator.stage, sd), setup=drop_replicas)
        for round_ in range(ctx.repeats):
            for name, replicator in stagers.items():
                samples[name].append(timed(partial(replicator.stage, sd), setup=drop_replicas))
            log(f"  [{workload}] round {round_ + 1}/{ctx.repeats}: "
                + ", ".join(f"{name} {values[-1]:.3f}s" for name, values in samples.items() if values))
        drop_replicas()
        return {"nbytes": nbytes, "ntensors": ntensors, "samples": samples}

    def peak_host_memory(sd: Any, nbytes: int, ntensors: int) -> dict[str, Any]:
        """Peak host memory of the third keep_own stage with and without survive_restart."""
        import threading

        from .. import segments

        def host_bytes(directory: str) -> int:
            with open("/proc/self/status") as f:
                anon = next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
            return anon + sum(s.nbytes for s in segments.find_segments(directory, temps=True))

        samples: dict[str, list[float]] = {}
        peaks: dict[str, int] = {}
        for name, survive in ((PEAK_PLAIN, False), (PEAK_SHM, True)):
            directory = os.path.join(base, f"peak-{int(survive)}")
            replicator = ReplicationStager(pg, timeout, storage_dir=directory, keep_own=True, ranks_per_node=rpn,
                                           survive_restart=survive)
            try:
                for step in (1, 2):
                    replicator.stage(sd, step=step)
                gc.collect()
                peak = [host_bytes(directory)]
                stop = threading.Event()

                def sample(directory: str = directory, peak: list[int] = peak, stop: threading.Event = stop) -> None:
                    while not stop.wait(0.002):
                        peak[0] = max(peak[0], host_bytes(directory))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    samples[name] = [timed(partial(replicator.stage, sd, step=3))]
                finally:
                    stop.set()
                    sampler.join()
                peak[0] = max(peak[0], host_bytes(directory))
                total = torch.tensor([peak[0]], dtype=torch.int64)
                dist.all_reduce(total)
                peaks[name] = int(total.item())
            finally:
                replicator.close()
                del replicator
                gc.collect()
                dist.barrier()
                segments.release_shared_memory(directory)
                shutil.rmtree(directory, ignore_errors=True)
        log(f"  [{world} ranks] peak host memory: " + ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in peaks.items()))
        return {"nbytes": nbytes, "ntensors": ntensors, "samples": samples, "peak_bytes": peaks}

    def wire_limit(nbytes: int) -> list[float]:
        send = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256)
        receive = torch.empty(nbytes, dtype=torch.uint8)
        return [timed(lambda: exchange(send, [partner], [(receive, partner)])) for _ in range(ctx.repeats)]

    def make_replicas(sd: Any) -> Any:
        """Replicates once with stager (``.stager`` files, replicas in memory) and with PyTorch
        (``.pt`` files); returns the stager that holds the replicas in memory."""
        survivor = ReplicationStager(pg, timeout, storage_dir=stager_dir, persist_format="stager")
        survivor.stage(sd)  # rank_{rank}_replica_partner_{partner}.stager
        _ReplicationStager(pg, timeout, torch.device("cpu"), storage_dir=torch_dir).stage(sd)  # ... .pt
        return survivor

    torch_replica = os.path.join(torch_dir, f"rank_{rank}_replica_partner_{partner}.pt")

    def torch_restore() -> Any:
        with open(torch_replica, "rb") as f:
            held = torch.load(f, map_location="cpu", weights_only=True)
        transport = TorchTransport(pg, timeout, torch.device("cpu"))
        if rank < partner:
            transport.send_checkpoint([partner], held)
            return transport.recv_checkpoint(partner)
        received = transport.recv_checkpoint(partner)
        transport.send_checkpoint([partner], held)
        return received

    report: dict[str, Any] = {}
    sd: Any = ctx.large_state_dict()  # a state_dict; dropped (None) once the replicas hold it
    nbytes, ntensors = ctx.nbytes_of(sd), ctx.count_tensors(sd)
    log(f"  [{world} ranks] {nbytes / 1e9:.3f} GB in {ntensors} tensors per rank")
    if world >= 3:
        report[f"replication, {world} ranks"] = replication(sd, nbytes, ntensors)
        gc.collect()
    rpn = max(1, world // 2)  # two simulated nodes
    report[f"peak host memory, {world} ranks"] = peak_host_memory(sd, nbytes, ntensors)
    gc.collect()
    workload = f"restore, {world} ranks"
    from .. import _native, segments

    def memcpy_limit() -> list[float]:
        """One parallel copy of one touched buffer into another, on all ranks at once: the
        slowest rank's copy time of each sample (the destination's touch is not timed)."""
        source = torch.empty(nbytes, dtype=torch.uint8).fill_(7).numpy()
        seconds = []
        for _ in range(ctx.repeats):
            dist.barrier()
            copy = _native.copy_limit_seconds(nbytes, settings["threads"], "touched", 1, source)[0]
            slowest = torch.tensor([copy], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds.append(float(slowest.item()))
        return seconds

    samples = {WIRE: wire_limit(nbytes), DISK: [], MEMORY: [], TORCH: [], SHM: [], SHM_INTO: [], SHM_HOLDER: [],
               READ: [], MEMCPY: memcpy_limit()}
    gc.collect()
    survivor = make_replicas(sd)
    # survive_restart: own copies (two simulated nodes) and replicas only, in shared memory
    shm_own, shm_holders = os.path.join(base, "shm-own"), os.path.join(base, "shm-holders")
    ReplicationStager(pg, timeout, storage_dir=shm_own, persist_format="stager", keep_own=True,
                      ranks_per_node=rpn, survive_restart=True).stage(sd)
    ReplicationStager(pg, timeout, storage_dir=shm_holders, persist_format=None, ranks_per_node=rpn,
                      survive_restart=True).stage(sd)
    gc.collect()
    into: Any = sd  # the model restore(into=) fills: the dict itself (the replicas are what restore works from)
    sd = None
    ctx.drop_workloads()
    cases: list[tuple[str, Callable[[], Any]]] = [
        (DISK, lambda: ReplicationStager(pg, timeout, storage_dir=stager_dir).restore()),
        (MEMORY, survivor.restore),
        (SHM, lambda: ReplicationStager(pg, timeout, storage_dir=shm_own, keep_own=True, ranks_per_node=rpn,
                                        survive_restart=True).restore()),
        (SHM_INTO, lambda: ReplicationStager(pg, timeout, storage_dir=shm_own, keep_own=True, ranks_per_node=rpn,
                                             survive_restart=True).restore(into=into)),
        (SHM_HOLDER, lambda: ReplicationStager(pg, timeout, storage_dir=shm_holders, persist_format=None,
                                               ranks_per_node=rpn, survive_restart=True).restore()),
        (TORCH, torch_restore),
    ]
    from .persistence import DiskLimits

    replica_file = os.path.join(stager_dir, f"rank_{rank}_replica_partner_{partner}.stager")
    disk = DiskLimits(base, os.path.getsize(replica_file))
    cases.append((READ, lambda: disk.read(replica_file)))
    timed(cases[0][1])  # warm the pools
    for round_ in range(ctx.repeats):
        for name, fn in cases:
            samples[name].append(timed(fn))
        log(f"  [{workload}] round {round_ + 1}/{ctx.repeats}: "
            + ", ".join(f"{name} {values[-1]:.3f}s" for name, values in samples.items() if values))
    report[workload] = {"nbytes": nbytes, "ntensors": ntensors, "samples": samples}
    survivor.close()
    disk.close()
    into = None
    gc.collect()
    dist.barrier()
    segments.release_shared_memory(shm_own)
    segments.release_shared_memory(shm_holders)
    return report
