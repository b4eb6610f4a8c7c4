"""One rank of a replication or recovery test: ``python replication_worker.py RANK WORLD PORT DIR STEPS_JSON``.

Joins a gloo group on ``$STAGER_TEST_HOST`` (127.0.0.1 by default; a namespace's address in the
network tests) once (starting Python and torch is the slow part on a busy 2-core machine), runs
each ``[scenario, options]`` of STEPS_JSON in order, each in its own subdirectory of DIR
(``options["subdir"]``, default the scenario's name), prints one JSON line ``RESULT {...}`` per
scenario and exits by itself (exit code 0 when every check passed). Scenarios that leave the
group broken end the process with ``os._exit`` (a broken group is not waited for at exit).
"""

import datetime
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict, namedtuple

import torch
import torch.distributed as dist
from ranks import report, worker_main  # tests/ is on sys.path: this script runs from there

import stager
from helpers import (
    assert_same_tree,  # tests/ is on sys.path: this script runs from there
)
from stager import replication as replication_module
from stager import transport as transport_module

Point = namedtuple("Point", "x y")


def make_state_dict(rank, *, big_numel=0, step=0):
    """A deterministic state_dict per rank: nesting, views, non-tensor leaves, dtypes."""
    gen = torch.Generator().manual_seed(1000 + rank + 100 * step)
    base = torch.randn(64, 32, generator=gen)
    sd = {
        "model": OrderedDict(
            weight=base,
            weight_t=base.t(),  # a view: same storage, other strides
            row=base[3],  # a view with a storage offset
            bias=torch.arange(7, dtype=torch.int64) + rank,
            half=torch.randn(5, 3, generator=gen).to(torch.bfloat16),
            flags=torch.tensor([True, False, rank % 2 == 0]),
            empty=torch.empty(0, 4),
        ),
        "optim": {
            "state": {0: {"step": torch.tensor(float(step + rank)), "exp_avg": torch.randn(33, generator=gen)}},
            "param_groups": [{"lr": 0.001 * (rank + 1), "betas": (0.9, 0.999), "name": f"group-{rank}",
                              "nesterov": rank % 2 == 1, "eps": None}],
        },
        "extra": {"rank": rank, "step": step, "pair": (rank, "y"), "blob": bytes([rank, 1, 2]),
                  "dtype": torch.float16, "scale": 1.5, "inf": float("inf")},
    }
    if big_numel:
        sd["model"]["big"] = torch.arange(big_numel, dtype=torch.float32) * (rank + 1) + step
    return sd


def wait_for_files(paths, seconds):
    """Waits (bounded by ``seconds``) until every file of ``paths`` exists: how a rank that must
    stay away waits for the others to be done with it, instead of guessing a duration that load
    can outlast."""
    end = time.monotonic() + seconds
    while not all(os.path.exists(path) for path in paths):
        if time.monotonic() > end:
            raise AssertionError(f"waited {seconds}s for {paths}")
        time.sleep(0.02)


def announce_first_wait(line):
    """Prints ``line`` when this process first waits for a transfer's completions (the rank is
    then inside the wait a test may interrupt)."""
    original = transport_module._Waits.next

    def next_completion(self):
        if transport_module._Waits.next is next_completion:
            transport_module._Waits.next = original
            print(line, flush=True)
        return original(self)

    transport_module._Waits.next = next_completion


def check_views(received):
    model = received["model"]
    assert model["weight_t"].untyped_storage().data_ptr() == model["weight"].untyped_storage().data_ptr()
    assert model["row"].untyped_storage().data_ptr() == model["weight"].untyped_storage().data_ptr()
    assert model["row"].storage_offset() == 3 * 32


def temps(directory, rank=None):
    prefix = f"rank_{rank}_" if rank is not None else ""
    return [name for name in os.listdir(directory) if name.startswith(prefix) and name.endswith(".tmp")]


# ---- replication -----------------------------------------------------------------------------------------


