"""ReplicationStager and PGTransport over real gloo process groups on 127.0.0.1.

Each test starts one process per rank (tests/replication_worker.py, launched by tests/ranks.py),
with bounded waits: every worker exits by itself, and the test kills leftovers only if one
overran its deadline.
"""

import os
import signal
import zipfile

import pytest
import torch
from ranks import assert_all_ok, collect, run_ranks, start_ranks
from replication_worker import make_state_dict

import stager
from helpers import assert_same_tree

BIG = 1_200_000  # a 4.8 MB tensor: sent straight from its storage (bigger than a bucket)


def check_replicas(directory, world, topology, results, name, steps=2):
    replicas = stager.find_replicas(directory)
    newest = [r for r in replicas if not r.previous]
    assert len(newest) == world
    assert len(replicas) == world * min(steps, 2)  # the newest and the kept previous generation
    assert [(r.step, r.mtime) for r in replicas] == sorted(((r.step, r.mtime) for r in replicas), reverse=True)
    for replica in replicas:
        assert replica.format == "stager" and replica.nbytes == os.path.getsize(replica.path)
        suffix = ".previous" if replica.previous else ""
        assert replica.path == os.path.join(str(directory),
                                            f"rank_{replica.rank}_replica_partner_{replica.partner}{suffix}.stager")
        assert replica.world_size == world and replica.owner == replica.partner
        assert replica.step == (steps if not replica.previous else steps - 1)
    for rank in range(world):
        result = results[rank][1][name]
        expected_src = (rank + world // 2) % world if topology == "pairs" and world % 2 == 0 else (rank - 1) % world
        assert result["src"] == expected_src
        # every rank's last state can be restored from the replica its partner holds
        assert_same_tree(stager.recover(directory, rank), make_state_dict(rank, big_numel=BIG, step=steps - 1))
    assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]


@pytest.mark.timeout(150)
def test_two_ranks_exchange_torch_format_and_transport(tmp_path):
    steps = [
        ["exchange", {"steps": 2, "big_numel": BIG}],
        ["exchange", {"subdir": "torch", "persist_format": "torch"}],
        ["transport", {}],
        ["transport_unsendable", {}],
        ["unsendable", {"victims": [1]}],
        ["unsendable", {"subdir": "both", "victims": [0, 1]}],
        ["disagree", {}],
    ]
    results = run_ranks(2, tmp_path, steps)
    assert_all_ok(results, ["exchange", "torch", "transport", "transport_unsendable", "unsendable", "both",
                            "disagree"])
    check_replicas(tmp_path / "exchange", 2, "pairs", results, "exchange")
    # PyTorch's format: torch.save of the dict, loadable with torch.load; the record rides along
    for rank in range(2):
        path = tmp_path / "torch" / f"rank_{rank}_replica_partner_{1 - rank}.pt"
        with open(path, "rb") as f:
            loaded = torch.load(f, weights_only=False)
        assert_same_tree(loaded, make_state_dict(1 - rank))
        assert_same_tree(stager.recover(tmp_path / "torch", 1 - rank), make_state_dict(1 - rank))
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None
    found = stager.find_replicas(tmp_path / "torch")
    assert [(r.format, r.step, r.world_size) for r in found] == [("torch", 1, 2), ("torch", 1, 2)]
    assert set(results[1][1]["transport"]["inplace"]) >= {"weight", "big"}
    # a dict that can't be sent fails at once on every rank, with one message naming every
    # failing rank and key (both partners failing included), long before the 30 s timeout
    for name in ("unsendable", "both"):
        errors = {results[rank][1][name]["error"] for rank in range(2)}
        assert len(errors) == 1, errors
        assert all(results[rank][1][name]["elapsed"] < 5 for rank in range(2))
    assert {results[rank][1]["transport_unsendable"]["kind"] for rank in range(2)} == {"unsendable", "remote"}
    assert len({results[rank][1]["disagree"]["error"] for rank in range(2)}) == 1


@pytest.mark.timeout(150)
def test_three_ranks_ring_and_unsendable(tmp_path):
    steps = [
        ["exchange", {"steps": 2, "big_numel": BIG}],
        ["transport", {}],
        ["unsendable", {"victims": [1]}],
        ["unsendable", {"subdir": "two", "victims": [0, 2]}],
    ]
    results = run_ranks(3, tmp_path, steps)
    assert_all_ok(results, ["exchange", "transport", "unsendable", "two"])
    check_replicas(tmp_path / "exchange", 3, "pairs", results, "exchange")
    for name in ("unsendable", "two"):
        assert len({results[rank][1][name]["error"] for rank in range(3)}) == 1
        assert all(results[rank][1][name]["elapsed"] < 5 for rank in range(3))


