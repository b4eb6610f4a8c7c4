"""ReplicationStager.restore(): the recovery scenarios, with real processes and real files.

Every scenario runs the workers of tests/replication_worker.py in two phases: the first
replicates and then dies (SIGKILL or a kill inside stage()), the test damages what a real failure
would (a wiped node's directories, a flipped byte), and fresh processes on the old directories
call restore(). The last tests put each simulated node in its own network namespace.
"""

import shutil

import pytest
from ranks import (
    Network,
    assert_all_ok,
    collect,
    kill_when_done,
    run_ranks,
    start_ranks,
)

import stager
from helpers import flip_byte
from stager.recovery import decide


def wipe(directory, ranks):
    for rank in ranks:
        shutil.rmtree(directory / f"rank{rank}", ignore_errors=True)


def restored_steps(results, name):
    return {rank: found[name]["step"] for rank, (_, found, _) in results.items()}


@pytest.mark.timeout(240)
def test_node_lost_and_every_process_restarted(tmp_path):
    # 4 ranks on 2 nodes: pairs 0<->2, 1<->3, so each rank's only replica is on the other node.
    common = {"rpn": 2, "steps": 2, "big_numel": 300_000, "timeout": 20}
    first = [
        ["replicate", {**common, "subdir": "own", "keep_own": True}],
        ["replicate", {**common, "subdir": "none", "name": "none"}],
        ["replicate", {**common, "subdir": "torch", "name": "torch", "keep_own": True, "persist_format": "torch"}],
        ["linger", {}],
    ]
    results = kill_when_done(start_ranks(4, tmp_path, first), ["own", "none", "torch", "linger"])
    assert all("linger" in found for _, found, _ in results.values()), results
    for subdir in ("own", "none", "torch"):
        wipe(tmp_path / subdir, [2, 3])  # node 1 is lost: its disks and its processes
    second = [
        ["restore", {**common, "subdir": "own", "name": "own", "keep_own": True}],
        ["restore", {**common, "subdir": "none", "name": "none", "expect_error": True}],
        ["restore", {**common, "subdir": "torch", "name": "torch", "keep_own": True, "persist_format": "torch",
                     "inplace": True}],
    ]
    results = run_ranks(4, tmp_path, second, deadline=120)
    assert_all_ok(results, ["own", "none", "torch"])
    # with keep_own, node 0's ranks read their own copies, node 1's get theirs from node 0
    assert restored_steps(results, "own") == {rank: 2 for rank in range(4)}
    assert restored_steps(results, "torch") == {rank: 2 for rank in range(4)}
    # without, ranks 0 and 1 lost every copy: the same error on every rank, naming them
    errors = {found["none"]["error"] for _, found, _ in results.values()}
    assert len(errors) == 1, errors
    error = errors.pop()
    assert "cannot restore ranks 0, 1" in error and "rank 2: steps 2, 1" in error, error


