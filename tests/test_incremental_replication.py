"""ReplicationStager(skip_unchanged=True): a holder that has the owner's previous step receives
only the storages that changed, and still persists a complete replica.

Real gloo process groups on 127.0.0.1 (tests/incremental_worker.py, launched by tests/ranks.py),
real files, real restarts: every worker exits by itself within its deadline. What travels is
checked with the stager's wire byte counters (``last_sent`` / ``last_received``).
"""

import os

import pytest
from incremental_worker import CHANGES, Lora
from ranks import assert_all_ok, collect, free_port, run_ranks, start_ranks

import stager

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "incremental_worker.py")


def flip_byte(path):
    """Flips one byte in the middle of the largest stored buffer of a .stager file."""
    _, storages = stager._native.CheckpointFile(str(path)).layout()
    _, offset, nbytes, _ = max(storages, key=lambda s: s[2])
    with open(path, "r+b") as f:
        f.seek(offset + nbytes // 2)
        byte = f.read(1)
        f.seek(offset + nbytes // 2)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.timeout(180)
def test_only_changed_storages_travel_and_replicas_stay_complete(tmp_path):
    steps = [
        ["lora", {"steps": 4}],
        ["lora", {"subdir": "torch", "persist_format": "torch", "steps": 3}],
        ["lora", {"subdir": "memory", "persist_format": None, "steps": 3}],
        ["changes", {}],
        ["mixed", {}],
        ["check", {}],
    ]
    results = run_ranks(2, tmp_path, steps, deadline=150, worker=WORKER)
    assert_all_ok(results, ["lora", "torch", "memory", "changes", "mixed", "check"])
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


@pytest.mark.timeout(180)
def test_restore_after_incremental_steps(tmp_path):
    """Survivors restore() from the replicas they built incrementally in memory; fresh processes
    restore() from the copy files: both give every rank its exact state of the last step."""
    live = [["steps", {"subdir": "restore", "first": 1, "last": 3, "restore": True}]]
    assert_all_ok(run_ranks(2, tmp_path, live, deadline=90, worker=WORKER), ["restore"])
    fresh = [["restore", {"subdir": "restore", "steps": 3}]]
    results = run_ranks(2, tmp_path, fresh, deadline=90, worker=WORKER)
    assert_all_ok(results, ["restore"])
    assert {results[rank][1]["restore"]["step"] for rank in range(2)} == {3}


def test_lora_mirror_is_deterministic():
    """The workers check what they receive against their own rebuild of the sender's state."""
    a, b = Lora.after(1, 2), Lora.after(1, 2)
    for (ka, va), (kb, vb) in zip(a.state_dict()["a"].items(), b.state_dict()["a"].items()):
        assert ka == kb and va.equal(vb)
    changed, _ = Lora.changed(a.state_dict())
    assert 0 < changed < 0.2 * sum(t.numel() * 4 for t in a.base.parameters())