def scenario_exchange(rank, world, directory, options):
    topology = options.get("topology", "pairs")
    fmt = options.get("persist_format", "stager")
    big = options.get("big_numel", 0)
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=30), storage_dir=directory,
                                          topology=topology, persist_format=fmt)
    assert replicator.should_synchronize_after_execute is False
    dst, src = replicator.peers(rank, world)
    if topology == "pairs" and world % 2 == 0:
        assert dst == src == (rank + world // 2) % world
    else:
        assert (dst, src) == ((rank + 1) % world, (rank - 1) % world)
    for step in range(options.get("steps", 1)):
        mine = make_state_dict(rank, big_numel=big, step=step)
        received = replicator.stage(mine)
        assert_same_tree(received, make_state_dict(src, big_numel=big, step=step))
        check_views(received)
        path = os.path.join(directory, f"rank_{rank}_replica_partner_{src}.{'pt' if fmt == 'torch' else 'stager'}")
        assert os.path.exists(path), path
        assert replicator._get_persisted_path(rank, src) == path
        # the input is untouched
        assert_same_tree(mine, make_state_dict(rank, big_numel=big, step=step))
    assert not temps(directory, rank)
    report(rank=rank, src=src, dst=dst)


def scenario_transport(rank, world, directory, options):
    """PGTransport with PyTorch's interface: send/recv one way, in place, tiny buckets."""
    pg = dist.distributed_c10d._get_default_group()
    sd = make_state_dict(0, big_numel=5000)
    if rank == 0:
        transport = stager.PGTransport(pg, datetime.timedelta(seconds=20), torch.device("cpu"),
                                       bucket_bytes=512, chunk_bytes=4096)
        transport.send_checkpoint([r for r in range(1, world)], sd)
        report(rank=rank)
        return
    targets = make_state_dict(5)  # same shapes, other values
    targets["model"]["big"] = torch.zeros(5000)
    pointers = {key: t.untyped_storage().data_ptr() for key, t in targets["model"].items()}
    transport = stager.PGTransport(pg, datetime.timedelta(seconds=20), torch.device("cpu"),
                                   state_dict=lambda: targets, bucket_bytes=512, chunk_bytes=4096)
    received = transport.recv_checkpoint(0)
    assert_same_tree(received, sd)
    check_views(received)
    inplace = [key for key, t in received["model"].items()
               if t.numel() and t.untyped_storage().data_ptr() == pointers[key]]
    # every tensor with a same-sized storage at the same key received in place
    assert {"weight", "weight_t", "row", "bias", "big"} <= set(inplace), inplace
    assert torch.equal(targets["model"]["big"], sd["model"]["big"])
    report(rank=rank, inplace=sorted(inplace))


class Opaque:
    """A leaf that can't travel without pickle."""


def scenario_unsendable(rank, world, directory, options):
    """The ranks in ``victims`` have a leaf that needs pickle: every rank fails at once (no
    timeout) with the same StagerError naming each victim and the key, the previous replicas
    stay, and the group stays usable: the next stage() succeeds."""
    timeout = options.get("timeout", 30)
    victims = options.get("victims", [1])
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=timeout), storage_dir=directory)
    src = replicator.peers(rank, world)[1]
    replicator.stage(make_state_dict(rank))
    sd = make_state_dict(rank, step=1)
    if rank in victims:
        sd["extra"]["opaque"] = Opaque()
    started = time.monotonic()
    try:
        replicator.stage(sd)
    except stager.StagerError as err:
        elapsed = time.monotonic() - started
        message = str(err)
        for victim in victims:
            assert f"rank {victim}: " in str(err) and "Opaque" in str(err) and "root.extra.opaque" in str(err), str(err)
        assert_same_tree(stager.recover(directory, src), make_state_dict(src))
        assert not temps(directory)
    else:
        raise AssertionError("stage() accepted a leaf that needs pickle")
    # nothing was left in flight: the same stager replicates the next step
    received = replicator.stage(make_state_dict(rank, step=2))
    assert_same_tree(received, make_state_dict(src, step=2))
    report(rank=rank, error=message, elapsed=elapsed)