@pytest.mark.timeout(240)
def test_two_holders_survive_a_lost_node(tmp_path):
    common = {"rpn": 2, "replicas": 2, "steps": 2, "big_numel": 100_000, "timeout": 30}
    results = kill_when_done(start_ranks(6, tmp_path, [["replicate", common], ["linger", {}]]),
                             ["replicate", "linger"], deadline=150)
    for rank, (_, found, output) in results.items():
        assert "replicate" in found, output
        holders = found["replicate"]["holders"]
        assert len(holders) == 2 and rank // 2 not in {h // 2 for h in holders}
    wipe(tmp_path / "replicate", [2, 3])
    results = run_ranks(6, tmp_path, [["restore", {**common, "subdir": "replicate", "name": "restore"}]], deadline=150)
    assert_all_ok(results, ["restore"])
    assert restored_steps(results, "restore") == {rank: 2 for rank in range(6)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kill_at", ["transfer", "publish"])
def test_killed_in_the_middle_of_step_3(tmp_path, kill_at):
    # Ring of 3; rank 1 is SIGKILLed inside its third stage(); everyone restarts.
    common = {"steps": 3, "big_numel": 2_000_000, "timeout": 15}
    results = run_ranks(3, tmp_path, [["replicate", {**common, "victim": 1, "kill_at": kill_at}]], deadline=120)
    assert results[1][0] != 0 and "replicate" not in results[1][1], results[1][2]
    for rank in (0, 2):
        assert "replicate" in results[rank][1], results[rank][2]
    results = run_ranks(3, tmp_path, [["restore", {**common, "subdir": "replicate", "name": "restore"}]], deadline=120)
    assert_all_ok(results, ["restore"])
    steps = set(restored_steps(results, "restore").values())
    assert len(steps) == 1 and steps <= {2, 3}, steps
    if kill_at != "publish":
        assert steps == {2}  # step 3 was never confirmed by every rank


@pytest.mark.timeout(240)
def test_damaged_copies_and_in_place_restore(tmp_path):
    common = {"steps": 1, "big_numel": 200_000, "timeout": 20}
    first = [
        ["replicate", {**common, "subdir": "second_copy", "name": "second_copy", "keep_own": True}],
        ["replicate", {**common, "subdir": "only_copy", "name": "only_copy"}],
        ["replicate", {**common, "subdir": "older_step", "name": "older_step", "steps": 2}],
        # survivors: restore from the live stagers' memory, in place
        ["replicate_and_restore", {**common, "subdir": "live", "steps": 2, "inplace": True}],
        ["replicate_and_restore", {**common, "subdir": "memory", "name": "memory", "steps": 2,
                                   "persist_format": None}],
    ]
    results = run_ranks(2, tmp_path, first, deadline=120)
    assert_all_ok(results, ["second_copy", "only_copy", "older_step", "live", "memory"])
    assert restored_steps(results, "live") == {0: 2, 1: 2}
    assert restored_steps(results, "memory") == {0: 2, 1: 2}  # persist_format=None: memory only
    assert not any(list((tmp_path / "memory" / f"rank{rank}").iterdir()) for rank in range(2))
    # rank 0's own copy (the one restore tries first) is damaged: rank 1's replica is used instead
    flip_byte(tmp_path / "second_copy" / "rank0" / "rank_0_replica_partner_0.stager")
    # rank 0's only copy is damaged
    flip_byte(tmp_path / "only_copy" / "rank1" / "rank_1_replica_partner_0.stager")
    # the newest copy of rank 0 is damaged, the previous generation is intact: everyone goes back
    flip_byte(tmp_path / "older_step" / "rank1" / "rank_1_replica_partner_0.stager")
    second = [
        ["restore", {**common, "subdir": "second_copy", "name": "second_copy", "keep_own": True, "inplace": True}],
        ["restore", {**common, "subdir": "only_copy", "name": "only_copy", "expect_error": True}],
        ["restore", {**common, "subdir": "older_step", "name": "older_step", "inplace": True}],
        ["restore", {**common, "subdir": "older_step", "name": "mismatch", "inplace": True, "mismatch_rank": 1,
                     "expect_error": True}],
    ]
    results = run_ranks(2, tmp_path, second, deadline=120)
    assert_all_ok(results, ["second_copy", "only_copy", "older_step", "mismatch"])
    assert restored_steps(results, "second_copy") == {0: 1, 1: 1}
    assert restored_steps(results, "older_step") == {0: 1, 1: 1}
    errors = {found["only_copy"]["error"] for _, found, _ in results.values()}
    assert len(errors) == 1, errors
    error = errors.pop()
    assert "cannot restore rank 0" in error and "checksum" in error and "rank_1_replica_partner_0.stager" in error
    errors = {found["mismatch"]["error"] for _, found, _ in results.values()}
    assert len(errors) == 1 and "rank 1: " in (error := errors.pop()) and "model.bias" in error, error


@pytest.mark.timeout(120)
def test_in_place_restore_over_the_group_bumps_version_counters(tmp_path):
    # Regression: bytes received straight into restore(into=...)'s tensors over gloo left their
    # version counters as they were (the copied-in path bumped them), so stage(skip_unchanged=True)
    # could take a restored storage for unchanged. The worker checks every into tensor's _version.
    options = {"steps": 1, "big_numel": 100_000, "timeout": 20, "persist_format": None, "inplace": True}
    results = run_ranks(2, tmp_path, [["replicate_and_restore", {**options, "subdir": "wire", "name": "wire"}]],
                        deadline=90)
    assert_all_ok(results, ["wire"])
    for rank, (_, found, _) in results.items():
        restored = found["wire"]["restored"]
        # memory only, no own copy: the partner served it over the group, received in place
        assert restored["server"] == 1 - rank and restored["tier"] == "memory", restored
        assert restored["received_bytes"] >= 100_000 * 4, restored


@pytest.mark.timeout(120)
def test_one_rank_keeps_its_own_copies(tmp_path):
    # A group of one has nobody to replicate to; keep_own still writes generations, restore reads them.
    common = {"steps": 3, "keep_own": True, "timeout": 10}
    results = run_ranks(1, tmp_path, [["replicate_and_restore", {**common, "subdir": "alone", "name": "live"}],
                                      ["restore", {**common, "subdir": "alone", "name": "fresh", "inplace": True}]])
    assert_all_ok(results, ["live", "fresh"])
    assert results[0][1]["live"]["step"] == results[0][1]["fresh"]["step"] == 3
    found = stager.find_replicas(tmp_path / "alone" / "rank0")
    assert [(r.rank, r.owner, r.step, r.previous) for r in found] == [(0, 0, 3, False), (0, 0, 2, True)]


def test_decide_picks_the_newest_complete_step_and_balances():
    def copy(owner, step, where="memory"):
        return {"owner": owner, "step": step, "world_size": 3, "where": where}

    inventories = [
        [copy(2, 5), copy(2, 4, "/a"), copy(0, 5, "/own0")],
        [copy(0, 5), copy(0, 4, "/b")],
        [copy(1, 5, "/c"), copy(1, 4, "/d"), copy(0, 4, "/e")],
    ]
    decision = decide(3, inventories)
    assert decision.step == 5
    assert decision.servers == ((0, 2), (2, 0), (0, 0))  # rank 0 serves itself from its own file
    # its own copy damaged: the in-memory replica on rank 1 serves it
    assert decide(3, inventories, {(0, 2): "checksum"}).servers[0] == (1, 0)
    # rank 1's only step-5 copy is damaged: everyone goes back to step 4
    decision = decide(3, inventories, {(2, 0): "checksum"})
    assert decision.step == 4
    with pytest.raises(stager.StagerError, match=r"cannot restore rank 1: .*step 5.*damaged copies skipped: /c"):
        decide(3, inventories, {(2, 0): "checksum", (2, 1): "checksum"})
    # copies of another world size are ignored, and said so
    with pytest.raises(stager.StagerError, match="world of 8 ranks were ignored"):
        decide(2, [[{**copy(0, 1), "world_size": 8}], []])


# ---- real network faults -------------------------------------------------------------------------------


@pytest.fixture
def network():
    made = []

    def make(**options):
        net = Network(**options)
        made.append(net)
        return net

    yield make
    for net in made:
        net.close()


@pytest.mark.timeout(300)
def test_node_lost_across_network_namespaces(tmp_path, network):
    # node 0 = ranks 0, 1 and node 1 = ranks 2, 3, each in its own namespace, over a delayed veth link
    net = network(delay_ms=2)
    common = {"rpn": 2, "steps": 2, "big_numel": 300_000, "timeout": 30, "keep_own": True}
    procs = net.launch(4, tmp_path, [["replicate", common], ["linger", {}]], ranks_per_node=2)
    results = kill_when_done(procs, ["replicate", "linger"], deadline=150)
    assert all("linger" in found for _, found, _ in results.values()), (net.delay_note, results)
    wipe(tmp_path / "replicate", [2, 3])
    procs = net.launch(4, tmp_path, [["restore", {**common, "subdir": "replicate", "name": "restore"}]], ranks_per_node=2)
    results = collect(procs, deadline=150)
    assert_all_ok(results, ["restore"])
    assert restored_steps(results, "restore") == {rank: 2 for rank in range(4)}
    if net.delay_note:
        print(net.delay_note)


@pytest.mark.timeout(240)
def test_link_cut_in_the_middle_of_a_transfer(tmp_path, network):
    # 2 ranks, one per namespace, on a link slowed to 100 Mbit/s so step 3 (40 MB each way)
    # is still on the wire when the link goes down.
    net = network(delay_ms=1, rate="100mbit")
    timeout = 10
    procs = net.launch(2, tmp_path, [["cut", {"big_numel": 10_000_000, "timeout": timeout}]], ranks_per_node=1)
    line, seen = "", []
    while line.strip() != "ON-THE-WIRE":  # step 3's first data segment is posted: cut now
        line = procs[0].stdout.readline()
        assert line, "".join(seen)
        seen.append(line)
    net.cut(node=1)
    results = collect(procs, deadline=120)
    assert_all_ok(results, ["cut"])
    for rank in (0, 1):
        result = results[rank][1]["cut"]
        assert result["elapsed"] < timeout + 3, result  # within the timeout, no hang
        assert result["kind"] in ("timeout", "connection"), result
        print(f"rank {rank}: {result['kind']} after {result['elapsed']:.1f}s: {result['error']}")


def test_recovery_reads_its_input_and_returns_what_it_restored(tmp_path):
    """recovery.restore() works from a RecoveryInput alone (no stager), changes nothing in it,
    and returns the step, tier and server; recovery.py never imports replication.py."""
    import ast
    import datetime
    import pathlib

    import torch

    from stager import recovery

    held = {"w": torch.arange(6.0)}
    memory = {0: (7, 1, held)}
    source = recovery.RecoveryInput(str(tmp_path), datetime.timedelta(seconds=30), memory, False,
                                    group_for=lambda pg: pytest.fail("one rank needs no group"),
                                    transport_for=lambda group: pytest.fail("one rank needs no transport"))
    restored = recovery.restore(source)
    assert restored.state_dict is held and memory == {0: (7, 1, held)}
    assert restored.report() == {"step": 7, "server": 0, "tier": "memory", "where": "memory", "received_bytes": 0}
    tree = ast.parse(pathlib.Path(recovery.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names}
    assert not any(name and name.split(".")[-1] == "replication" for name in imported), imported
