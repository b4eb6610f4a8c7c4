"""engine.py's process-wide parts, and a stage in flight telling its writer, per tensor, which copy
to wait for before writing its bytes."""

import pytest
import torch

from stager import _native, engine
from stager.plan import plan_state_dict
from stager.stagers import StagedCopy


def test_stage_names_the_request_of_each_storage_until_its_copy_completes():
    # The writer of a dict staged in flight asks the stage itself which request fills a tensor.
    empty = torch.empty(0)
    sd = {"a": torch.randn(100), "empty": empty, "b": torch.randn(7), "view": None}
    sd["view"] = sd["a"][10:20]
    plan = plan_state_dict(sd)
    table = plan.table
    buffer = engine.process_pool().acquire(table.total_nbytes)
    completion = _native.Completion(len(table.storage_nbytes))  # nobody copies: we complete by hand
    stage = StagedCopy(plan, buffer, completion)
    staged = plan.materialize(buffer)
    a_storage = table.tensor_storage[0]
    b_storage = table.tensor_storage[2]
    assert stage.request_of(staged["a"]) == a_storage
    assert stage.request_of(staged["view"]) == a_storage  # a view of a's storage
    assert stage.request_of(staged["b"]) == b_storage
    assert stage.request_of(staged["empty"]) is None  # no bytes to wait for
    assert stage.request_of(torch.randn(3)) is None  # not in this stage's buffer
    completion.mark_complete(a_storage)
    assert stage.request_of(staged["a"]) is None
    assert stage.request_of(staged["b"]) == b_storage
    for index in range(len(completion)):
        completion.mark_complete(index)
    assert stage.request_of(staged["b"]) is None


def test_copy_niceness_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("STAGER_COPY_NICENESS", "7")
    assert engine._background_niceness() == 7
    for bad in ("high", "-1", "20"):
        monkeypatch.setenv("STAGER_COPY_NICENESS", bad)
        with pytest.raises(_native.StagerError, match="STAGER_COPY_NICENESS"):
            engine._background_niceness()
    monkeypatch.delenv("STAGER_COPY_NICENESS")
    assert engine._background_niceness() == engine.BACKGROUND_NICENESS == 0


def test_copy_tensors_copies_host_tensors_and_refuses_what_it_cannot_copy_safely():
    copier = engine.copy_engine(2)
    sources = [torch.randn(3_000_000), torch.arange(10, dtype=torch.int64), torch.randn(0)]
    targets = [torch.zeros(3_000_000), torch.zeros(10, dtype=torch.int64), torch.zeros(0)]
    copier.copy_tensors(list(zip(sources, targets)))
    assert all(torch.equal(s, t) for s, t in zip(sources, targets))
    same = torch.randn(5)
    copier.copy_tensors([(same, same)])  # the same memory: nothing to do
    base = torch.zeros(100)
    bad = {
        "not contiguous": [(torch.randn(4, 4), torch.zeros(4, 4).t())],
        "holds 16 bytes, not 32": [(torch.randn(8), torch.zeros(4))],
        "overlap": [(torch.randn(10), base[:10]), (torch.randn(10), base[5:15])],
        "overlaps the source": [(base[:10], base[5:15])],
        "not a CPU tensor": [(torch.randn(2), torch.zeros(2, device="meta"))],
    }
    for why, pairs in bad.items():
        before = [t.clone() for _, t in pairs if t.device.type == "cpu"]
        with pytest.raises(_native.StagerError, match=why):
            copier.copy_tensors(pairs)
        after = [t for _, t in pairs if t.device.type == "cpu"]
        assert all(torch.equal(b, a) for b, a in zip(before, after)), f"{why}: nothing is copied"
