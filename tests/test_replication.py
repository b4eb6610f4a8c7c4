"""ReplicationStager and PGTransport over real gloo process groups on 127.0.0.1.

Each test starts one process per rank (tests/replication_worker.py), with bounded waits: every
worker exits by itself, and the test kills leftovers only if one overran its deadline.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import stager
from helpers import assert_same_tree

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replication_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
from replication_worker import make_state_dict  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, directory, steps, deadline=90):
    """Runs ``world`` workers through ``steps`` ([scenario, options] pairs); returns
    {rank: (returncode, {scenario: result}, output)}."""
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(rank), str(world), port, str(directory), json.dumps(steps)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for rank in range(world)
    ]
    end = time.monotonic() + deadline
    results = {}
    try:
        for rank, proc in enumerate(procs):
            try:
                output, _ = proc.communicate(timeout=max(1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                pytest.fail(f"rank {rank} did not exit within {deadline}s:\n{output}")
            found = {}
            for line in output.splitlines():
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT "):])
                    found[result["scenario"]] = result
            results[rank] = (proc.returncode, found, output)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def assert_all_ok(results, scenarios, ranks=None):
    for rank, (rc, found, output) in results.items():
        if ranks is not None and rank not in ranks:
            continue
        assert rc == 0 and all(name in found for name in scenarios), f"rank {rank} failed (rc={rc}):\n{output}"


BIG = 1_200_000  # a 4.8 MB tensor: sent straight from its storage (bigger than a bucket)


def check_replicas(directory, world, topology, results, name):
    replicas = stager.find_replicas(directory)
    assert len(replicas) == world
    assert [r.mtime for r in replicas] == sorted((r.mtime for r in replicas), reverse=True)
    for replica in replicas:
        assert replica.format == "stager" and replica.nbytes == os.path.getsize(replica.path)
        assert replica.path == os.path.join(str(directory), f"rank_{replica.rank}_replica_partner_{replica.partner}.stager")
    for rank in range(world):
        result = results[rank][1][name]
        expected_src = (rank + world // 2) % world if topology == "pairs" and world % 2 == 0 else (rank - 1) % world
        assert result["src"] == expected_src
        # every rank's last state can be restored from the replica its partner holds
        assert_same_tree(stager.recover(directory, rank), make_state_dict(rank, big_numel=BIG, step=1))
    assert not [name for name in os.listdir(directory) if name.endswith(".tmp")]


@pytest.mark.timeout(150)
def test_two_ranks_exchange_torch_format_and_transport(tmp_path):
    steps = [
        ["exchange", {"steps": 2, "big_numel": BIG}],
        ["exchange", {"subdir": "torch", "persist_format": "torch"}],
        ["transport", {}],
        ["unsendable", {}],  # last: it leaves unmatched messages behind
    ]
    results = run_ranks(2, tmp_path, steps)
    assert_all_ok(results, ["exchange", "torch", "transport", "unsendable"])
    check_replicas(tmp_path / "exchange", 2, "pairs", results, "exchange")
    # PyTorch's format: torch.save of the dict, loadable with torch.load
    for rank in range(2):
        path = tmp_path / "torch" / f"rank_{rank}_replica_partner_{1 - rank}.pt"
        with open(path, "rb") as f:
            loaded = torch.load(f, weights_only=False)
        assert_same_tree(loaded, make_state_dict(1 - rank))
        assert_same_tree(stager.recover(tmp_path / "torch", 1 - rank), make_state_dict(1 - rank))
    assert [r.format for r in stager.find_replicas(tmp_path / "torch")] == ["torch", "torch"]
    assert set(results[1][1]["transport"]["inplace"]) >= {"weight", "big"}


@pytest.mark.timeout(150)
def test_three_ranks_ring(tmp_path):
    results = run_ranks(3, tmp_path, [["exchange", {"steps": 2, "big_numel": BIG}], ["transport", {}]])
    assert_all_ok(results, ["exchange", "transport"])
    check_replicas(tmp_path / "exchange", 3, "pairs", results, "exchange")


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
    assert found["killed"]["elapsed"] < timeout + 3, found
    assert "rank 1" in found["killed"]["error"]


@pytest.mark.timeout(90)
def test_partner_that_never_calls_stage(tmp_path):
    # Ring of 3: rank 0 sends to the stalled rank 1, rank 2 receives from it; both must fail.
    timeout = 4
    results = run_ranks(3, tmp_path, [["stall", {"timeout": timeout, "big_numel": 3_000_000, "linger": 2}]])
    assert_all_ok(results, ["stall"])
    for rank in (0, 2):
        result = results[rank][1]["stall"]
        assert timeout - 0.5 <= result["elapsed"] < timeout + 3, result
        assert "rank 1" in result["error"]


def test_stage_without_process_group_returns_input(tmp_path):
    sd = {"a": torch.ones(3)}
    replicator = stager.ReplicationStager(storage_dir=str(tmp_path))
    assert replicator.stage(sd) is sd
    assert replicator.should_synchronize_after_execute is False
    assert isinstance(replicator, torch.distributed.checkpoint.staging.AsyncStager)


def test_find_replicas_and_recover_errors(tmp_path):
    assert stager.find_replicas(tmp_path / "missing") == []
    with pytest.raises(stager.StagerError, match="no replica of rank 3"):
        stager.recover(tmp_path, 3)
    (tmp_path / "rank_0_replica_partner_3.stager").write_bytes(b"garbage")
    (tmp_path / "rank_0_replica_partner_3.stager.123.tmp").write_bytes(b"partial")
    assert [r.partner for r in stager.find_replicas(tmp_path)] == [3]
    with pytest.raises(stager.StagerError):
        stager.recover(tmp_path, 3)


def test_bad_arguments():
    with pytest.raises(stager.StagerError, match="topology"):
        stager.ReplicationStager(topology="star")
    with pytest.raises(stager.StagerError, match="persist_format"):
        stager.ReplicationStager(persist_format="pickle")
    with pytest.raises(stager.StagerError, match="timeout"):
        stager.PGTransport(None, -1, "cpu")


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