def scenario_transport_unsendable(rank, world, directory, options):
    """PGTransport: a sender whose dict can't travel tells its receivers in the header."""
    pg = dist.distributed_c10d._get_default_group()
    transport = stager.PGTransport(pg, datetime.timedelta(seconds=30), "cpu")
    started = time.monotonic()
    if rank == 0:
        bad = make_state_dict(0)
        bad["model"]["opaque"] = Opaque()
        try:
            transport.send_checkpoint(list(range(1, world)), bad)
        except transport_module.TransportError as err:
            assert err.kind == transport_module.UNSENDABLE and "root.model.opaque" in str(err), str(err)
            kind = err.kind
        else:
            raise AssertionError("send_checkpoint accepted a leaf that needs pickle")
        transport.send_checkpoint(list(range(1, world)), make_state_dict(0, step=1))
    else:
        try:
            transport.recv_checkpoint(0)
        except transport_module.TransportError as err:
            assert err.kind == transport_module.REMOTE and err.rank == 0 and "root.model.opaque" in str(err), str(err)
            kind = err.kind
        else:
            raise AssertionError("recv_checkpoint returned although the sender could not send")
        assert_same_tree(transport.recv_checkpoint(0), make_state_dict(0, step=1))
    if world == 2:  # full duplex: one side can't send; both raise at once, nothing left in flight
        partner = 1 - rank
        bad = make_state_dict(rank)
        if rank == 1:
            bad["model"]["opaque"] = Opaque()
        try:
            transport.exchange(partner, bad, partner)
        except transport_module.TransportError as err:
            expected = transport_module.UNSENDABLE if rank == 1 else transport_module.REMOTE
            assert err.kind == expected and "root.model.opaque" in str(err), str(err)
        else:
            raise AssertionError("exchange() went through although rank 1 could not send")
        assert_same_tree(transport.exchange(partner, make_state_dict(rank, step=2), partner),
                         make_state_dict(partner, step=2))
    report(rank=rank, kind=kind, elapsed=time.monotonic() - started)


def scenario_disagree(rank, world, directory, options):
    """Different steps on different ranks: the same StagerError everywhere, group still usable."""
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=30), storage_dir=directory)
    try:
        replicator.stage(make_state_dict(rank), step=10 + rank)
    except stager.StagerError as err:
        message = str(err)
        assert "different steps" in message, message
    else:
        raise AssertionError("stage() accepted different steps")
    replicator.stage(make_state_dict(rank), step=20)
    steps = {r.step for r in stager.find_replicas(directory) if r.rank == rank}
    assert steps == {20}, steps
    report(rank=rank, error=message)


def _prepare_failure(rank, world, directory, options):
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=options["timeout"]),
                                          storage_dir=directory, persist_format=options.get("persist_format", "stager"))
    replicator.stage(make_state_dict(rank, step=0))  # a good replica first
    return replicator


def _check_after_failure(rank, world, directory, err, started, partner):
    elapsed = time.monotonic() - started
    assert isinstance(err, stager.StagerError), repr(err)
    assert f"rank {partner}" in str(err), str(err)
    assert not temps(directory, rank), temps(directory, rank)
    previous = stager.recover(directory, partner)
    assert_same_tree(previous, make_state_dict(partner, step=0))
    report(rank=rank, elapsed=elapsed, error=str(err), kind=getattr(err, "kind", None))


def scenario_killed(rank, world, directory, options):
    """Rank ``victim`` dies (SIGKILL) in the middle of exchanging a large dict."""
    victim = options.get("victim", 1)
    replicator = _prepare_failure(rank, world, directory, options)
    if rank == victim:
        original = transport_module.PGTransport._post

        def die_mid_send(self, waits, op, tensor, peer, seq, index, token):
            # The third data segment is never posted: the partner can't have received it all.
            if op == "send" and index >= transport_module._TAG_FIRST_SEGMENT + 2:
                time.sleep(0.2)  # let the first segments reach the partner
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, waits, op, tensor, peer, seq, index, token)

        transport_module.PGTransport._post = die_mid_send
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=options["big_numel"], step=1))
    except Exception as err:
        _check_after_failure(rank, world, directory, err, started, victim)
        os._exit(0)  # the group is broken: don't wait on it at exit
    raise AssertionError(f"rank {rank}: stage() succeeded although rank {victim} died")


