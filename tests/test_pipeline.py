"""Pipeline parallelism: impossible settings fail up front naming the fix; PP layouts, alone and with
FSDP or TP, match one process (gloo, fp32); checkpoints move between PP and no PP."""

import pytest
import torch

import train
from conftest import make_config
from test_parallel import assert_layout_matches_single_process, seed_checkpoint, torchrun
from titan_mm.config import ConfigError, Parallelism
from titan_mm.models import get_model_spec
from titan_mm.parallel.parallel_dims import ParallelismError
from titan_mm.parallel.pipeline import check_pipeline, microbatch_image_token_index, stage_layers

# tied embeddings cannot be split over stages; two rows per local batch give two microbatches
LLAVA = ["--model.flavor", "debug-untied", "--training.local_batch_size", "2"]
QWEN2_5_VL = ["--job.config_file", "train_configs/qwen2_5_vl_debug.toml", *LLAVA]
QWEN3_VL = ["--job.config_file", "train_configs/qwen3_vl_debug.toml", *LLAVA]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]


@pytest.mark.parametrize("nproc,dp_world,model,layout", [
    (2, 1, LLAVA, PP2),
    # two accumulated batches: the schedule runs twice before the optimizer steps
    (2, 1, [*LLAVA, "--training.gradient_accumulation_steps", "2"],
     [*PP2, "--parallelism.pipeline_parallel_schedule", "GPipe"]),
    (2, 1, LLAVA, [*PP2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                   "--parallelism.pipeline_parallel_stages_per_rank", "2"]),
    (2, 1, QWEN2_5_VL, PP2),
    # DeepStack adds vision features after decoder layers 0-2: they stay on the first stage
    (2, 1, QWEN3_VL, [*PP2, "--parallelism.pipeline_parallel_split_points", "3"]),
    (4, 2, LLAVA, [*PP2, "--parallelism.data_parallel_shard_degree", "2"]),
    (4, 1, LLAVA, [*PP2, "--parallelism.tensor_parallel_degree", "2"]),
], ids=["llava-pp2-1f1b", "llava-pp2-gpipe-accumulate2", "llava-pp2-interleaved", "qwen2_5_vl-pp2", "qwen3_vl-pp2",
        "llava-pp2xfsdp2", "llava-tp2xpp2"])
def test_pipeline_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout):
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout)


def test_checkpoints_move_between_pipeline_and_single_process(tmp_path):
    """Parameter and optimizer names do not depend on the layout: a checkpoint saved at step 3 by one
    process resumes under PP(2) with interleaved stages (two model parts per rank), one saved under
    PP(2) 1F1B resumes in one process, and steps 4-5 match an uninterrupted single-process run."""
    seed = seed_checkpoint(tmp_path, *LLAVA)
    common = [*LLAVA, "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
              "--checkpoint.interval", "3", "--checkpoint.export_model_only", "false"]
    straight = torchrun(1, tmp_path / "straight", *common, "--training.steps", "5")
    interleaved = [*PP2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                   "--parallelism.pipeline_parallel_stages_per_rank", "2"]
    torchrun(1, tmp_path / "to_pp", *common, "--training.steps", "3")
    to_pp = torchrun(2, tmp_path / "to_pp", *common, "--training.steps", "5", *interleaved)
    torchrun(2, tmp_path / "from_pp", *common, "--training.steps", "3", *PP2)
    from_pp = torchrun(1, tmp_path / "from_pp", *common, "--training.steps", "5")
    assert sorted(to_pp) == sorted(from_pp) == [4, 5]
    rel = max(abs(run[s] - straight[s]) / abs(straight[s]) for run in (to_pp, from_pp) for s in (4, 5))
    print(f"resume across PP / no PP, max relative loss difference at steps 4-5: {rel:.2e}")
    assert rel < 1e-5, (to_pp, from_pp, straight)


def pipeline(**kwargs) -> Parallelism:
    return Parallelism(pipeline_parallel_degree=2, **kwargs)


LLAVA_UNTIED = get_model_spec("llava").flavors["debug-untied"].decoder  # 4 decoder layers


