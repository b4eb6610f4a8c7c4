"""stager.placement: which ranks hold each rank's replicas (pure functions, no process group)."""

import itertools

import pytest

import stager
from stager.placement import default_ranks_per_node, failure_domain, place


def check(placement):
    """The invariants of every placement: k holders per rank, on k distinct domains none of which
    is the rank's own, sources the exact inverse of holders."""
    world, k, rpn = placement.world_size, placement.replicas, placement.ranks_per_node
    assert len(placement.holders) == len(placement.sources) == world
    for rank, holders in enumerate(placement.holders):
        assert len(holders) == k
        domains = [failure_domain(h, rpn) for h in holders]
        assert failure_domain(rank, rpn) not in domains, (rank, holders)
        assert len(set(domains)) == k, (rank, holders)
    inverse = sorted((holder, owner) for owner, holders in enumerate(placement.holders) for holder in holders)
    assert inverse == sorted((holder, owner) for holder, owners in enumerate(placement.sources) for owner in owners)


@pytest.mark.parametrize("world", [2, 4, 6, 8, 16, 64])
def test_even_sizes_keep_pytorch_pairs(world):
    placement = place(world, 1, 1, "pairs")
    check(placement)
    for rank in range(world):
        partner = (rank + world // 2) % world
        assert placement.holders[rank] == (partner,) and placement.sources[rank] == (partner,)


@pytest.mark.parametrize("world", [3, 5, 7, 9])
def test_odd_sizes_keep_the_contract_ring(world):
    placement = place(world, 1, 1, "pairs")
    check(placement)
    for rank in range(world):
        assert placement.holders[rank] == ((rank + 1) % world,)
        assert placement.sources[rank] == ((rank - 1) % world,)


def test_ring_topology():
    placement = place(4, 1, 1, "ring")
    assert placement.holders == ((1,), (2,), (3,), (0,))


@pytest.mark.parametrize("world,rpn", [(4, 2), (8, 2), (8, 4), (12, 3), (16, 8), (10, 5), (12, 5)])
def test_pytorch_partner_whenever_it_is_on_another_node(world, rpn):
    placement = place(world, 1, rpn, "pairs")
    check(placement)
    for rank in range(world):
        partner = (rank + world // 2) % world
        if failure_domain(partner, rpn) != failure_domain(rank, rpn):
            assert placement.holders[rank] == (partner,), (rank, placement.holders[rank])


def test_three_nodes_of_three_never_keep_the_only_copy_on_the_owners_node():
    placement = place(9, 1, 3, "pairs")
    check(placement)
    # the ring (r -> r + 1) would put ranks 0 -> 1 and 1 -> 2 on node 0: the next node's slot instead
    assert placement.holders == tuple(((rank + 3) % 9,) for rank in range(9))


def test_two_holders_on_six_ranks_three_nodes():
    placement = place(6, 2, 2, "pairs")
    check(placement)
    for rank in range(6):  # the two other nodes, one copy each
        assert {failure_domain(h, 2) for h in placement.holders[rank]} == {0, 1, 2} - {rank // 2}
    assert all(len(sources) == 2 for sources in placement.sources)  # balanced


def test_every_small_configuration_is_valid_deterministic_and_balanced():
    for world, rpn, k in itertools.product(range(2, 19), range(1, 7), range(1, 4)):
        domains = -(-world // rpn)
        if k > domains - 1:
            with pytest.raises(stager.StagerError, match=f"replicas={k}"):
                place(world, k, rpn)
            continue
        placement = place(world, k, rpn)
        check(placement)
        assert place(world, k, rpn) == placement  # deterministic (and cached)
        loads = [len(sources) for sources in placement.sources]
        if (k + 1) * rpn <= world:  # a set of shifts exists: every rank holds exactly k
            assert placement.shifts is not None and loads == [k] * world, (world, rpn, k)
        else:
            # uneven domains: the short last domain must hold more, the load stays spread
            assert placement.shifts is None
            last = [failure_domain(r, rpn) == domains - 1 for r in range(world)]
            assert max(load for load, short in zip(loads, last) if not short) <= k + 1, (world, rpn, k, loads)


def test_fallback_prefers_the_pytorch_partner():
    # 6 ranks on nodes of 4 + 2: ranks 0 and 3 have their partner (3, 0) on their own node
    placement = place(6, 1, 4, "pairs")
    check(placement)
    assert placement.shifts is None
    for rank in (1, 2, 4, 5):
        assert placement.holders[rank] == ((rank + 3) % 6,)


def test_impossible_placements_raise_before_anything():
    with pytest.raises(stager.StagerError, match=r"replicas=2.*only 2 domains"):
        place(4, 2, 2)
    with pytest.raises(stager.StagerError, match="only 1 domain"):
        place(4, 1, 4)
    with pytest.raises(stager.StagerError, match="replicas must be at least 1"):
        place(4, 0, 1)
    with pytest.raises(stager.StagerError, match="topology"):
        place(4, 1, 1, "star")
    with pytest.raises(stager.StagerError, match="ranks_per_node must be an integer"):
        place(4, 1, 2.0)


def test_first_source_is_the_rank_whose_first_holder_this_is():
    placement = place(6, 2, 2)
    for rank in range(6):
        first = placement.first_source(rank)
        assert placement.holders[first][0] == rank


def test_ranks_per_node_defaults_to_local_world_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_ranks_per_node() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_ranks_per_node() == 4
    assert stager.ReplicationStager()._ranks_per_node == 4
    # one node holding the whole group: nothing to spread over, PyTorch's pairs (not an error)
    assert stager.ReplicationStager().placement(4).holders == ((2,), (3,), (0,), (1,))
    assert stager.ReplicationStager().placement(8).ranks_per_node == 4
    with pytest.raises(stager.StagerError, match="only 1 domain"):  # unless asked for explicitly
        stager.ReplicationStager(ranks_per_node=4).placement(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "garbage")
    assert default_ranks_per_node() == 1
