"""Activation checkpointing modes: the same losses as keeping every activation, and they do recompute."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_config, train_losses

SMALL = ["--training.seq_len", "256", "--data.image_slots_per_row", "10", "--checkpoint.enable", "false",
         "--metrics.log_freq", "5"]
QWEN3_VL = ["--job.config_file", "train_configs/qwen3_vl_debug.toml"]
MODES = {
    "none": ["--activation_checkpoint.mode", "none"],
    "full": ["--activation_checkpoint.mode", "full"],
    "every-2nd-block": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"],
    "per-op": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
}


@pytest.mark.parametrize("model", [[], QWEN3_VL], ids=["llava", "qwen3_vl"])
def test_every_mode_gives_the_losses_of_no_checkpointing(tmp_path, model):
    """fp32 CPU, 3 steps from the same seed: recomputation replays the same ops on the same inputs,
    so each mode's losses equal those without checkpointing within 1e-6 relative (measured 0 for
    llava, 0 to 9e-8 for Qwen3-VL)."""
    losses = {name: train_losses(make_config(tmp_path / name, *model, *SMALL, "--training.steps", "3", *args))
              for name, args in MODES.items()}
    for name, got in losses.items():
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, losses["none"]))
        print(f"{name}: max relative loss difference to no checkpointing over 3 steps {rel:.1e}")
        assert rel <= 1e-6, (name, got, losses["none"])


class MatmulCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def matmuls_of_one_step(tmp_path, *mode_args) -> int:
    import train
    trainer = train.Trainer(make_config(tmp_path, *SMALL, *mode_args))
    mb = trainer.objective.prepare(next(iter(trainer.dataloader)), seed=0)
    with MatmulCounter() as counter:
        trainer.forward_backward(mb, mb["targets"])
    return counter.count


def test_checkpointing_recomputes_matmuls_in_backward(tmp_path):
    """Matmuls run by one forward + backward of the debug VLM (ViT and decoder blocks): full
    checkpointing repeats every block's forward matmuls, every-2nd-block about half of them, per-op
    selective only the matmuls whose outputs it does not keep (every second one)."""
    counts = {name: matmuls_of_one_step(tmp_path / name, *args) for name, args in MODES.items()}
    recomputed = {name: c - counts["none"] for name, c in counts.items()}
    print(f"matmuls per step: {counts}; recomputed: {recomputed}")
    assert 0 < recomputed["every-2nd-block"] < recomputed["full"]
    assert 0 < recomputed["per-op"] < recomputed["full"]