@pytest.mark.timeout(150)
def test_four_ranks_pairs_and_ring(tmp_path):
    steps = [
        ["exchange", {"steps": 2, "big_numel": BIG}],
        ["exchange", {"subdir": "ring", "topology": "ring", "steps": 2, "big_numel": BIG}],
    ]
    results = run_ranks(4, tmp_path, steps)
    assert_all_ok(results, ["exchange", "ring"])
    check_replicas(tmp_path / "exchange", 4, "pairs", results, "exchange")
    check_replicas(tmp_path / "ring", 4, "ring", results, "ring")


@pytest.mark.timeout(90)
def test_partner_killed_mid_exchange(tmp_path):
    timeout = 8
    results = run_ranks(2, tmp_path, [["killed", {"timeout": timeout, "big_numel": 12_000_000, "victim": 1}]])
    assert results[1][0] != 0  # SIGKILLed in the middle of the exchange
    rc, found, output = results[0]
    assert rc == 0 and "killed" in found, output
    assert found["killed"]["elapsed"] < timeout, found
    assert "rank 1" in found["killed"]["error"] and found["killed"]["kind"] == "connection"


@pytest.mark.timeout(90)
def test_partner_that_never_calls_stage(tmp_path):
    # Ring of 3: rank 0 sends to the stalled rank 1, rank 2 receives from it; both must fail,
    # and every later stage() says at once that the group is broken.
    timeout = 4
    results = run_ranks(3, tmp_path, [["stall", {"timeout": timeout, "big_numel": 3_000_000}]])
    assert_all_ok(results, ["stall"])
    for rank in (0, 2):
        result = results[rank][1]["stall"]
        assert timeout - 0.5 <= result["elapsed"] < timeout + 3, result
        assert "rank 1" in result["error"] and result["kind"] == "timeout"


@pytest.mark.timeout(120)
def test_holder_that_stalls_mid_stream(tmp_path):
    # Rank 1 stops (SIGSTOP) after posting the receives of its first two segments of rank 0's
    # 48 MB: rank 0 raises within the timeout; rank 1, resumed afterwards, fails too; neither
    # leaves a temp file or a replica of the failed step, and step 0's replicas stay loadable.
    timeout = 6
    results = run_ranks(2, tmp_path, [["stall_mid_stream", {"timeout": timeout, "big_numel": 12_000_000}]])
    assert_all_ok(results, ["stall_mid_stream"])
    sender = results[0][1]["stall_mid_stream"]
    assert sender["elapsed"] < timeout + 3, sender
    assert "rank 1" in sender["error"] and sender["kind"] == "timeout", sender
    holder = results[1][1]["stall_mid_stream"]
    assert "rank 0" in holder["error"], holder
    assert not [name for name in os.listdir(tmp_path / "stall_mid_stream") if name.endswith(".tmp")]


@pytest.mark.timeout(90)
def test_ctrl_c_while_waiting_for_an_absent_partner(tmp_path):
    # Events, not durations: rank 0 says when it is inside the wait, and its partner stays away
    # until rank 0 is done, however slow a loaded machine makes either.
    timeout = 60
    procs = start_ranks(2, tmp_path, [["interrupt", {"timeout": timeout}]])
    lines = []
    while True:
        line = procs[0].stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if line.strip() == "WAITING":
            break
    os.kill(procs[0].pid, signal.SIGINT)
    results = collect(procs, deadline=60)
    rc, found, output = results[0]
    assert rc == 0 and "interrupt" in found, "".join(lines) + output
    result = found["interrupt"]
    assert result["waited"] < timeout / 2, result  # the interrupt, not the timeout, ended the wait
    assert result["leftovers"] == [], result
    assert result["kind"] == "broken" and "KeyboardInterrupt" in result["message"], result


def test_stage_without_process_group_returns_input(tmp_path):
    sd = {"a": torch.ones(3)}
    replicator = stager.ReplicationStager(storage_dir=str(tmp_path))
    assert replicator.stage(sd) is sd
    assert replicator.should_synchronize_after_execute is False
    assert isinstance(replicator, torch.distributed.checkpoint.staging.AsyncStager)
    assert replicator._get_persisted_path(0, 1) == os.path.join(str(tmp_path), "rank_0_replica_partner_1.stager")
    torch_format = stager.ReplicationStager(storage_dir=str(tmp_path), persist_format="torch")
    assert torch_format._get_persisted_path(3, 1).endswith("rank_3_replica_partner_1.pt")


def test_find_replicas_and_recover_errors(tmp_path):
    assert stager.find_replicas(tmp_path / "missing") == []
    with pytest.raises(stager.StagerError, match="no replica of rank 3"):
        stager.recover(tmp_path, 3)
    (tmp_path / "rank_0_replica_partner_3.stager").write_bytes(b"garbage")
    (tmp_path / "rank_0_replica_partner_3.stager.123.tmp").write_bytes(b"partial")
    found = stager.find_replicas(tmp_path)
    assert [(r.partner, r.step) for r in found] == [(3, None)]
    with pytest.raises(stager.StagerError):
        stager.recover(tmp_path, 3)


