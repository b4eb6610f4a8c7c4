"""One rank of an incremental replication test (``ReplicationStager(skip_unchanged=True)``):
``python incremental_worker.py RANK WORLD PORT DIR STEPS_JSON``, launched by tests/ranks.py.

Like tests/replication_worker.py: joins a gloo group on 127.0.0.1 once, runs each
``[scenario, options]`` of STEPS_JSON in order (``options["subdir"]`` of DIR, default the
scenario's name; ``rejoin`` re-creates the group on another port, as a survivor of a restart
does), prints one ``RESULT {...}`` line per scenario and exits by itself (code 0 when every check
passed).

Every rank's state is deterministic (:class:`Lora`, :func:`changing_state`), so a holder checks
what it received against its own rebuild of its source's state, step by step.
"""

import copy
import datetime
import os

import torch
import torch.distributed as dist
from ranks import join_gloo, report, worker_main

import stager
from helpers import assert_same_tree  # tests/ is on sys.path: this script runs from there
from stager import replica_files

#: Storages of the coalesced wire layout are 64-byte aligned: a changed storage costs at most this
#: much padding on the wire.
ALIGN = stager._native.STORAGE_ALIGNMENT

# ---- deterministic states ---------------------------------------------------------------------------


class Lora:
    """A frozen base (linear layers) with rank-2 adapters trained by Adam: after n steps, the
    same values on every process that builds ``Lora(rank)`` and steps it n times."""

    WIDTH = 256
    LAYERS = 3
    RANK = 2

    def __init__(self, rank):
        self.rank = rank
        self.steps = 0
        torch.manual_seed(100 + rank)
        self.base = torch.nn.ModuleList(torch.nn.Linear(self.WIDTH, self.WIDTH) for _ in range(self.LAYERS))
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(self.RANK, self.WIDTH) * 0.1) for _ in range(self.LAYERS))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(self.WIDTH, self.RANK)) for _ in range(self.LAYERS))
        self.optimizer = torch.optim.Adam([*self.a, *self.b], lr=0.01)

    def step(self):
        gen = torch.Generator().manual_seed(7 * self.rank + 1000 * self.steps)
        x = torch.randn(8, self.WIDTH, generator=gen)
        for layer, a, b in zip(self.base, self.a, self.b):
            x = torch.tanh(layer(x) + (x @ a.T) @ b.T)
        x.square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        self.steps += 1

    def state_dict(self):
        return {"base": self.base.state_dict(), "a": self.a.state_dict(), "b": self.b.state_dict(),
                "optim": self.optimizer.state_dict(), "steps": self.steps}

    @staticmethod
    def changed(state_dict):
        """(bytes, storages) of what an optimizer step changes: adapters and Adam state."""
        storages = {}
        for key in ("a", "b", "optim"):
            for tensor in _tensors(state_dict[key]):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return sum(storages.values()), len(storages)

    @classmethod
    def after(cls, rank, steps):
        lora = cls(rank)
        for _ in range(steps):
            lora.step()
        return lora


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def nbytes_of(state_dict):
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(state_dict)}.values())


#: (name, what changes, storages that must travel). Every storage is a multiple of 64 bytes, so the
#: wire layout has no padding and the bytes sent are exactly those of the changed storages.
CHANGES = [
    ("first", "everything (nothing held yet)", None),
    ("nothing", "nothing", []),
    ("in_place", "a.add_(1)", ["a"]),
    ("data_assignment", "b.data = new", ["b"]),
    ("set_", "c.set_(new storage)", ["c"]),
    ("view_written", "view.fill_(3): its storage, shared with `viewed`", ["viewed"]),
    ("new_tensor", "d replaced under its key", ["d"]),
    ("inference_added", "an inference tensor added", ["inference"]),
    ("inference_again", "nothing but the inference tensor, which has no version counter", ["inference"]),
    ("resize", "e.resize_(2x) (and the inference tensor, as every time)", ["e", "inference"]),
    ("rewrapped", "f re-wrapped (`f.data`: a fresh counter on the same storage) and written once, reaching the "
                  "old version while the old tensor lives on (as in an optimizer); and the inference tensor",
     ["f", "inference"]),
]

