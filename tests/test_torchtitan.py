"""torchtitan 0.3 unchanged after stager.enable(): its real CheckpointManager, the llama3 debug
model, FSDP2 on 2 gloo ranks (CPU), in each async_mode. A run trains 6 steps and checkpoints at
step 4 (asynchronously, while training goes on, in the async modes); a fresh pair of processes
resumes from that checkpoint and trains to step 6. The resumed weights and AdamW moments must be
bitwise those of the uninterrupted run, and the checkpoint must be stager's (its rank-file names).

Skipped when torchtitan is not installed (``pip install stager[titan]``). Each rank is
tests/titan_worker.py.
"""

import os
import re
import subprocess
import sys

import pytest
import ranks
import torch

pytest.importorskip("torchtitan.components.checkpointer.dcp", reason="torchtitan 0.3 not importable (extra: titan)",
                    exc_type=ImportError)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "titan_worker.py")
DEADLINE_S = 240


def run_two_ranks(mode, directory, phase, output):
    port = ranks.free_port()
    procs = []
    logs = []
    try:
        for rank in range(2):
            log = open(os.path.join(directory, f"{phase}.rank{rank}.log"), "w+")
            logs.append(log)
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE="2", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, WORKER, mode, directory, phase, output],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        codes = [proc.wait(timeout=DEADLINE_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for rank, (code, text) in enumerate(zip(codes, outputs)):
        assert code == 0 and f"RANK{rank} OK" in text, f"{phase} rank {rank} exited {code}:\n{text[-4000:]}"


@pytest.mark.parametrize("mode", ["disabled", "async", "async_with_pinned_mem"])
def test_torchtitan_resumes_bitwise_through_stager(tmp_path, mode):
    full = str(tmp_path / "full")
    resumed = str(tmp_path / "resumed")
    os.makedirs(full)
    run_two_ranks(mode, full, "full", os.path.join(full, "result.pt"))
    reference = torch.load(os.path.join(full, "result.pt"))

    # The resumed run starts from the uninterrupted run's step-4 checkpoint.
    os.makedirs(os.path.join(resumed, "checkpoint"))
    os.rename(os.path.join(full, "checkpoint", "step-4"), os.path.join(resumed, "checkpoint", "step-4"))
    run_two_ranks(mode, resumed, "resume", os.path.join(resumed, "result.pt"))
    result = torch.load(os.path.join(resumed, "result.pt"))

    # stager's writer wrote it: a fresh token per save in each rank file's name (PyTorch's: __0_0).
    data = [name for name in reference["files"] if name.endswith(".distcp")]
    assert len(data) == 2 and all(re.fullmatch(r"__[01]_[0-9a-f]{24}\.distcp", name) for name in data), data
    assert ".metadata" in reference["files"]

    assert reference["weights"].keys() == result["weights"].keys() and reference["weights"]
    for name, weight in reference["weights"].items():
        assert torch.equal(weight, result["weights"][name]), name
    assert reference["moments"].keys() == result["moments"].keys() and reference["moments"]
    for name, moment in reference["moments"].items():
        assert torch.equal(moment, result["moments"][name]), name


def test_torchtitan_imported_while_enabled_gets_pytorchs_names_back_on_disable():
    # The documented order (enable() first, then import torchtitan), in a fresh interpreter.
    script = (
        "import stager, torch.distributed.checkpoint.staging as staging\n"
        "stager.enable()\n"
        "import torchtitan.components.checkpointer.dcp as titan_dcp\n"
        "assert titan_dcp.DefaultStager is stager.DefaultStager, titan_dcp.DefaultStager\n"
        "assert titan_dcp.StagingOptions is stager.StagingOptions\n"
        "stager.disable()\n"
        "assert titan_dcp.DefaultStager is staging.DefaultStager is not stager.DefaultStager\n"
        "assert titan_dcp.StagingOptions is staging.StagingOptions\n"
        "print('OK')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-4000:]