def scenario_stall(rank, world, directory, options):
    """Rank ``victim`` never calls stage() a second time; the others must fail within the timeout,
    and every later call says the group is broken instead of waiting or repeating the timeout."""
    victim = options.get("victim", 1)
    replicator = _prepare_failure(rank, world, directory, options)
    done = [os.path.join(directory, f"stall.done.{r}") for r in range(world) if r != victim]
    if rank == victim:
        # Away until every other rank has failed and reported: exiting earlier would close the
        # connections, and a loaded machine would see "connection closed" instead of the timeout.
        wait_for_files(done, options["timeout"] + 60)
        report(rank=rank, stalled=True)
        os._exit(0)
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=options.get("big_numel", 0), step=1))
    except Exception as err:
        assert getattr(err, "kind", None) == transport_module.TIMEOUT, repr(err)
        again = time.monotonic()
        try:
            replicator.stage(make_state_dict(rank, step=2))
        except stager.StagerError as second:
            assert second.kind == transport_module.BROKEN and "create a new process group" in str(second), str(second)
            assert time.monotonic() - again < 1, "a broken group must fail at once"
        else:
            raise AssertionError("stage() on a broken group succeeded")
        _check_after_failure(rank, world, directory, err, started, victim)
        open(os.path.join(directory, f"stall.done.{rank}"), "w").close()
        os._exit(0)
    raise AssertionError(f"rank {rank}: stage() succeeded although rank {victim} never called it")


def scenario_stall_mid_stream(rank, world, directory, options):
    """Holder ``victim`` stops (SIGSTOP, its whole process: gloo's threads too) in the middle of
    receiving a large dict, after its first segments are posted; the sender must raise a
    StagerError within the timeout, and once the holder runs again (a helper process resumes it
    after the sender reported) it fails too, leaving no partial replica: the previous one stays."""
    victim = options.get("victim", 1)
    replicator = _prepare_failure(rank, world, directory, options)
    done = os.path.join(directory, f"stall.done.{(victim + 1) % world}")
    if rank == victim:
        original = transport_module.PGTransport._post
        resumer = (f"import os, time, signal\nend = time.monotonic() + {options['timeout'] + 60}\n"
                   f"while not os.path.exists({done!r}) and time.monotonic() < end: time.sleep(0.05)\n"
                   f"os.kill({os.getpid()}, signal.SIGCONT)\n")

        def stall_mid_stream(self, waits, op, tensor, peer, seq, index, token):
            if op == "recv" and index == transport_module._TAG_FIRST_SEGMENT + 2 and token[0] == "segment":
                transport_module.PGTransport._post = original
                subprocess.Popen([sys.executable, "-c", resumer])
                os.kill(os.getpid(), signal.SIGSTOP)  # resumed by the helper above
            return original(self, waits, op, tensor, peer, seq, index, token)

        transport_module.PGTransport._post = stall_mid_stream
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=options["big_numel"], step=1))
    except Exception as err:
        partner = victim if rank != victim else (victim + 1) % world
        _check_after_failure(rank, world, directory, err, started, partner)
        # only the good first stage's copies (step 1): nothing of the failed one was published
        assert {r.step for r in stager.find_replicas(directory)} == {1}, stager.find_replicas(directory)
        if rank != victim:
            open(done, "w").close()
        os._exit(0)
    raise AssertionError(f"rank {rank}: stage() succeeded although rank {victim} stalled")


def scenario_interrupt(rank, world, directory, options):
    """Rank 0 waits in stage() for an absent partner and says so ("WAITING"); the test sends it
    SIGINT. The partner stays away (without closing its connections) until rank 0 is done."""
    replicator = stager.ReplicationStager(timeout=datetime.timedelta(seconds=options["timeout"]), storage_dir=directory)
    done = os.path.join(directory, "interrupt.done")
    if rank != 0:
        wait_for_files([done], options["timeout"] + 30)
        report(rank=rank, absent=True)
        os._exit(0)
    announce_first_wait("WAITING")
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=100_000))
    except KeyboardInterrupt:
        interrupted = time.monotonic()
    else:
        raise AssertionError("stage() returned although the partner never took part")
    leftovers = temps(directory) + [name for name in os.listdir(directory) if "replica" in name]
    try:
        replicator.stage(make_state_dict(rank))
    except stager.StagerError as err:
        kind, message = err.kind, str(err)
    else:
        raise AssertionError("stage() after an interrupt succeeded on a group with messages in flight")
    report(rank=rank, waited=interrupted - started, leftovers=leftovers, kind=kind, message=message)
    open(done, "w").close()
    os._exit(0)


