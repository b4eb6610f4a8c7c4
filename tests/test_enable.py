"""stager.enable()/disable(): PyTorch's staging names and dcp's default local storage resolve to
stager's while enabled and to PyTorch's again after; dcp.save/async_save/load by checkpoint_id go
through stager's writer and reader (seen in the files they leave and the errors they raise).

Runs dcp with ``no_dist=True`` in the test process; torchtitan's CheckpointManager is in
tests/test_torchtitan.py.
"""

import importlib
import os
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint._async_process_executor as process_executor
import torch.distributed.checkpoint._storage_utils as storage_utils
import torch.distributed.checkpoint.filesystem as torch_filesystem
import torch.distributed.checkpoint.staging as staging
import torch.distributed.checkpoint.state_dict_saver as saver
from torch.distributed.checkpoint.api import CheckpointException

import stager

# stager.enable is the function; its module is stager.enable in sys.modules.
enable_module = importlib.import_module("stager.enable")

pytestmark = pytest.mark.filterwarnings("ignore")

TORCH_NAMES = {
    (staging, "DefaultStager"): staging.DefaultStager,
    (staging, "StagingOptions"): staging.StagingOptions,
    (staging, "BlockingAsyncStager"): staging.BlockingAsyncStager,
    (saver, "DefaultStager"): saver.DefaultStager,
    (saver, "StagingOptions"): saver.StagingOptions,
    (storage_utils, "FileSystemWriter"): storage_utils.FileSystemWriter,
    (storage_utils, "FileSystemReader"): storage_utils.FileSystemReader,
}
TORCH_EXECUTE_SAVE = process_executor._ProcessBasedAsyncCheckpointExecutor.__dict__["execute_save"]


@pytest.fixture(autouse=True)
def always_disabled():
    assert not enable_module.is_enabled()
    try:
        yield
    finally:
        stager.disable()
        assert_torch_names()


def assert_torch_names():
    for (module, name), theirs in TORCH_NAMES.items():
        assert getattr(module, name) is theirs, f"{module.__name__}.{name}"
    assert process_executor._ProcessBasedAsyncCheckpointExecutor.__dict__["execute_save"] is TORCH_EXECUTE_SAVE
    assert not enable_module.is_enabled()


def assert_stager_names():
    assert staging.DefaultStager is stager.DefaultStager
    assert staging.StagingOptions is stager.StagingOptions
    assert staging.BlockingAsyncStager is stager.BlockingAsyncStager
    assert saver.DefaultStager is stager.DefaultStager
    assert saver.StagingOptions is stager.StagingOptions
    assert storage_utils.FileSystemWriter is stager.FileSystemWriter
    assert storage_utils.FileSystemReader is stager.FileSystemReader
    assert process_executor._ProcessBasedAsyncCheckpointExecutor.__dict__["execute_save"] is not TORCH_EXECUTE_SAVE
    # Named explicitly, PyTorch's classes stay PyTorch's.
    assert dcp.FileSystemWriter is torch_filesystem.FileSystemWriter
    assert enable_module.is_enabled()


def test_enable_disable_round_trip_is_idempotent():
    assert_torch_names()
    stager.enable()
    assert_stager_names()
    stager.enable()  # idempotent: nothing recorded twice
    assert_stager_names()
    stager.disable()
    assert_torch_names()
    stager.disable()  # a no-op when disabled
    assert_torch_names()
    stager.enable()
    assert_stager_names()


def test_context_manager_restores_the_state_found_on_entry():
    with stager.enable():
        assert_stager_names()
        with stager.enable():  # entered while enabled: leaves it enabled
            assert_stager_names()
        assert_stager_names()
    assert_torch_names()


def test_context_manager_restores_on_error():
    with pytest.raises(ValueError), stager.enable():
        raise ValueError("boom")
    assert_torch_names()


def test_concurrent_enable_disable_leave_a_consistent_state():
    barrier = threading.Barrier(8)
    errors = []

    def flip(i):
        try:
            barrier.wait(timeout=30)
            for _ in range(50):
                stager.enable() if i % 2 else stager.disable()
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    if enable_module.is_enabled():
        assert_stager_names()
    stager.disable()
    assert_torch_names()


def test_a_name_rebound_by_someone_else_is_left_to_them():
    stager.enable()

    class Theirs:
        pass

    staging.DefaultStager = Theirs
    try:
        stager.disable()
        assert staging.DefaultStager is Theirs
        assert staging.StagingOptions is TORCH_NAMES[(staging, "StagingOptions")]
    finally:
        staging.DefaultStager = TORCH_NAMES[(staging, "DefaultStager")]


