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
