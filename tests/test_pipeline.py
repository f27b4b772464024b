"""Pipeline parallelism: impossible settings fail up front naming the fix; PP layouts, alone and with
FSDP, TP, CP or Ulysses, match one process (gloo, fp32); checkpoints move between PP and no PP."""

import os
import re
import subprocess
import sys

import pytest
import torch

import train
from conftest import make_config
from test_parallel import SMALL, assert_layout_matches_single_process, seed_checkpoint, torchrun
from titan_mm.config import ConfigError, Parallelism
from titan_mm.models import get_model_spec
from titan_mm.parallel.parallel_dims import ParallelismError
from titan_mm.parallel.pipeline import check_pipeline, microbatch_image_token_index, stage_layers
from titan_mm.parallel.sequence import SequenceParallel

# tied embeddings cannot be split over stages; two rows per local batch give two microbatches
LLAVA = ["--model.flavor", "debug-untied", "--training.local_batch_size", "2"]
QWEN2_5_VL = ["--job.config_file", "train_configs/qwen2_5_vl_debug.toml", *LLAVA]
QWEN3_VL = ["--job.config_file", "train_configs/qwen3_vl_debug.toml", *LLAVA]
PP2 = ["--parallelism.pipeline_parallel_degree", "2"]
# DeepStack adds vision features after decoder layers 0-2: they stay on the first stage
QWEN3_VL_PP2 = [*PP2, "--parallelism.pipeline_parallel_split_points", "3"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
ULYSSES2 = ["--parallelism.ulysses_degree", "2"]
FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
INTERLEAVED = ["--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
               "--parallelism.pipeline_parallel_stages_per_rank", "2"]


@pytest.mark.parametrize("nproc,dp_world,model,layout", [
    (2, 1, LLAVA, PP2),
    # two accumulated batches: the schedule runs twice before the optimizer steps
    (2, 1, [*LLAVA, "--training.gradient_accumulation_steps", "2"],
     [*PP2, "--parallelism.pipeline_parallel_schedule", "GPipe"]),
    (2, 1, LLAVA, [*PP2, *INTERLEAVED]),
    (2, 1, QWEN2_5_VL, PP2),
    (2, 1, QWEN3_VL, QWEN3_VL_PP2),
    (4, 2, LLAVA, [*PP2, *FSDP2]),
    (4, 1, LLAVA, [*PP2, *TP2]),
], ids=["llava-pp2-1f1b", "llava-pp2-gpipe-accumulate2", "llava-pp2-interleaved", "qwen2_5_vl-pp2", "qwen3_vl-pp2",
        "llava-pp2xfsdp2", "llava-tp2xpp2"])
def test_pipeline_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout):
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout)


# each 4-process run takes about 20 s on 2 CPU cores, each 8-process run about 40 s; the slow ones
# (pytest -m slow) take paths that the unmarked ones cover for another family or degree
@pytest.mark.parametrize("nproc,dp_world,model,layout", [
    (4, 1, LLAVA, [*PP2, *CP2]),
    (4, 1, QWEN2_5_VL, [*PP2, *ULYSSES2]),
    (4, 1, QWEN3_VL, [*QWEN3_VL_PP2, *CP2]),
    (8, 2, QWEN3_VL, [*FSDP2, *QWEN3_VL_PP2, *CP2]),
    pytest.param(4, 1, LLAVA, [*PP2, *ULYSSES2], marks=pytest.mark.slow),
    pytest.param(4, 1, QWEN2_5_VL, [*PP2, *CP2], marks=pytest.mark.slow),
    pytest.param(4, 1, QWEN3_VL, [*QWEN3_VL_PP2, *ULYSSES2], marks=pytest.mark.slow),
    # two stages per rank, two accumulated batches: the schedule runs twice before the optimizer steps
    pytest.param(4, 1, [*LLAVA, "--training.gradient_accumulation_steps", "2"], [*PP2, *INTERLEAVED, *CP2],
                 marks=pytest.mark.slow),
    pytest.param(8, 1, QWEN3_VL, [*QWEN3_VL_PP2, *CP2, *TP2], marks=pytest.mark.slow),
    pytest.param(8, 2, QWEN2_5_VL, [*FSDP2, *PP2, *ULYSSES2], marks=pytest.mark.slow),
    # 2 KV heads / tp 2 = 1 KV head per rank for 2 Ulysses ranks: each rank gets a copy
    pytest.param(8, 1, LLAVA, [*PP2, *ULYSSES2, *TP2], marks=pytest.mark.slow),
], ids=["llava-pp2xcp2", "qwen2_5_vl-pp2xulysses2", "qwen3_vl-pp2xcp2", "qwen3_vl-fsdp2xpp2xcp2",
        "llava-pp2xulysses2", "qwen2_5_vl-pp2xcp2", "qwen3_vl-pp2xulysses2", "llava-interleaved-pp2xcp2-accumulate2",
        "qwen3_vl-pp2xcp2xtp2", "qwen2_5_vl-fsdp2xpp2xulysses2", "llava-pp2xulysses2xtp2"])
