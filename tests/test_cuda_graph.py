"""compile.cuda_graph: the captured step trains exactly like the normal one, and resumes exactly.

The GPU tests run on the GPU machine (docs/benchmarks.md records the run); on CPU they skip, and the
configuration checks and the optimizer-state handling they rely on run everywhere.
"""

import pytest
import torch

from conftest import make_config, train_losses
from titan_mm.config import ConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

QWEN3_VL = ["--job.config_file", "train_configs/qwen3_vl_debug.toml", "--compile.enable", "true",
            "--model.attention_backend", "flex", "--training.seq_len", "512", "--data.image_slots_per_row", "8",
            "--metrics.log_freq", "100", "--lr_scheduler.warmup_steps", "3"]


def graph_cfg(tmp_path, *overrides):
    from titan_mm.config import parse_args
    args = [*QWEN3_VL, "--job.dump_folder", str(tmp_path / "run"), "--metrics.enable_tensorboard", "false",
            *overrides]
    return parse_args(args)[0]


def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path):
    from train import check_cuda_graph
    cfg = make_config(tmp_path, "--compile.cuda_graph", "true")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_cuda_graph(cfg, torch.device("cpu"), 1, "sdpa")
    with pytest.raises(ConfigError, match="one GPU only"):
        check_cuda_graph(cfg, torch.device("cuda"), 2, "flex")
    with pytest.raises(ConfigError, match="varlen"):
        check_cuda_graph(cfg, torch.device("cuda"), 1, "varlen")
    check_cuda_graph(cfg, torch.device("cuda"), 1, "flex_flash")


def test_resume_keeps_the_running_jobs_optimizer_kernels(tiny_cfg):
    """A checkpoint saved with the fused optimizer resumes with foreach (and vice versa) instead of
    bringing back the saving job's implementation flags."""
    import train
    train_losses(tiny_cfg("--training.steps", "3", "--checkpoint.interval", "3",
                          "--optimizer.implementation", "fused"))
    trainer = train.Trainer(tiny_cfg("--training.steps", "4", "--optimizer.implementation", "foreach",
                                     "--training.nonfinite", "stop"))  # "skip" needs the fused kernel
    assert trainer.train_state.step == 3
    groups = trainer.optimizers[0].param_groups
    assert all(g["foreach"] and not g["fused"] for g in groups)


@needs_cuda
def test_cuda_graph_steps_match_normal_steps_and_resume_exactly(tmp_path):
    """Qwen3-VL debug, compiled, bf16 autocast: 8 steps with the captured step give the losses of 8
    normal steps (the LR warm-up changes the lr every step); stopping at step 4 and resuming with a
    fresh capture continues the same losses."""
    steps = ["--training.steps", "8"]
    normal = train_losses(graph_cfg(tmp_path / "normal", *steps, "--checkpoint.enable", "false"))
    graphed = train_losses(graph_cfg(tmp_path / "graph", *steps, "--compile.cuda_graph", "true",
                                     "--checkpoint.interval", "4"))
    print("normal", normal, "\ngraphed", graphed)
    assert graphed == pytest.approx(normal, rel=1e-5)
    resumed = train_losses(graph_cfg(tmp_path / "graph", *steps, "--compile.cuda_graph", "true",
                                     "--checkpoint.interval", "4", "--checkpoint.load_step", "4"))
    print("resumed", resumed)
    assert resumed == graphed[4:]


@needs_cuda
def test_a_non_finite_step_inside_the_cuda_graph_leaves_the_state_bit_identical(tmp_path, monkeypatch):
    """NaN gradients at step 5, a replay of the graph captured at step 3: parameters, AdamW moments
    and step counts after it equal those after step 4 bit for bit, the skip is counted, and step 6
    trains again."""
    import train
    from test_reliability import optimizer_snapshot
    from titan_mm.train.nonfinite import DRILL_NAN_STEPS
    monkeypatch.setenv(DRILL_NAN_STEPS, "5")
    trainer = train.Trainer(graph_cfg(tmp_path, "--training.steps", "6", "--compile.cuda_graph", "true",
                                      "--checkpoint.enable", "false"))

    def step():
        trainer.train_state.step += 1
        trainer.train_step()

    for _ in range(4):
        step()
    before = optimizer_snapshot(trainer)
    step()
    assert all(torch.equal(a, b) for a, b in zip(before, optimizer_snapshot(trainer)))
    assert trainer.nonfinite.poll() == 1
    step()
    assert not all(torch.equal(a, b) for a, b in zip(before, optimizer_snapshot(trainer)))
