"""One rank of a torchtitan 0.3 training run on CPU/gloo with stager.enable() (see test_torchtitan.py).

torchtitan's own parts: the llama3 debug model (causal SDPA attention: see below), built on meta and sharded with
FSDP2 (fully_shard per block and at the root, as torchtitan's parallelize does), its
OptimizersContainer (default AdamW) and LRSchedulersContainer, and its CheckpointManager, which
saves every ``INTERVAL`` steps with the given async_mode. Batches are random tokens seeded by
(step, rank), so a resumed run sees the batches an uninterrupted run saw.

Usage: titan_worker.py MODE DIRECTORY PHASE OUTPUT, PHASE being ``full`` (steps 1..STEPS, saving
at INTERVAL) or ``resume`` (load the latest checkpoint, train to STEPS). Rank 0 writes the full
final weights and optimizer state to OUTPUT with torch.save.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.checkpointer import dcp as titan_dcp
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import model_registry

import stager

STEPS = 6
INTERVAL = 4
BATCH, SEQ = 2, 32


class TrainState:
    """What torchtitan's Trainer checkpoints as ``train_state``: the step."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def main() -> None:
    mode, directory, phase, output = sys.argv[1:5]
    # After torchtitan's checkpointer is imported: enable() rebinds its DefaultStager/StagingOptions.
    stager.enable()
    assert titan_dcp.DefaultStager is stager.DefaultStager, titan_dcp.DefaultStager
    assert titan_dcp.StagingOptions is stager.StagingOptions

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=120))
    rank = dist.get_rank()
    torch.manual_seed(1234)

    spec = model_registry("debugmodel")
    with torch.device("meta"):
        model = spec.model.build()
        for block in model.layers.values():
            # FlexAttention (the debug model's) has no backward on CPU, nor Varlen (CUDA flash):
            # torchtitan's own causal SDPA, parameter-free, so the state dict is the same.
            block.attention.inner_attention = ScaledDotProductAttention(ScaledDotProductAttention.Config())
    for block in model.layers.values():
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8, decay_type="linear",
                                                 min_lr_factor=0.0).build(optimizers=optimizers,
                                                                          training_steps=STEPS)
    train_state = TrainState()
    checkpointer = CheckpointManager.Config(enable=True, folder="checkpoint", interval=INTERVAL,
                                            async_mode=mode).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers,
        states={"train_state": train_state}, sd_adapter=None, base_folder=directory)

    if phase == "resume":
        assert checkpointer.load(step=-1), "no checkpoint to resume from"
        assert train_state.step == INTERVAL, train_state.step
    vocab = spec.model.vocab_size
    while train_state.step < STEPS:
        train_state.step += 1
        gen = torch.Generator().manual_seed(train_state.step * 100 + rank)
        tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen)
        positions = torch.arange(SEQ).expand(BATCH, SEQ)  # one document per row
        logits = model(tokens[:, :-1], positions=positions)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        checkpointer.maybe_wait_for_staging()
        optimizers.step()
        lr_schedulers.step()
        optimizers.zero_grad()
        checkpointer.save(train_state.step, last_step=False)
    checkpointer.maybe_wait_for_staging()
    checkpointer.maybe_wait_for_saving()

    # Every rank joins the gathers; rank 0 writes.
    weights = {name: param.full_tensor() for name, param in model.named_parameters()}
    moments = {}
    for name, param in model.named_parameters():
        for key, value in optimizers.optimizers[0].state[param].items():
            moments[f"{name}.{key}"] = value.full_tensor() if hasattr(value, "full_tensor") else value
    if rank == 0:
        torch.save({"weights": weights, "moments": moments, "files": sorted(
            name for step_dir in os.listdir(os.path.join(directory, "checkpoint"))
            for name in os.listdir(os.path.join(directory, "checkpoint", step_dir)))}, output)
    checkpointer.close()
    dist.barrier()
    dist.destroy_process_group()
    stager.disable()
    assert titan_dcp.DefaultStager is torch.distributed.checkpoint.staging.DefaultStager
    print(f"RANK{rank} OK", flush=True)


if __name__ == "__main__":
    main()