# ---- recovery ------------------------------------------------------------------------------------------


def _rank_dir(directory, rank):
    return os.path.join(directory, f"rank{rank}")


def _stager(rank, directory, options):
    return stager.ReplicationStager(
        timeout=datetime.timedelta(seconds=options.get("timeout", 30)), storage_dir=_rank_dir(directory, rank),
        replicas=options.get("replicas", 1), ranks_per_node=options.get("rpn", 1),
        keep_own=options.get("keep_own", False), persist_format=options.get("persist_format", "stager"))


def scenario_replicate(rank, world, directory, options):
    """``steps`` stages (steps 1..n); each returns the first source's state of that step."""
    replicator = _stager(rank, directory, options)
    big = options.get("big_numel", 0)
    placement = replicator.placement(world)
    kill_at = options.get("kill_at") if rank == options.get("victim") else None
    for step in range(1, options.get("steps", 2) + 1):
        if kill_at is not None and step == options.get("kill_step", 3):
            _arm_kill(kill_at)
        try:
            received = replicator.stage(make_state_dict(rank, big_numel=big, step=step), step=step)
        except stager.StagerError as err:
            if options.get("victim") is None:
                raise
            report(rank=rank, failed_at=step, error=str(err))  # a survivor of the victim's death
            os._exit(0)
        first = placement.first_source(rank)
        assert_same_tree(received, make_state_dict(first, big_numel=big, step=step))
        check_views(received)
    held = sorted((r.partner, r.step, r.previous) for r in stager.find_replicas(_rank_dir(directory, rank)))
    report(rank=rank, holders=list(placement.holders[rank]), sources=list(placement.sources[rank]), held=held)
    if options.get("victim") is not None:
        os._exit(0)


def _arm_kill(point):
    """SIGKILLs this process at ``point`` of the next stage(): "transfer" (after two data segments
    went out), "agreement" (right after the step was agreed), "publish" (between renaming the
    previous generation aside and the new one over the newest name)."""

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "transfer":
        original_post = transport_module.PGTransport._post

        def post(self, waits, op, tensor, peer, seq, index, token):
            if op == "send" and index >= transport_module._TAG_FIRST_SEGMENT + 2:
                time.sleep(0.1)
                die()
            return original_post(self, waits, op, tensor, peer, seq, index, token)

        transport_module.PGTransport._post = post
    elif point == "agreement":
        original_agree = replication_module._agree

        def agree(*args):
            result = original_agree(*args)
            die()
            return result

        replication_module._agree = agree
    elif point == "publish":
        original_rename = os.rename

        def rename(src, dst):
            original_rename(src, dst)
            if ".previous." in os.path.basename(dst):
                die()

        replication_module.os.rename = rename
    else:
        raise ValueError(point)


def scenario_linger(rank, world, directory, options):
    """Reports, then waits (for the test to SIGKILL this process) and exits by itself at worst."""
    report(rank=rank)
    time.sleep(options.get("seconds", 30))
    os._exit(0)


def scenario_cut(rank, world, directory, options):
    """Two good steps, then a large step 3 during which the test takes the link down: every rank
    raises StagerError within the timeout, and both kept generations stay intact."""
    replicator = _stager(rank, directory, options)
    src = replicator.peers(rank, world)[1]
    for step in (1, 2):
        replicator.stage(make_state_dict(rank, step=step), step=step)
    _announce_first_segment("ON-THE-WIRE")  # the test takes the link down once bytes are moving
    started = time.monotonic()
    try:
        replicator.stage(make_state_dict(rank, big_numel=options["big_numel"], step=3), step=3)
    except stager.StagerError as err:
        elapsed = time.monotonic() - started
        mine = _rank_dir(directory, rank)
        assert not temps(mine), temps(mine)
        kept = sorted((r.step, r.previous) for r in stager.find_replicas(mine))
        assert kept == [(1, True), (2, False)], kept
        for replica in stager.find_replicas(mine):
            assert_same_tree(stager.load(replica.path), make_state_dict(src, step=replica.step))
        report(rank=rank, elapsed=elapsed, error=str(err), kind=getattr(err, "kind", None))
        os._exit(0)
    raise AssertionError("stage() succeeded although the link was cut")