def test_pipeline_with_sequence_parallelism_matches_single_process(tmp_path, nproc, dp_world, model, layout):
    """PP x CP / Ulysses: each rank's sequence shard of the batch is cut into microbatches along the
    rows, the first stage splits each microbatch's image slots over the sequence-parallel group, and
    the last stage's loss over its shard is divided by the label tokens summed over the loss mesh."""
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout)


def test_checkpoints_move_between_pipeline_and_single_process(tmp_path):
    """Parameter and optimizer names do not depend on the layout: a checkpoint saved at step 3 by one
    process resumes under PP(2) with interleaved stages (two model parts per rank), one saved under
    PP(2) 1F1B resumes in one process, and steps 4-5 match an uninterrupted single-process run."""
    seed = seed_checkpoint(tmp_path, *LLAVA)
    common = [*LLAVA, "--checkpoint.enable", "true", "--checkpoint.initial_load_path", seed,
              "--checkpoint.interval", "3", "--checkpoint.export_model_only", "false"]
    straight = torchrun(1, tmp_path / "straight", *common, "--training.steps", "5")
    torchrun(1, tmp_path / "to_pp", *common, "--training.steps", "3")
    to_pp = torchrun(2, tmp_path / "to_pp", *common, "--training.steps", "5", *PP2, *INTERLEAVED)
    torchrun(2, tmp_path / "from_pp", *common, "--training.steps", "3", *PP2)
    from_pp = torchrun(1, tmp_path / "from_pp", *common, "--training.steps", "5")
    assert sorted(to_pp) == sorted(from_pp) == [1, 2, 3, 4, 5]  # losses.json keeps steps 1-3 of the first run
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


def test_image_token_index_rebase_commutes_with_sequence_sharding():
    """The trainer shards rows along the sequence before rebasing image_token_index per microbatch:
    each CP / Ulysses rank's shard, rebased, equals the shard of the rebased whole rows."""
    class Mesh:  # the two methods SequenceParallel reads
        def __init__(self, rank):
            self.rank = rank

        def size(self):
            return 2

        def get_local_rank(self):
            return self.rank

    index = torch.tensor([[0, 1, -1, 2, -1, 3, -1, -1], [-1, 6, 7, -1, 8, -1, 11, -1],
                          [12, -1, 13, 14, -1, 15, -1, 16], [-1, -1, 18, 19, 20, -1, 21, 23]])
    for mode in ("cp", "ulysses"):
        for rank in (0, 1):
            sp = SequenceParallel(mode, Mesh(rank))
            assert torch.equal(microbatch_image_token_index(sp.shard(index, dim=-1), 2, 6),
                               sp.shard(microbatch_image_token_index(index, 2, 6), dim=-1))


def test_pipeline_mesh_keeps_pp_outermost_and_sequence_parallel_ranks_within_a_stage():
    """FSDP(2) x PP(2) x CP(2) on 8 ranks (a fake process group): the pp dimension is outermost, so
    rank 0's pipeline peer is rank 4; its CP group (0, 1), FSDP group and loss group (0-3) lie
    inside its stage, and the data-parallel group is (0, 2)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from titan_mm.parallel.parallel_dims import ParallelDims
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=2, tp=1, pp=2, ulysses=1, world_size=8)
        mesh = dims.build_mesh("cpu")
        ranks = {name: mesh[name].mesh.tolist() for name in ("pp", "cp", "fsdp", "loss", "dp")}
        assert ranks == {"pp": [0, 4], "cp": [0, 1], "fsdp": [0, 1, 2, 3], "loss": [0, 1, 2, 3], "dp": [0, 2]}
    finally:
        dist.destroy_process_group()


def test_image_slots_must_split_over_the_sequence_parallel_ranks_per_microbatch(tmp_path):
    """PP(2) x CP(2), 2 rows of 5 image slots: the local batch's 10 slots would split over 2 ranks,
    but the first stage encodes one 5-slot microbatch at a time; every rank exits with code 2 naming
    the rule before the model is built."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "train.py",
           "--job.config_file", "train_configs/debug_vlm.toml", "--job.dump_folder", str(tmp_path / "run"),
           *SMALL, *LLAVA, *PP2, *CP2, "--data.image_slots_per_row", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    rule = ("the vision encoder splits the 5 image slots of each forward (training.local_batch_size / "
            "pipeline_parallel_microbatches rows x data.image_slots_per_row) over the 2 sequence-parallel "
            "ranks; make it a multiple of 2")
    assert rule in out.stderr, out.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2", out.stderr), out.stderr[-3000:]
    assert "INFO model" not in out.stderr


def test_hf_load_and_export_are_refused_under_pipeline_parallelism(tmp_path):
    """HF folders need the whole model on a rank: refused before anything is built, naming the converters."""
    cfg = make_config(tmp_path, *LLAVA, *PP2, "--checkpoint.export_hf_path", str(tmp_path / "hf"))
    spec = get_model_spec("llava")
    with pytest.raises(ConfigError, match="convert with scripts/convert_hf_to_dcp.py"):
        train.check_pipeline_job(cfg, spec, spec.flavors["debug-untied"])