#: Tensors a change replaced but something else still holds (an optimizer's old parameters).
_STILL_HELD = []


def changing_state(rank):
    """The state CHANGES starts from (per rank)."""
    gen = torch.Generator().manual_seed(500 + rank)
    viewed = torch.randn(64, generator=gen)
    return {"a": torch.randn(32, generator=gen), "b": torch.randn(48, generator=gen),
            "c": torch.randn(16, 4, generator=gen), "viewed": viewed, "view": viewed[16:32],
            "d": torch.randn(80, generator=gen), "e": torch.randn(16, generator=gen), "frozen": torch.randn(4096, generator=gen),
            "f": torch.randn(16, generator=gen).add_(0.0),  # version 1
            "meta": {"step": 0}}


def apply_change(state, index, rank):
    """Applies change ``index`` of CHANGES to ``state`` (the same on every process)."""
    name = CHANGES[index][0]
    gen = torch.Generator().manual_seed(900 + rank + 10 * index)
    state["meta"] = {"step": index}
    if name == "in_place":
        state["a"].add_(1.0)
    elif name == "data_assignment":
        state["b"].data = torch.randn(48, generator=gen)
    elif name == "set_":
        state["c"].set_(torch.randn(64, generator=gen).untyped_storage(), 0, (16, 4), (4, 1))
    elif name == "view_written":
        state["view"].fill_(3.0)
    elif name == "new_tensor":
        state["d"] = torch.randn(80, generator=gen)
    elif name == "inference_added":
        with torch.inference_mode():
            state["inference"] = torch.randn(32, generator=gen)
    elif name == "resize":
        state["e"].resize_(32).copy_(torch.randn(32, generator=gen))
    elif name == "rewrapped":
        _STILL_HELD.append(state["f"])
        state["f"] = state["f"].data
        state["f"].mul_(2.0)
        assert state["f"]._version == _STILL_HELD[-1]._version == 1


def storage_bytes(state, keys):
    return sum(state[key].untyped_storage().nbytes() for key in keys)


# ---- scenarios ----------------------------------------------------------------------------------


def _stager(directory, options, **extra):
    return stager.ReplicationStager(
        timeout=datetime.timedelta(seconds=options.get("timeout", 30)), storage_dir=directory,
        persist_format=options.get("persist_format", "stager"), skip_unchanged=options.get("skip_unchanged", True),
        **extra)


def _copy_path(directory, rank, src, fmt, previous=False):
    return replica_files.replica_path(directory, rank, src, fmt, previous=previous)


def _load(path):
    if path.endswith(".pt"):
        with open(path, "rb") as f:
            return torch.load(f, weights_only=True)
    return stager.load(path)


def _check_files(directory, rank, src, fmt, step, expected, expected_previous):
    """The newest copy (and the kept previous one) load as complete state_dicts of their steps."""
    if fmt is None:
        return
    path = _copy_path(directory, rank, src, fmt)
    if fmt == "stager":
        assert stager._native.CheckpointFile(path).verify() == [], path
    assert replica_files.read_record(path)["step"] == step
    assert_same_tree(_load(path), expected)
    if expected_previous is not None:
        previous = _copy_path(directory, rank, src, fmt, previous=True)
        assert replica_files.read_record(previous)["step"] == step - 1
        assert_same_tree(_load(previous), expected_previous)


