"""engine.py's registry of stages in flight: a writer handed a staged dict early asks, per tensor,
which copy to wait for before writing its bytes."""

import pytest
import torch

from stager import _native, engine
from stager.plan import plan_state_dict


def test_pending_copy_names_each_storage_until_its_copy_completes():
    empty = torch.empty(0)
    sd = {"a": torch.randn(100), "empty": empty, "b": torch.randn(7), "view": None}
    sd["view"] = sd["a"][10:20]
    plan = plan_state_dict(sd)
    table = plan.table
    buffer = engine.process_pool().acquire(table.total_nbytes)
    completion = _native.Completion(len(table.storage_nbytes))  # nobody copies: we complete by hand
    engine.register_pending(buffer, completion, table)
    staged = plan.materialize(buffer)
    a_storage = table.tensor_storage[0]
    b_storage = table.tensor_storage[2]
    assert engine.pending_copy(staged["a"]) == (completion, a_storage)
    assert engine.pending_copy(staged["view"]) == (completion, a_storage)  # a view of a's storage
    assert engine.pending_copy(staged["b"]) == (completion, b_storage)
    assert engine.pending_copy(staged["empty"]) is None  # no bytes to wait for
    assert engine.pending_copy(torch.randn(3)) is None  # not in a stager buffer
    completion.mark_complete(a_storage)
    assert engine.pending_copy(staged["a"]) is None
    assert engine.pending_copy(staged["b"]) == (completion, b_storage)
    for index in range(len(completion)):
        completion.mark_complete(index)
    assert engine.pending_copy(staged["b"]) is None


def test_copy_niceness_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("STAGER_COPY_NICENESS", "7")
    assert engine._background_niceness() == 7
    for bad in ("high", "-1", "20"):
        monkeypatch.setenv("STAGER_COPY_NICENESS", bad)
        with pytest.raises(_native.StagerError, match="STAGER_COPY_NICENESS"):
            engine._background_niceness()
    monkeypatch.delenv("STAGER_COPY_NICENESS")
    assert engine._background_niceness() == engine.BACKGROUND_NICENESS == 0