def _announce_first_segment(line):
    """Prints ``line`` once the first data segment of this process's next transfer is posted."""
    original = transport_module.PGTransport._post

    def post(self, waits, op, tensor, peer, seq, index, token):
        work = original(self, waits, op, tensor, peer, seq, index, token)
        if op == "send" and index >= transport_module._TAG_FIRST_SEGMENT and transport_module.PGTransport._post is post:
            transport_module.PGTransport._post = original
            print(line, flush=True)
        return work

    transport_module.PGTransport._post = post


def scenario_wipe(rank, world, directory, options):
    """Removes this rank's storage directory (its node was lost)."""
    if rank in options["ranks"]:
        import shutil

        shutil.rmtree(_rank_dir(directory, rank), ignore_errors=True)
    report(rank=rank)


def scenario_restore(rank, world, directory, options):
    """A fresh stager on the old directory calls restore(); with ``inplace`` into a state_dict of
    the same structure whose tensors must keep their storages. ``expect_error``: every rank must
    raise StagerError (reported); else the result must be this rank's state of the agreed step."""
    big = options.get("big_numel", 0)
    replicator = options.get("_live") or _stager(rank, directory, options)
    into = make_state_dict(rank + 50, big_numel=big) if options.get("inplace") else None
    if into is not None and rank == options.get("mismatch_rank"):
        into["model"]["bias"] = torch.zeros(8, dtype=torch.int64)  # the replica's is 7
    pointers = versions = None
    if into is not None:
        pointers = {key: t.untyped_storage().data_ptr() for key, t in into["model"].items() if t.numel()}
        versions = {key: t._version for key, t in into["model"].items()}
    started = time.monotonic()
    before = sorted(os.listdir(_rank_dir(directory, rank))) if os.path.isdir(_rank_dir(directory, rank)) else []
    try:
        result = replicator.restore(into=into)
    except stager.StagerError as err:
        after = sorted(os.listdir(_rank_dir(directory, rank))) if os.path.isdir(_rank_dir(directory, rank)) else []
        assert after == before, (before, after)  # no file changed
        if into is not None and (options.get("mismatch_rank") in (None, rank)):
            expected = make_state_dict(rank + 50, big_numel=big)
            if rank == options.get("mismatch_rank"):
                expected["model"]["bias"] = torch.zeros(8, dtype=torch.int64)
            assert_same_tree(into, expected)  # the target that doesn't fit is untouched
        if not options.get("expect_error"):
            raise
        report(rank=rank, error=str(err), elapsed=time.monotonic() - started)
        return
    assert not options.get("expect_error"), "restore() succeeded"
    step = result["extra"]["step"]
    assert_same_tree(result, make_state_dict(rank, big_numel=big, step=step))
    if into is not None:
        now = {key: t.untyped_storage().data_ptr() for key, t in result["model"].items() if t.numel()}
        assert now == pointers, (now, pointers)
        assert_same_tree(into["model"], make_state_dict(rank, big_numel=big, step=step)["model"])
        assert result["model"]["weight"] is into["model"]["weight"]
        # every written tensor's version counter moved, however its bytes came (received in place
        # over the group or copied in), so a later stage(skip_unchanged=True) sees the change
        unbumped = sorted(key for key, t in into["model"].items() if t.numel() and t._version == versions[key])
        assert not unbumped, f"restore(into=...) left the version counters of {unbumped} unchanged"
    report(rank=rank, step=step, elapsed=time.monotonic() - started, restored=replicator.last_restore)


def scenario_replicate_and_restore(rank, world, directory, options):
    """Survivors: replicate, then restore() from the same (live) stagers' memory."""
    replicator = _stager(rank, directory, options)
    for step in range(1, options.get("steps", 2) + 1):
        replicator.stage(make_state_dict(rank, big_numel=options.get("big_numel", 0), step=step), step=step)
    scenario_restore(rank, world, directory, {**options, "_live": replicator})


if __name__ == "__main__":
    worker_main(globals())
