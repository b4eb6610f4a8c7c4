"""stager's stagers as `async_stager=` of torch.distributed.checkpoint.async_save, both
checkpointer types, then dcp.load gives the values back. Each case runs in its own process
(a real single-rank gloo group on 127.0.0.1) with a bounded timeout."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, socket, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    import stager

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def main(kind, which, path):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        optim = torch.optim.Adam(model.parameters())
        model(torch.randn(8, 16)).sum().backward()
        optim.step()
        state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": torch.tensor(7)}
        if which == "default":
            async_stager = stager.DefaultStager(stager.StagingOptions(num_threads=2))
        elif which == "default-sync":
            async_stager = stager.DefaultStager(stager.StagingOptions(use_async_staging=False))
        else:
            async_stager = stager.BlockingAsyncStager()
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        checkpointer = getattr(AsyncCheckpointerType, kind)
        response = dcp.async_save(state, checkpoint_id=path, async_stager=async_stager, async_checkpointer_type=checkpointer)
        upload = getattr(response, "upload_completion", response)
        # Training goes on: the staged copy must not see this.
        with torch.no_grad():
            for p in model.parameters():
                if getattr(response, "staging_completion", None) is not None:
                    response.staging_completion.result()
                p.add_(100.0)
        upload.result(timeout=120)
        async_stager.close()
        target = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}, "step": torch.tensor(0)}
        dcp.load(target, checkpoint_id=path)
        for key, value in expected.items():
            assert torch.equal(target["model"][key], value), key
        assert target["step"].item() == 7
        dist.destroy_process_group()
        print("DCP-OK")

    main(*sys.argv[1:])
    """
)


@pytest.mark.parametrize("kind", ["THREAD", "PROCESS"])
@pytest.mark.parametrize("which", ["default", "default-sync", "blocking"])
def test_async_save_round_trip(tmp_path, kind, which):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind, which, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0 and "DCP-OK" in result.stdout, result.stdout + result.stderr


MANY_TENSORS_SCRIPT = textwrap.dedent(
    """
    import socket, sys
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    import stager

    def main(path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        state = {f"t{i}": torch.full((4,), float(i)) for i in range(20_000)}
        with stager.DefaultStager(stager.StagingOptions(use_shared_memory=True)) as async_stager:
            response = dcp.async_save(state, checkpoint_id=path, async_stager=async_stager,
                                      async_checkpointer_type=AsyncCheckpointerType.PROCESS)
            response.upload_completion.result(timeout=300)
        target = {key: torch.zeros(4) for key in state}
        dcp.load(target, checkpoint_id=path)
        assert all(torch.equal(target[key], state[key]) for key in state)
        dist.destroy_process_group()
        print("DCP-OK")

    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def test_process_checkpointer_with_twenty_thousand_shared_tensors(tmp_path):
    # PyTorch's own pickling would open one shared-memory descriptor per tensor here (EMFILE).
    script = tmp_path / "many.py"
    script.write_text(MANY_TENSORS_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0 and "DCP-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
