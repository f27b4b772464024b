"""Parallel layouts: impossible degrees fail early; multi-process runs match one process (gloo, fp32)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import make_config
from titan_mm.data.dataloader import build_dataloader
from titan_mm.parallel.parallel_dims import ParallelDims, ParallelismError

SMALL = ["--training.seq_len", "256", "--data.max_images_per_row", "10", "--checkpoint.enable", "false",
         "--metrics.enable_tensorboard", "false", "--metrics.log_freq", "1"]


@pytest.mark.parametrize("degrees,world,message", [
    (dict(dp_replicate=1, dp_shard=3, cp=1, tp=1, pp=1, ulysses=1), 4, "multiply to 3"),
    (dict(dp_replicate=1, dp_shard=-1, cp=1, tp=3, pp=1, ulysses=1), 4, "not divisible by"),
    (dict(dp_replicate=0, dp_shard=-1, cp=1, tp=1, pp=1, ulysses=1), 4, "dp_replicate degree must be >= 1"),
])
def test_impossible_layouts_fail_with_a_message_naming_the_fix(degrees, world, message):
    with pytest.raises(ParallelismError, match=message):
        ParallelDims(**degrees, world_size=world)


def test_head_divisibility_names_valid_degrees():
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=4, pp=1, ulysses=1, world_size=4)
    with pytest.raises(ParallelismError, match=r"tp degree 4 does not divide num_kv_heads = 2; choose tp in \[1, 2\]"):
        dims.check_divisible("num_kv_heads", 2, "tp")


def torchrun(nproc: int, dump, *args: str) -> dict[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", "--job.config_file", "train_configs/debug_vlm.toml", "--job.dump_folder", str(dump),
           *SMALL, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(dump / "losses.json") as f:
        return {int(k): v for k, v in json.load(f).items()}


def seed_checkpoint(tmp_path, *overrides: str) -> str:
    sys.path.insert(0, "scripts")
    from create_seed_checkpoint import create_seed_checkpoint
    path = str(tmp_path / "seed")
    create_seed_checkpoint(make_config(tmp_path / "seed_run", *overrides), path)
    return path


def single_process_losses(tmp_path, dp_world: int, steps: int, seed: str, *overrides: str) -> list[float]:
    """One process that trains on what ``dp_world`` data-parallel ranks would see together: each
    step's microbatches are rank 0's batch, rank 1's batch, ... (same global loss normalisation)."""
    import train
    cfg = make_config(tmp_path / "single", *SMALL, "--training.steps", str(steps),
                      "--training.gradient_accumulation_steps", str(dp_world),
                      "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed, *overrides)
    trainer = train.Trainer(cfg)
    loaders = [iter(build_dataloader(cfg.data, trainer.tokenizer, trainer.model_args.vision_input,
                                     seq_len=cfg.training.seq_len, batch_size=cfg.training.local_batch_size,
                                     dp_rank=r, dp_world=dp_world, seed=cfg.job.seed)) for r in range(dp_world)]

    def interleaved():
        while True:
            for it in loaders:
                yield next(it)

    data = interleaved()
    for _ in range(steps):
        trainer.train_state.step += 1
        trainer.train_step(data)
    return [loss.item() for loss in trainer.losses]


LLAMA = ["--job.config_file", "train_configs/llama_debug.toml"]


@pytest.mark.parametrize("nproc,dp_world,model,layout", [
    (2, 2, [], ["--parallelism.data_parallel_shard_degree", "2"]),
    (2, 1, [], ["--parallelism.tensor_parallel_degree", "2"]),
    (4, 2, [], ["--parallelism.data_parallel_shard_degree", "2",
                "--parallelism.tensor_parallel_degree", "2"]),
    (2, 1, LLAMA, ["--parallelism.tensor_parallel_degree", "2"]),
], ids=["fsdp2", "tp2", "fsdp2xtp2", "llama-tp2"])
def test_parallel_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout):
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout)


def assert_layout_matches_single_process(tmp_path, nproc: int, dp_world: int, model: list[str], layout: list[str]):
    """Same seed checkpoint, same global batches: the per-step losses of ``nproc`` processes match one
    process that trains on what the ``dp_world`` data-parallel ranks see together (within 1e-5 relative)."""
    steps = 5
    seed = seed_checkpoint(tmp_path, *model)
    reference = single_process_losses(tmp_path, dp_world, steps, seed, *model)
    losses = torchrun(nproc, tmp_path / "parallel", *model, "--training.steps", str(steps),
                      "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
                      "--checkpoint.interval", "1000", "--checkpoint.export_model_only", "false", *layout)
    got = [losses[s] for s in range(1, steps + 1)]
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, reference))
    print(f"{' '.join(model + layout)} vs single process, max relative loss difference over {steps} "
          f"steps: {rel:.2e}")
    assert rel < 1e-5, list(zip(got, reference))


def test_impossible_tensor_parallel_degree_fails_before_compute(tmp_path):
    """tp=3 cannot split the decoder's 4 heads: every rank exits with code 2 naming the valid degrees."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "train.py",
           "--job.config_file", "train_configs/debug_vlm.toml", "--job.dump_folder", str(tmp_path / "run"),
           *SMALL, "--parallelism.tensor_parallel_degree", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode != 0
    fix = "tp degree 3 does not divide decoder n_heads = 4; choose tp in [1, 2, 4]"
    assert fix in out.stderr, out.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", out.stderr), out.stderr[-3000:]
    assert "INFO training" not in out.stderr  # failed before the model was built or any step ran


def test_checkpoint_saved_under_fsdp4_resumes_under_hsdp_2x2(tmp_path):
    """Save at step 3 under FSDP(4), resume under HSDP (2 replicas x 2 shards): DCP reshards model
    and optimizer; the data-parallel degree (4) is unchanged, so the batches continue exactly and
    steps 4-5 match the uninterrupted FSDP(4) run."""
    seed = seed_checkpoint(tmp_path)
    common = ["--training.steps", "5", "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
              "--checkpoint.interval", "3", "--checkpoint.export_model_only", "false"]
    straight = torchrun(4, tmp_path / "straight", *common)
    torchrun(4, tmp_path / "resharded", *common, "--training.steps", "3")
    resumed = torchrun(4, tmp_path / "resharded", *common, "--parallelism.data_parallel_replicate_degree", "2",
                       "--parallelism.data_parallel_shard_degree", "2")
    assert sorted(resumed) == [4, 5]
    rel = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in (4, 5))
    print(f"FSDP(4) -> HSDP(2x2) resume, max relative loss difference at steps 4-5: {rel:.2e}")
    assert rel < 1e-5, (resumed, straight)


def test_hsdp_with_one_shard_per_replica_matches_fsdp(tmp_path):
    """HSDP(2 x 1) sums gradients over both replicas: same losses as FSDP(2)."""
    seed = seed_checkpoint(tmp_path)
    common = ["--training.steps", "3", "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
              "--checkpoint.interval", "30", "--checkpoint.export_model_only", "false"]
    fsdp = torchrun(2, tmp_path / "fsdp", *common)
    hsdp = torchrun(2, tmp_path / "hsdp", *common, "--parallelism.data_parallel_replicate_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1")
    assert hsdp == pytest.approx(fsdp, rel=1e-6)
