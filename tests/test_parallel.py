"""Parallel layouts: impossible degrees fail early; multi-process runs match one process (gloo, fp32)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import make_config
from titan_mm.data.dataloader import build_dataloader
from titan_mm.parallel.parallel_dims import ParallelDims, ParallelismError
from titan_mm.train.prefetch import DevicePrefetcher

SMALL = ["--training.seq_len", "256", "--data.image_slots_per_row", "10", "--checkpoint.enable", "false",
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


def test_throughput_is_counted_per_gpu_of_a_data_parallel_batch():
    """tokens/s and MFU divide a batch's work over the ranks that share it (cp x ulysses x tp x pp)."""
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=2, tp=2, pp=2, ulysses=1, world_size=16)
    assert (dims.dp_degree, dims.ranks_per_batch) == (2, 8)
    dims = ParallelDims(dp_replicate=2, dp_shard=2, cp=1, tp=1, pp=1, ulysses=2, world_size=8)
    assert (dims.dp_degree, dims.ranks_per_batch) == (4, 2)


HANG_TIMEOUT_S = 300
"""A multi-process run of these tests takes under 80 s on 2 CPU cores; one that has not ended in
300 s is hung (every rank blocked in a gloo collective) and is killed with its process group."""


def torchrun(nproc: int, dump, *args: str) -> dict[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", "--job.config_file", "train_configs/debug_vlm.toml", "--job.dump_folder", str(dump),
           *SMALL, *args]
    for attempt in range(3):
        returncode, stdout, stderr = run_in_own_session(
            cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"))
        # torch 2.13's CPU collectives (gloo), rarely: a rank killed by SIGSEGV / SIGABRT, or a hang
        # with one pair of context-parallel ranks blocked in an all-gather that their peers have
        # left (seen once). Such a run is run again: a hung or killed
        # attempt writes no checkpoint and no losses, so the next one starts where it did. Any
        # other failure, and wrong losses, fail at once.
        if returncode is None:
            print(f"attempt {attempt + 1}: not done after {HANG_TIMEOUT_S} s (a hang in gloo); running again\n"
                  f"{stderr[-1500:]}")
            continue
        if returncode == 0 or not re.search(r"exitcode\s*:\s*-(6|11)\b", stderr):
            break
        print(f"attempt {attempt + 1}: a rank died by a signal in gloo; running again\n{stderr[-1500:]}")
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    with open(dump / "losses.json") as f:
        return {int(k): v for k, v in json.load(f).items()}


def run_in_own_session(cmd: list[str], env: dict) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of ``cmd``; exit code None when it ran past HANG_TIMEOUT_S, after
    killing it and every process it started (torchrun's ranks too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=HANG_TIMEOUT_S)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr


def seed_checkpoint(tmp_path, *overrides: str) -> str:
    sys.path.insert(0, "scripts")
    from create_seed_checkpoint import create_seed_checkpoint
    path = str(tmp_path / "seed")
    create_seed_checkpoint(make_config(tmp_path / "seed_run", *overrides), path)
    return path


def single_process_losses(tmp_path, dp_world: int, steps: int, seed: str, *overrides: str) -> list[float]:
    """One process that trains on what ``dp_world`` data-parallel ranks would see together: each
    step's microbatches are rank 0's batches, rank 1's batches, ... (each rank accumulates as many as
    ``overrides`` ask; same global loss normalisation)."""
    import train
    accumulate = make_config(tmp_path / "probe", *overrides).training.gradient_accumulation_steps
    cfg = make_config(tmp_path / "single", *SMALL, "--training.steps", str(steps), *overrides,
                      "--training.gradient_accumulation_steps", str(dp_world * accumulate),
                      "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed)
    trainer = train.Trainer(cfg)
    loaders = [iter(build_dataloader(cfg.data, trainer.tokenizer, trainer.model_args.vision_input,
                                     seq_len=cfg.training.seq_len, batch_size=cfg.training.local_batch_size,
                                     dp_rank=r, dp_world=dp_world, seed=cfg.job.seed)) for r in range(dp_world)]

    def interleaved():
        while True:
            for it in loaders:
                for _ in range(accumulate):
                    yield next(it)

    trainer.batches = DevicePrefetcher(interleaved(), trainer.device, dp_world * accumulate, trainer.prepare_batch,
                                       states={}, read_ahead=False)
    for _ in range(steps):
        trainer.train_state.step += 1
        trainer.train_step()
    return [loss.item() for loss in trainer.losses]


LLAMA = ["--job.config_file", "train_configs/llama_debug.toml"]
QWEN2_5_VL = ["--job.config_file", "train_configs/qwen2_5_vl_debug.toml"]
QWEN3_VL = ["--job.config_file", "train_configs/qwen3_vl_debug.toml"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
FSDP2_TP2 = ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]


@pytest.mark.parametrize("nproc,dp_world,model,layout", [
    (2, 2, [], ["--parallelism.data_parallel_shard_degree", "2"]),
    (2, 1, [], TP2),
    (4, 2, [], FSDP2_TP2),
    (2, 1, LLAMA + ["--model.flavor", "debug-llama3"], TP2),
    (2, 1, QWEN2_5_VL, TP2),
    (4, 2, QWEN2_5_VL, FSDP2_TP2),
    (2, 1, QWEN3_VL, TP2),
    (4, 2, QWEN3_VL, FSDP2_TP2),
    (2, 1, [], ["--parallelism.context_parallel_degree", "2"]),
    (2, 1, [], ["--parallelism.ulysses_degree", "2"]),
    (4, 2, [], ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.context_parallel_degree", "2"]),
    (4, 1, [], ["--parallelism.context_parallel_degree", "2", "--parallelism.tensor_parallel_degree", "2"]),
    (4, 2, [], ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.ulysses_degree", "2"]),
    (2, 1, QWEN3_VL, ["--parallelism.context_parallel_degree", "2"]),
    (2, 1, QWEN2_5_VL, ["--parallelism.ulysses_degree", "2"]),
    (2, 1, QWEN2_5_VL, ["--parallelism.context_parallel_degree", "2"]),
], ids=["fsdp2", "tp2", "fsdp2xtp2", "llama3-untied-tp2", "qwen2_5_vl-tp2", "qwen2_5_vl-fsdp2xtp2", "qwen3_vl-tp2",
        "qwen3_vl-fsdp2xtp2", "cp2", "ulysses2", "fsdp2xcp2", "cp2xtp2", "fsdp2xulysses2", "qwen3_vl-cp2",
        "qwen2_5_vl-ulysses2", "qwen2_5_vl-cp2"])
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


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vl_tensor_parallel_sizes_cover_decoder_vit_and_patch_axis(tmp_path, family):
    """Everything TP splits is checked up front: the ViT's heads and MLP and its sequence L
    (data.patches_per_slot) besides the decoder's sizes; a bad degree names the valid ones."""
    import train
    from titan_mm.models import get_model_spec
    spec = get_model_spec(family)
    args = spec.flavors["debug"]
    cfg = make_config(tmp_path, "--job.config_file", f"train_configs/{family}_debug.toml",
                      "--data.patches_per_slot", "36")
    sizes = spec.tensor_parallel_sizes(args, cfg)
    assert sizes == {"decoder n_heads": 4, "decoder n_kv_heads": 2, "decoder ffn_hidden_dim": 768,
                     "decoder vocab_size": 512, "training.seq_len": 512, "vision n_heads": 4,
                     "vision ffn_hidden_dim": args.vision.ffn_hidden_dim, "data.patches_per_slot": 36}
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=8, pp=1, ulysses=1, world_size=8)
    with pytest.raises(ParallelismError, match=r"tp degree 8 does not divide decoder n_heads = 4; "
                                               r"choose tp in \[1, 2, 4\]"):
        train.check_tensor_parallel(dims, spec, args, cfg)
    with pytest.raises(ParallelismError, match=r"tp degree 8 does not divide data.patches_per_slot = 36"):
        dims.check_divisible("data.patches_per_slot", sizes["data.patches_per_slot"], "tp")


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
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # losses.json keeps the first run's steps 1-3
    rel = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in (4, 5))
    print(f"FSDP(4) -> HSDP(2x2) resume, max relative loss difference at steps 4-5: {rel:.2e}")
    assert rel < 1e-5, (resumed, straight)


def test_checkpoint_saved_under_fsdp2_resumes_under_fsdp2_x_tp2(tmp_path):
    """Qwen3-VL: save at step 3 under FSDP(2) (2 processes), resume under FSDP(2) x TP(2) (4
    processes): DCP reshards model and optimizer from 1-D FSDP shards to 2-D (FSDP x TP) shards. The
    data-parallel degree (2) is unchanged and dataloader states are keyed by data-parallel rank, so
    both tp ranks of a data rank continue its batches and steps 4-5 match the uninterrupted FSDP(2)
    run."""
    seed = seed_checkpoint(tmp_path, *QWEN3_VL)
    common = [*QWEN3_VL, "--training.steps", "5", "--checkpoint.enable", "true",
              "--checkpoint.initial_load_path", seed, "--checkpoint.interval", "3",
              "--checkpoint.export_model_only", "false", "--parallelism.data_parallel_shard_degree", "2"]
    straight = torchrun(2, tmp_path / "straight", *common)
    torchrun(2, tmp_path / "resharded", *common, "--training.steps", "3")
    resumed = torchrun(4, tmp_path / "resharded", *common, "--parallelism.tensor_parallel_degree", "2")
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # losses.json keeps the first run's steps 1-3
    rel = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in (4, 5))
    print(f"FSDP(2) -> FSDP(2) x TP(2) resume, max relative loss difference at steps 4-5: {rel:.2e}")
    assert rel < 1e-5, (resumed, straight)


@pytest.mark.parametrize("model", [QWEN3_VL, LLAMA + ["--model.flavor", "debug-llama3"]],
                         ids=["qwen3_vl-tied-embeddings", "llama3-untied"])
def test_loss_parallel_gives_the_losses_of_gathered_logits(tmp_path, model):
    """TP(2) with the loss on vocabulary-sharded logits (loss_parallel) vs on gathered logits: same
    losses over 3 steps within 1e-6 relative, for a tied output head (the embedding table split by
    vocabulary serves both) and an untied one."""
    seed = seed_checkpoint(tmp_path, *model)
    common = [*model, *TP2, "--training.steps", "3", "--checkpoint.initial_load_path", seed]
    sharded = torchrun(2, tmp_path / "sharded", *common)
    gathered = torchrun(2, tmp_path / "gathered", *common, "--parallelism.enable_loss_parallel", "false")
    rel = max(abs(sharded[s] - gathered[s]) / abs(gathered[s]) for s in (1, 2, 3))
    print(f"{model[-1]} loss parallel on vs off, max relative loss difference over 3 steps: {rel:.2e}")
    assert rel < 1e-6, (sharded, gathered)


def test_hsdp_with_one_shard_per_replica_matches_fsdp(tmp_path):
    """HSDP(2 x 1) sums gradients over both replicas: same losses as FSDP(2)."""
    seed = seed_checkpoint(tmp_path)
    common = ["--training.steps", "3", "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
              "--checkpoint.interval", "30", "--checkpoint.export_model_only", "false"]
    fsdp = torchrun(2, tmp_path / "fsdp", *common)
    hsdp = torchrun(2, tmp_path / "hsdp", *common, "--parallelism.data_parallel_replicate_degree", "2",
                    "--parallelism.data_parallel_shard_degree", "1")
    assert hsdp == pytest.approx(fsdp, rel=1e-6)


def test_checkpoint_saved_under_fsdp4_resumes_under_fsdp2_x_tp2_with_data_shards(tmp_path):
    """data.num_shards = 4 makes the data independent of the layout: save at step 3 under FSDP(4)
    (one shard per rank, 1 row each), resume under FSDP(2) x TP(2) with 2 rows per rank (two
    shards each): the global batches, and so steps 4-5, match the uninterrupted FSDP(4) run."""
    seed = seed_checkpoint(tmp_path)
    common = ["--training.steps", "5", "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
              "--checkpoint.interval", "3", "--checkpoint.export_model_only", "false", "--data.num_shards", "4"]
    straight = torchrun(4, tmp_path / "straight", *common)
    torchrun(4, tmp_path / "resharded", *common, "--training.steps", "3")
    resumed = torchrun(4, tmp_path / "resharded", *common, "--parallelism.data_parallel_shard_degree", "2",
                       "--parallelism.tensor_parallel_degree", "2", "--training.local_batch_size", "2")
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # losses.json keeps the first run's steps 1-3
    rel = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in (4, 5))
    print(f"FSDP(4) -> FSDP(2) x TP(2) resume with 4 data shards, max relative loss difference at "
          f"steps 4-5: {rel:.2e}")
    assert rel < 1e-5, (resumed, straight)


UNTIED_2_ROWS = ["--model.flavor", "debug-untied", "--training.local_batch_size", "2"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
ULYSSES2 = ["--parallelism.ulysses_degree", "2"]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
# DeepStack adds vision features after decoder layers 0-2: they stay on the first stage
QWEN3_VL_PP2 = [*PP2, "--parallelism.pipeline_parallel_split_points", "3"]


# each takes about 45 s on 2 CPU cores; the slow ones (pytest -m slow) take paths the others cover:
# the debug VLM's same 3-D layout for the composition, and for each Qwen family's own pieces
# (window attention, DeepStack, M-RoPE) its 2-process CP, Ulysses, TP and PP layouts (qwen*-cp2,
# qwen*-ulysses2 here and in test_pipeline.py, qwen*-fsdp2xtp2); Qwen3-VL PP runs here in 3-D
@pytest.mark.parametrize("model,layout", [
    ([], FSDP2_TP2 + CP2),
    (UNTIED_2_ROWS, FSDP2_TP2 + PP2),
    # 2 KV heads / tp 2 = 1 KV head per rank for 2 Ulysses ranks: each rank gets a copy
    ([], FSDP2_TP2 + ULYSSES2),
    pytest.param(QWEN2_5_VL, FSDP2_TP2 + CP2, marks=pytest.mark.slow),
    pytest.param(QWEN2_5_VL + UNTIED_2_ROWS, FSDP2_TP2 + PP2, marks=pytest.mark.slow),
    pytest.param(QWEN2_5_VL, FSDP2_TP2 + ULYSSES2, marks=pytest.mark.slow),
    pytest.param(QWEN3_VL, FSDP2_TP2 + CP2, marks=pytest.mark.slow),
    (QWEN3_VL + UNTIED_2_ROWS, FSDP2_TP2 + QWEN3_VL_PP2),
    pytest.param(QWEN3_VL, FSDP2_TP2 + ULYSSES2, marks=pytest.mark.slow),
], ids=["fsdp2xcp2xtp2", "fsdp2xpp2xtp2", "fsdp2xulysses2xtp2", "qwen2_5_vl-fsdp2xcp2xtp2",
        "qwen2_5_vl-fsdp2xpp2xtp2", "qwen2_5_vl-fsdp2xulysses2xtp2", "qwen3_vl-fsdp2xcp2xtp2",
        "qwen3_vl-fsdp2xpp2xtp2", "qwen3_vl-fsdp2xulysses2xtp2"])
def test_three_dimensional_layouts_match_single_process(tmp_path, model, layout):
    """8 processes, the 3-D layouts an 8-GPU node runs (issue 7), on CPU."""
    assert_layout_matches_single_process(tmp_path, 8, 2, model, layout)