def scenario_lora(rank, world, directory, options):
    """``steps`` stages of a LoRA-like dict with an Adam step between: after the first, only the
    adapters and the optimizer state travel (both ways); every received replica and every copy
    file is the partner's complete state of that step; unchanged storages of the new replica
    share the previous replica's memory, and the previous replica keeps its values."""
    fmt = options.get("persist_format", "stager")
    replicator = _stager(directory, options)
    partner = replicator.peers(rank, world)[1]
    me, mirror = Lora(rank), Lora(partner)
    previous = expected_previous = None
    sent = []
    for step in range(1, options.get("steps", 3) + 1):
        me.step()
        mirror.step()
        received = replicator.stage(me.state_dict(), step=step)
        expected = copy.deepcopy(mirror.state_dict())
        assert_same_tree(received, expected)
        full = nbytes_of(me.state_dict())
        changed, count = Lora.changed(me.state_dict())
        data_sent, data_received = replicator.last_sent.data, replicator.last_received.data
        if step == 1:
            assert data_sent >= full and data_received >= full, (data_sent, data_received, full)
        else:
            for data in (data_sent, data_received):
                assert changed <= data <= changed + ALIGN * count, (step, data, changed, full)
            # the holder built the replica from the previous one: frozen storages are shared ...
            for key in received["base"]:
                assert (received["base"][key].untyped_storage().data_ptr()
                        == previous["base"][key].untyped_storage().data_ptr()), key
            # ... and the previous replica still holds its own step's values
            assert_same_tree(previous, expected_previous)
        _check_files(directory, rank, partner, fmt, step, expected, expected_previous)
        previous, expected_previous = received, expected
        sent.append(data_sent)
    report(rank=rank, sent=sent, full=nbytes_of(me.state_dict()), changed=Lora.changed(me.state_dict())[0])


def scenario_changes(rank, world, directory, options):
    """Every kind of change of tests/test_incremental.py, across the wire: exactly the storages
    that changed travel (every storage is a multiple of 64 bytes: no padding), and the replica
    and its file are the partner's complete state."""
    fmt = options.get("persist_format", "stager")
    replicator = _stager(directory, options)
    partner = replicator.peers(rank, world)[1]
    mine, mirror = changing_state(rank), changing_state(partner)
    expected_previous = None
    sent = {}
    for index, (name, _, travels) in enumerate(CHANGES):
        apply_change(mine, index, rank)
        apply_change(mirror, index, partner)
        received = replicator.stage(mine, step=index + 1)
        expected = copy.deepcopy(mirror)
        assert_same_tree(received, expected)
        assert received["view"].untyped_storage().data_ptr() == received["viewed"].untyped_storage().data_ptr()
        assert received["view"].storage_offset() == 16
        want = nbytes_of(mine) if travels is None else storage_bytes(mine, travels)
        assert replicator.last_sent.data == want, (name, replicator.last_sent, want)
        assert replicator.last_received.data == want, (name, replicator.last_received, want)
        _check_files(directory, rank, partner, fmt, index + 1, expected, expected_previous)
        expected_previous = expected
        sent[name] = replicator.last_sent.data
    report(rank=rank, sent=sent, metadata=replicator.last_sent.metadata)


def scenario_mixed(rank, world, directory, options):
    """Only rank 0 asks for skip_unchanged: every send is a full one, and nothing fails."""
    replicator = _stager(directory, {**options, "skip_unchanged": rank == 0})
    partner = replicator.peers(rank, world)[1]
    me, mirror = Lora(rank), Lora(partner)
    for step in (1, 2, 3):
        me.step()
        mirror.step()
        assert_same_tree(replicator.stage(me.state_dict(), step=step), mirror.state_dict())
        assert replicator.last_sent.data >= nbytes_of(me.state_dict())
    report(rank=rank)


def scenario_ring(rank, world, directory, options):
    """Three ranks, two holders each (replicas=2): each holder gets only the changed storages of
    each of its two sources, and every copy file is complete."""
    replicator = _stager(directory, options, replicas=2, ranks_per_node=1)
    placement = replicator.placement(world)
    sources = placement.sources[rank]
    me = Lora(rank)
    mirrors = {src: Lora(src) for src in sources}
    for step in (1, 2, 3):
        me.step()
        for mirror in mirrors.values():
            mirror.step()
        received = replicator.stage(me.state_dict(), step=step)
        assert_same_tree(received, mirrors[placement.first_source(rank)].state_dict())
        changed, count = Lora.changed(me.state_dict())
        if step > 1:
            assert 2 * changed <= replicator.last_sent.data <= 2 * (changed + ALIGN * count), replicator.last_sent
            assert 2 * changed <= replicator.last_received.data <= 2 * (changed + ALIGN * count)
        for src, mirror in mirrors.items():
            _check_files(directory, rank, src, "stager", step, mirror.state_dict(), None)
    report(rank=rank, sources=sources)