def sample_state():
    gen = torch.Generator().manual_seed(5)
    return {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(32, generator=gen), "step": 3}


def data_files(path):
    return sorted(name for name in os.listdir(path) if name.endswith(".distcp"))


def is_stager_rank_file(name):
    # stager's writer names rank files __<rank>_<token>.distcp (a fresh token per save);
    # PyTorch's writes __<rank>_<file index>.distcp.
    return name.startswith("__0_") and len(name) > len("__0_0.distcp") + 8


def load_fresh(path):
    dest = {"w": torch.zeros(64, 32), "b": torch.zeros(32), "step": 0}
    dcp.load(dest, checkpoint_id=path, no_dist=True)
    return dest


def test_save_and_load_by_checkpoint_id_use_stagers_storage_only_while_enabled(tmp_path):
    state = sample_state()
    with stager.enable():
        dcp.save(state, checkpoint_id=str(tmp_path / "enabled"), no_dist=True)
    dcp.save(state, checkpoint_id=str(tmp_path / "disabled"), no_dist=True)

    assert all(is_stager_rank_file(name) for name in data_files(tmp_path / "enabled"))
    assert data_files(tmp_path / "disabled") == ["__0_0.distcp"]
    # Both directions load with either side: the format is dcp's.
    for path in ("enabled", "disabled"):
        for enabled in (True, False):
            if enabled:
                stager.enable()
            loaded = load_fresh(str(tmp_path / path))
            stager.disable()
            assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
            assert loaded["step"] == 3


def test_load_by_checkpoint_id_uses_stagers_reader_while_enabled(tmp_path):
    # A truncated data file of a PyTorch checkpoint: stager's reader names it in a StagerError,
    # PyTorch's reader fails otherwise. That tells which reader dcp.load picked.
    path = str(tmp_path / "ckpt")
    dcp.save(sample_state(), checkpoint_id=path, no_dist=True)
    data = os.path.join(path, "__0_0.distcp")
    os.truncate(data, os.path.getsize(data) // 2)

    with stager.enable(), pytest.raises(CheckpointException) as enabled_error:
        load_fresh(path)
    assert "__0_0.distcp" in str(enabled_error.value)
    assert "StagerError" in str(enabled_error.value)

    with pytest.raises(CheckpointException) as disabled_error:
        load_fresh(path)
    assert "StagerError" not in str(disabled_error.value)


def test_async_save_by_checkpoint_id_stages_and_writes_with_stager(tmp_path):
    state = sample_state()
    staged_types = []
    original_stage = stager.DefaultStager.__dict__["stage"]

    def recording_stage(self, state_dict):
        staged_types.append(type(self))
        return original_stage(self, state_dict)

    stager.DefaultStager.stage = recording_stage
    try:
        with stager.enable():
            response = dcp.async_save(state, checkpoint_id=str(tmp_path / "async"), no_dist=True)
            future = getattr(response, "upload_completion", response)
            future.result(timeout=120)
    finally:
        stager.DefaultStager.stage = original_stage
    assert staged_types == [stager.DefaultStager]
    assert all(is_stager_rank_file(name) for name in data_files(tmp_path / "async"))
    loaded = load_fresh(str(tmp_path / "async"))
    assert torch.equal(loaded["w"], state["w"])


def test_staging_options_from_pytorch_names_build_stagers_stager():
    with stager.enable():
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        options = StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                 use_async_staging=False, use_non_blocking_copy=False)
        staged_stager = DefaultStager(options)
        try:
            assert isinstance(staged_stager, stager.DefaultStager)
            state = sample_state()
            staged = staged_stager.stage(state)
            assert torch.equal(staged["w"], state["w"])
            assert staged["w"].data_ptr() != state["w"].data_ptr()
        finally:
            staged_stager.close()


def test_a_name_pytorch_lacks_is_added_and_removed_again():
    # PyTorch before 2.9 has no staging.DefaultStager; seen here with BlockingAsyncStager taken out.
    theirs = staging.BlockingAsyncStager
    del staging.BlockingAsyncStager
    try:
        stager.enable()
        assert staging.BlockingAsyncStager is stager.BlockingAsyncStager
        stager.disable()
        assert not hasattr(staging, "BlockingAsyncStager")
    finally:
        staging.BlockingAsyncStager = theirs
