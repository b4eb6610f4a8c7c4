"""ReplicationStager(skip_unchanged=True): a holder that has the owner's previous step receives
only the storages that changed, and still persists a complete replica.

Real gloo process groups on 127.0.0.1 (tests/incremental_worker.py, launched by tests/ranks.py),
real files, real restarts: every worker exits by itself within its deadline. What travels is
checked with the stager's wire byte counters (``last_sent`` / ``last_received``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from incremental_worker import CHANGES, Lora
from ranks import assert_all_ok, collect, free_port, run_ranks, start_ranks

import stager
from helpers import flip_byte

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "incremental_worker.py")


@pytest.mark.timeout(240)
def test_only_changed_storages_travel_replicas_stay_complete_and_restore(tmp_path):
    """Then restore(): the survivors from the replicas they built incrementally in memory, fresh
    processes from the copy files; both give every rank its exact state of the last step."""
    steps = [
        ["lora", {"steps": 4}],
        ["lora", {"subdir": "torch", "persist_format": "torch", "steps": 3}],
        ["lora", {"subdir": "memory", "persist_format": None, "steps": 3}],
        ["changes", {}],
        ["mixed", {}],
        ["check", {}],
        ["steps", {"subdir": "restore", "first": 1, "last": 3, "restore": True}],
    ]
    results = run_ranks(2, tmp_path, steps, deadline=150, worker=WORKER)
    assert_all_ok(results, ["lora", "torch", "memory", "changes", "mixed", "check", "restore"])
    fresh = run_ranks(2, tmp_path, [["restore", {"subdir": "restore", "steps": 3}]], deadline=90, worker=WORKER)
    assert_all_ok(fresh, ["restore"])
    assert {fresh[rank][1]["restore"]["step"] for rank in range(2)} == {3}
    for rank in range(2):
        lora = results[rank][1]["lora"]
        # the first step sends everything; then only adapters and Adam state: a few % of the dict
        assert lora["sent"][0] >= lora["full"]
        assert all(sent < 0.06 * lora["full"] for sent in lora["sent"][1:]), lora
        changes = results[rank][1]["changes"]["sent"]
        assert changes["nothing"] == 0  # nothing changed: not one byte of state on the wire
        assert set(changes) == {name for name, _, _ in CHANGES}
    # the debug check fails the same way on every rank
    assert len({results[rank][1]["check"]["error"] for rank in range(2)}) == 1
    # every copy in the directories is a complete, self-contained file
    for subdir in ("lora", "changes"):
        for replica in stager.find_replicas(tmp_path / subdir):
            assert stager.load(replica.path)  # verify=True: every checksum


@pytest.mark.timeout(120)
def test_three_ranks_two_holders_each(tmp_path):
    results = run_ranks(3, tmp_path, [["ring", {}]], deadline=100, worker=WORKER)
    assert_all_ok(results, ["ring"])


def _holder_run(tmp_path, port, first, last, expect):
    return start_ranks(2, tmp_path, [["steps", {"subdir": "restart", "first": first, "last": last,
                                                 "expect": expect}]], ranks=[1], port=port, worker=WORKER)


@pytest.mark.timeout(240)
def test_holder_restarted_between_steps(tmp_path):
    """Rank 0 survives; rank 1 (its holder) is restarted three times on the same storage_dir:
    with its copy of rank 0's last step intact it reads it back (checksums verified) and receives
    only the changes; with that copy damaged, or removed, it says it has no base and receives
    everything, without an error. Each round, rank 1's own state goes to rank 0 in full (its
    tracker died with it). At the end restore() gives both ranks their exact latest state."""
    ports = [free_port() for _ in range(4)]
    survivor_steps = [
        ["steps", {"subdir": "restart", "first": 1, "last": 2}],
        ["rejoin", {"subdir": "restart", "port": ports[1], "name": "rejoin1"}],
        ["steps", {"subdir": "restart", "first": 3, "last": 3, "expect": "full", "name": "round1"}],
        ["rejoin", {"subdir": "restart", "port": ports[2], "name": "rejoin2"}],
        ["steps", {"subdir": "restart", "first": 4, "last": 4, "expect": "full", "name": "round2"}],
        ["rejoin", {"subdir": "restart", "port": ports[3], "name": "rejoin3"}],
        ["steps", {"subdir": "restart", "first": 5, "last": 6, "expect": "full", "restore": True, "name": "round3"}],
    ]
    survivor = start_ranks(2, tmp_path, survivor_steps, ranks=[0], port=ports[0], worker=WORKER)
    holder_copy = tmp_path / "restart" / "rank_1_replica_partner_0.stager"
    try:
        first = collect(_holder_run(tmp_path, ports[0], 1, 2, None), deadline=90)
        assert_all_ok(first, ["restart"])
        # 1. restarted, its copy of rank 0's step 2 intact: read from disk, only the changes travel
        intact = collect(_holder_run(tmp_path, ports[1], 3, 3, "delta"), deadline=90)
        assert_all_ok(intact, ["restart"])
        # 2. restarted with that copy damaged: everything travels, nothing fails
        flip_byte(holder_copy)
        damaged = collect(_holder_run(tmp_path, ports[2], 4, 4, "full"), deadline=90)
        assert_all_ok(damaged, ["restart"])
        # 3. restarted with the copy gone: everything travels again; then restore() on both ranks
        os.unlink(holder_copy)
        os.unlink(tmp_path / "restart" / "rank_1_replica_partner_0.previous.stager")
        missing = start_ranks(2, tmp_path, [["steps", {"subdir": "restart", "first": 5, "last": 6, "expect": "full",
                                                       "restore": True}]], ranks=[1], port=ports[3], worker=WORKER)
        missing = collect(missing, deadline=90)
        assert_all_ok(missing, ["restart"])
    finally:
        results = collect(survivor, deadline=120)
    assert_all_ok(results, ["restart", "round1", "round2", "round3"])
    received = [intact[1][1]["restart"], damaged[1][1]["restart"], missing[1][1]["restart"]]
    assert received[0]["received"] < received[0]["full"] // 4
    assert all(r["received"] >= r["full"] for r in received[1:])
    # every copy left is complete and intact
    for replica in stager.find_replicas(tmp_path / "restart"):
        assert stager.load(replica.path)


def test_lora_mirror_is_deterministic():
    """The workers check what they receive against their own rebuild of the sender's state."""
    a, b = Lora.after(1, 2), Lora.after(1, 2)
    for (ka, va), (kb, vb) in zip(a.state_dict()["a"].items(), b.state_dict()["a"].items()):
        assert ka == kb and va.equal(vb)
    changed, _ = Lora.changed(a.state_dict())
    assert 0 < changed < 0.2 * sum(t.numel() * 4 for t in a.base.parameters())


