"""stager.dcp_hooks: the one dependency on dcp internals. These tests fail loudly when a torch
release changes what it relies on (the frame of ``async_save`` and its two locals)."""

import inspect

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import state_dict_saver
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import stager
from stager import dcp_hooks


def test_torch_async_save_still_has_what_draining_writer_reads():
    function = inspect.unwrap(state_dict_saver.async_save)
    assert function.__module__ == dcp_hooks.DCP_SAVER_MODULE
    assert function.__name__ == "async_save"
    names = function.__code__.co_varnames
    assert dcp_hooks.WRITER_LOCAL in names and dcp_hooks.CHECKPOINTER_LOCAL in names, names
    assert {"THREAD", "PROCESS"} <= set(AsyncCheckpointerType.__members__)


def test_no_writer_outside_async_save():
    assert dcp_hooks.draining_writer() is None


class _RecordingWriter(stager.FileSystemWriter):
    def __init__(self, path):
        super().__init__(path)
        self.accepted = []

    def accept_stage(self, stage):
        self.accepted.append(stage)
        super().accept_stage(stage)


def test_async_save_on_the_thread_checkpointer_hands_the_stage_to_stagers_writer(tmp_path):
    state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    writer = _RecordingWriter(tmp_path / "ours")
    with stager.DefaultStager(stager.StagingOptions(use_shared_memory=False)) as async_stager:
        response = dcp.async_save(state, storage_writer=writer, async_stager=async_stager,
                                  async_checkpointer_type=AsyncCheckpointerType.THREAD, no_dist=True)
        response.upload_completion.result(timeout=60)
        # PyTorch's writer takes no stage in flight: the stage is not bound, the writer gets the
        # finished copy.
        plain = dcp.FileSystemWriter(str(tmp_path / "theirs"))
        future = None

        class Spy(stager.DefaultStager):
            def stage(self, state_dict, **kwargs):
                nonlocal future
                future = super().stage(state_dict, **kwargs)
                return future

        with Spy(stager.StagingOptions(use_shared_memory=False)) as spy:
            dcp.async_save(state, storage_writer=plain, async_stager=spy,
                           async_checkpointer_type=AsyncCheckpointerType.THREAD,
                           no_dist=True).upload_completion.result(timeout=60)
        assert future is not None and not future.bound
    assert len(writer.accepted) == 1 and isinstance(writer.accepted[0], stager.stagers.StagedCopy)
    assert not writer._accepted  # write_data took it
    target = {"w": torch.zeros(64, 64), "b": torch.zeros(64)}
    dcp.load(target, storage_reader=stager.FileSystemReader(tmp_path / "ours"), no_dist=True)
    assert all(torch.equal(target[k], state[k]) for k in state)