@pytest.mark.parametrize("parallelism,batch,decoder,message", [
    (pipeline(), 2, get_model_spec("llava").flavors["debug"].decoder,
     "ties the output head .* choose a flavor with tie_embeddings = False"),
    (pipeline(pipeline_parallel_stages_per_rank=2), 2, LLAVA_UNTIED,
     "1F1B holds one stage per rank; set pipeline_parallel_stages_per_rank = 1"),
    (pipeline(pipeline_parallel_schedule="Interleaved1F1B"), 2, LLAVA_UNTIED,
     "Interleaved1F1B needs pipeline_parallel_stages_per_rank >= 2"),
    (pipeline(pipeline_parallel_microbatches=3), 4, LLAVA_UNTIED,
     "pipeline_parallel_microbatches = 3 does not divide training.local_batch_size = 4"),
    (pipeline(), 1, LLAVA_UNTIED, "1F1B needs at least pipeline_parallel_degree = 2 microbatches, got 1"),
    (pipeline(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_stages_per_rank=2), 3,
     LLAVA_UNTIED, "needs a multiple of pipeline_parallel_degree = 2 microbatches, got 3"),
    (pipeline(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_stages_per_rank=3), 2,
     LLAVA_UNTIED, "6 pipeline stages .* the decoder has 4 layers"),
    (pipeline(pipeline_parallel_split_points=[1, 2]), 2, LLAVA_UNTIED, "must list 1 layer indices for 2 stages"),
    (pipeline(pipeline_parallel_split_points=[4]), 2, LLAVA_UNTIED, "must increase strictly within 1..3"),
], ids=["tied", "1f1b-2-per-rank", "interleaved-1-per-rank", "microbatches-not-dividing", "too-few-for-1f1b",
        "interleaved-not-multiple", "more-stages-than-layers", "split-points-count", "split-points-range"])
def test_impossible_pipeline_settings_fail_naming_the_fix(parallelism, batch, decoder, message):
    with pytest.raises(ParallelismError, match=message):
        check_pipeline(parallelism, batch, decoder, first_stage_layers=1)


def test_deepstack_layers_must_stay_on_the_first_stage():
    """Qwen3-VL debug adds DeepStack features after decoder layers 0-2: an even split (0-1 | 2-3) is
    refused naming the split points that work; [3] is accepted."""
    spec = get_model_spec("qwen3_vl")
    args = spec.flavors["debug-untied"]
    need = spec.pipeline_first_stage_layers(args)
    assert need == 3
    with pytest.raises(ParallelismError, match="set pipeline_parallel_split_points to start at >= 3"):
        check_pipeline(pipeline(), 2, args.decoder, need)
    assert check_pipeline(pipeline(pipeline_parallel_split_points=[3]), 2, args.decoder, need) == [
        range(0, 3), range(3, 4)]


def test_even_split_gives_later_stages_the_extra_layers():
    assert stage_layers(7, 3, []) == [range(0, 2), range(2, 4), range(4, 7)]
    assert stage_layers(4, 4, []) == [range(i, i + 1) for i in range(4)]


def test_image_token_index_counts_from_each_microbatch():
    """4 rows of 6 merged slots each, 2 microbatches: rows 2-3 count from slot 12; -1 stays."""
    index = torch.tensor([[0, 5, -1], [6, -1, 11], [12, 13, -1], [18, 23, -1]])
    expected = torch.tensor([[0, 5, -1], [6, -1, 11], [0, 1, -1], [6, 11, -1]])
    assert torch.equal(microbatch_image_token_index(index, 2, 6), expected)


def test_hf_load_and_export_are_refused_under_pipeline_parallelism(tmp_path):
    """HF folders need the whole model on a rank: refused before anything is built, naming the converters."""
    cfg = make_config(tmp_path, *LLAVA, *PP2, "--checkpoint.export_hf_path", str(tmp_path / "hf"))
    spec = get_model_spec("llava")
    with pytest.raises(ConfigError, match="convert with scripts/convert_hf_to_dcp.py"):
        train.check_pipeline_job(cfg, spec, spec.flavors["debug-untied"])