def test_find_replicas_reads_the_records(tmp_path):
    for step, previous in ((4, True), (5, False)):
        suffix = ".previous" if previous else ""
        stager.save({"w": torch.full((4,), float(step))}, tmp_path / f"rank_1_replica_partner_0{suffix}.stager",
                    metadata={"stager.replica.owner": "0", "stager.replica.holder": "1",
                              "stager.replica.world_size": "2", "stager.replica.step": str(step)})
    found = stager.find_replicas(tmp_path)
    assert [(r.rank, r.owner, r.step, r.world_size, r.previous) for r in found] == [
        (1, 0, 5, 2, False), (1, 0, 4, 2, True)]
    assert torch.equal(stager.recover(tmp_path, 0)["w"], torch.full((4,), 5.0))
    # a damaged newest copy: recover falls back to the previous generation
    path = found[0].path
    _, storages = stager._native.CheckpointFile(path).layout()
    _, offset, nbytes, _ = storages[0]
    with open(path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert torch.equal(stager.recover(tmp_path, 0)["w"], torch.full((4,), 4.0))


def test_bad_arguments():
    with pytest.raises(stager.StagerError, match="topology"):
        stager.ReplicationStager(topology="star")
    with pytest.raises(stager.StagerError, match="persist_format"):
        stager.ReplicationStager(persist_format="pickle")
    with pytest.raises(stager.StagerError, match="timeout"):
        stager.PGTransport(None, -1, "cpu")
    with pytest.raises(stager.StagerError, match="replicas"):
        stager.ReplicationStager(replicas=0)
    with pytest.raises(stager.StagerError, match="ranks_per_node"):
        stager.ReplicationStager(ranks_per_node=0)
    with pytest.raises(stager.StagerError, match="keep_own"):
        stager.ReplicationStager(keep_own=True, persist_format=None)
    with pytest.raises(stager.StagerError, match="step"):
        stager.ReplicationStager().stage({}, step=-1)


def test_segments_cover_layout():
    from stager.plan import plan_state_dict
    from stager.transport import segments_of

    sd = {"small": [torch.ones(i + 1) for i in range(50)], "big": torch.zeros(10_000), "tail": torch.ones(3)}
    plan = plan_state_dict(sd)
    segments = segments_of(plan.storages, bucket_bytes=256, chunk_bytes=4096)
    covered = []
    for segment in segments:
        assert segment.nbytes > 0
        if segment.direct:
            storage = plan.storages[segment.first]
            assert storage.nbytes >= 256 and segment.nbytes <= 4096
            assert storage.offset <= segment.start < segment.end <= storage.offset + storage.nbytes
        covered.append((segment.start, segment.end))
    assert covered == sorted(covered)
    for index, storage in enumerate(plan.storages):  # every byte of every storage is in a segment
        assert any(s <= storage.offset and storage.offset + storage.nbytes <= e for s, e in covered) or any(
            seg.direct and seg.first == index for seg in segments)
    assert sum(seg.nbytes for seg in segments if seg.direct) == 40_000


def test_storage_landed_hook_reports_each_storage_once_its_bytes_are_in():
    """Incoming.on_storage_landed (what the streaming replica writer waits on): as the segments
    land in order, each storage is reported once, with the segment holding its last byte; a
    storage cut into chunks is not reported before its last chunk."""
    from stager.plan import plan_state_dict
    from stager.transport import Incoming, segments_of

    sd = {"small": [torch.ones(i + 1) for i in range(50)], "big": torch.zeros(10_000), "empty": torch.ones(0),
          "tail": torch.ones(3)}
    incoming = Incoming(None, rank=1, seq=0)
    incoming.plan = plan = plan_state_dict(sd)
    incoming.segments = segments_of(plan.storages, bucket_bytes=256, chunk_bytes=4096)
    landed: list[tuple[int, int]] = []
    incoming.on_storage_landed(lambda index: landed.append((index, received)))
    received = 0
    for number, segment in enumerate(incoming.segments):
        received = segment.end  # every byte before this has landed too
        incoming.segment_landed(number)
    reported = [index for index, _ in landed]
    with_bytes = [i for i, s in enumerate(plan.storages) if s.nbytes]
    assert sorted(set(reported)) == sorted(set(reported) | set(with_bytes)) and len(set(reported)) == len(reported)
    for index, when in landed:
        storage = plan.storages[index]
        assert storage.offset + storage.nbytes <= when, (index, storage.offset, storage.nbytes, when)
    big = next(i for i, s in enumerate(plan.storages) if s.nbytes == 40_000)
    chunks = [n for n, s in enumerate(incoming.segments) if s.direct and s.first == big]
    assert len(chunks) > 1 and dict(landed)[big] == incoming.segments[chunks[-1]].end