def test_sender_tracker_maps_unchanged_storages_to_their_index_in_the_previous_sending():
    from stager.incremental import UnchangedStorages
    from stager.plan import plan_state_dict

    base = torch.randn(100)
    sd = {"frozen": torch.randn(64), "trained": torch.randn(32), "view": base[10:20], "base": base}
    tracker = UnchangedStorages()
    tracker.remember(plan_state_dict(sd, track_versions=True))  # no staged tensors: indices
    assert tracker.storage_count == 3
    sd = {"new": torch.randn(8), **sd}  # every storage moves one place down
    sd["trained"].add_(1.0)
    plan = plan_state_dict(sd, track_versions=True)
    assert tracker.unchanged(plan) == {1: 0, 3: 2}  # frozen, and base (viewed by view)
    assert not any(plan.table.storage_reused)  # a pure lookup: the plan is left as it is
    assert tracker.reused_nbytes == 64 * 4 + 100 * 4


def test_delta_message_round_trip_and_hostile_input():
    from stager.plan import plan_state_dict
    from stager.transport import Offer, _decode_delta, _delta_layout, _encode_delta, segments_of

    plan = plan_state_dict({f"t{i}": torch.randn(16 + i) for i in range(6)})
    reuse = {0: 0, 1: 1, 2: 2, 4: 5, 5: 3}
    table, storages = _delta_layout(plan, reuse)
    nsegments = len(segments_of(storages, 1 << 20, 1 << 20))
    raw = _encode_delta(Offer(7, 3, 6, reuse), table, nsegments)
    assert json.loads(raw)["reuse"] == [[0, 0, 3], [4, 5, 1], [5, 3, 1]]  # runs
    assert _decode_delta(raw, 6) == (reuse, 6, table.total_nbytes, nsegments, None)
    assert table.total_nbytes == 128  # only storage 3 takes room: 19 floats, 76 bytes, 64-byte aligned

    def spec(**fields):
        return json.dumps({"base_storages": 6, "reuse": [[0, 0, 1]], "nbytes": 0, "segments": 0, **fields}).encode()

    hostile = {
        "not an object": b"[1, 2]",
        "a negative count": spec(base_storages=-1),
        "a bool for an int": spec(nbytes=True),
        "no runs": spec(reuse=[]),
        "a run too short": spec(reuse=[[0, 0]]),
        "past the plan": spec(reuse=[[5, 0, 2]]),
        "past the base": spec(reuse=[[0, 5, 2]]),
        "an empty run": spec(reuse=[[0, 0, 0]]),
        "an index twice": spec(reuse=[[0, 0, 1], [0, 1, 1]]),
        "a base index twice": spec(reuse=[[0, 0, 1], [1, 0, 1]]),
        "crc32c of another length": spec(crc32c=[1, 2]),
        "a crc32c out of range": spec(crc32c=[1 << 32]),
    }
    for what, raw in hostile.items():
        with pytest.raises(ValueError):
            _decode_delta(raw, 6)
        assert what


@pytest.mark.timeout(300)
def test_bench_section_measures_exchange_rows_with_bytes_on_the_wire(tmp_path):
    """``stager bench --sections incremental`` at a tiny size: every row is there, and the wire
    bytes say what the exchange sent (no timing is asserted)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-c", "import sys; from stager.cli import main; sys.exit(main())", "bench", "--size",
           "16MB", "--repeats", "1", "--sections", "incremental", "--threads", "2", "--dir", str(tmp_path),
           "--json", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(row["workload"], row["name"]): row for row in json.loads(out.read_text())["rows"]}
    skip, full = "stager ReplicationStager skip_unchanged", "stager ReplicationStager"
    for workload in ("lora exchange", "full fine-tune exchange"):
        for name in (skip, full):
            assert rows[(workload, name)]["seconds_median"] > 0
        assert rows[(workload, full)]["extra"]["wire_bytes"] >= rows[(workload, full)]["nbytes"]
    lora = rows[("lora exchange", skip)]
    assert lora["extra"]["wire_bytes"] < 0.02 * lora["nbytes"], lora  # the adapters and their Adam state
    everything = rows[("full fine-tune exchange", skip)]
    assert everything["extra"]["wire_state_bytes"] >= everything["nbytes"]  # everything changed: all of it
