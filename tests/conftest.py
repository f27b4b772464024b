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


def train_without_recompiles(trainer, steps: int) -> list[float]:
    """Run ``steps`` steps of a compiled trainer with recompiles forbidden after the first step
    (torch.compiler's fail_on_recompile); each step's loss."""
    import torch
    try:
        for step in range(1, steps + 1):
            if step == 2:
                torch.compiler.set_stance("fail_on_recompile")
            trainer.train_state.step = step
            trainer.train_step()
    finally:
        torch.compiler.set_stance("default")
    return [loss.item() for loss in trainer.losses]


@pytest.fixture
def tiny_cfg(tmp_path):
    def build(*overrides):
        return make_config(tmp_path, "--training.seq_len", "256", "--data.image_slots_per_row", "10",
                           "--metrics.log_freq", "5", *overrides)
    return build


def forward_on_meta(model_cls, args, inputs: dict):
    """A forward with the model and every input on the meta device, whose tensors hold no data:
    any host sync in it (.item(), .tolist(), .cpu(), bool() of a tensor, an op whose output shape
    depends on values such as nonzero) raises instead of silently passing. Returns the logits."""
    import torch
    with torch.device("meta"):
        model = model_cls(args)
    return model.decoder.logits(model(**{k: v.to("meta") for k, v in inputs.items()}))


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