def scenario_check(rank, world, directory, options):
    """STAGER_CHECK_UNCHANGED=1: rank 0 writes a frozen storage through NumPy (no version bump);
    the holder finds its bytes differ from the previous step's, and every rank raises the same
    StagerError naming the miss, nothing committed; the next stage sends everything again."""
    os.environ["STAGER_CHECK_UNCHANGED"] = "1"
    replicator = _stager(directory, options)
    partner = replicator.peers(rank, world)[1]
    me, mirror = Lora(rank), Lora(partner)
    for step in (1, 2):
        me.step()
        mirror.step()
        assert_same_tree(replicator.stage(me.state_dict(), step=step), mirror.state_dict())
    assert replicator.last_sent.data < nbytes_of(me.state_dict()) // 4
    me.step()
    mirror.step()
    weight = (me if rank == 0 else mirror).base[0].weight  # rank 0's state, on both ranks
    before = weight._version
    weight.detach().numpy()[0, :] = 7.0  # NumPy writes bypass version counters
    assert weight._version == before
    try:
        replicator.stage(me.state_dict(), step=3)
    except stager.StagerError as err:
        message = str(err)
        assert "version-counter" in message and "rank 1" in message and "nothing was committed" in message, message
    else:
        raise AssertionError("a write the version counter missed went through unnoticed")
    path = _copy_path(directory, rank, partner, "stager")
    assert replica_files.read_record(path)["step"] == 2  # the previous step stays committed
    received = replicator.stage(me.state_dict(), step=4)
    assert_same_tree(received, mirror.state_dict())
    assert replicator.last_sent.data >= nbytes_of(me.state_dict())  # a failed stage: everything again
    os.environ.pop("STAGER_CHECK_UNCHANGED")
    report(rank=rank, error=message)


# ---- restarts -----------------------------------------------------------------------------------

_live = {}


def scenario_rejoin(rank, world, directory, options):
    """A survivor of a restart: leaves the old group and joins a new one on ``port`` (its
    stagers, and what they hold, stay)."""
    dist.destroy_process_group()
    join_gloo(rank, world, options["port"])
    report(rank=rank)


def scenario_steps(rank, world, directory, options):
    """Stages steps ``first..last`` of the LoRA dict with one stager that lives as long as the
    process (a fresh process starts from the state its rank has after ``first - 1`` steps, as a
    restarted trainer restores it). ``expect``: "delta" or "full" for what this rank receives at
    ``first``; ``restore``: then restore() and check this rank's own state."""
    first, last = options["first"], options["last"]
    replicator = _live.get("stager") or _stager(directory, options)
    _live["stager"] = replicator
    partner = replicator.peers(rank, world)[1]
    if "me" not in _live:
        _live["me"], _live["mirror"] = Lora.after(rank, first - 1), Lora.after(partner, first - 1)
    me, mirror = _live["me"], _live["mirror"]
    received_at_first = None
    for step in range(first, last + 1):
        me.step()
        mirror.step()
        received = replicator.stage(me.state_dict(), step=step)
        assert_same_tree(received, mirror.state_dict())
        _check_files(directory, rank, partner, "stager", step, mirror.state_dict(), None)
        if step == first:
            received_at_first = replicator.last_received.data
    full = nbytes_of(me.state_dict())
    changed, count = Lora.changed(me.state_dict())
    expect = options.get("expect")
    if expect == "delta":
        assert changed <= received_at_first <= changed + ALIGN * count, (received_at_first, changed)
    elif expect == "full":
        assert received_at_first >= full, (received_at_first, full)
    if options.get("restore"):
        restored = replicator.restore()
        assert_same_tree(restored, me.state_dict())
        assert restored["steps"] == last
    report(rank=rank, received=received_at_first, full=full, changed=changed)


def scenario_restore(rank, world, directory, options):
    """A fresh process on the old directory: restore() gives this rank's exact state of the
    newest step (``steps``)."""
    replicator = _stager(directory, options)
    restored = replicator.restore()
    assert_same_tree(restored, Lora.after(rank, options["steps"]).state_dict())
    report(rank=rank, step=restored["steps"])


if __name__ == "__main__":
    worker_main(globals())
