import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # configs name bundled assets relative to the repo root

from titan_mm.config import parse_args  # noqa: E402


def make_config(tmp_path, *overrides: str):
    """The debug config with a fresh dump folder and ``--section.key value`` overrides."""
    args = ["--job.config_file", "train_configs/debug_vlm.toml", "--job.dump_folder", str(tmp_path / "run"),
            "--metrics.enable_tensorboard", "false", *overrides]
    return parse_args(args)[0]


def train_losses(cfg) -> list[float]:
    """Train in this process and return each step's loss."""
    import train
    trainer = train.Trainer(cfg)
    trainer.train()
    return [loss.item() for loss in trainer.losses]


@pytest.fixture
def tiny_cfg(tmp_path):
    def build(*overrides):
        return make_config(tmp_path, "--training.seq_len", "256", "--data.image_slots_per_row", "10",
                           "--metrics.log_freq", "5", *overrides)
    return build
