"""LoRA (titan_mm/models/lora.py): adapters start as the base model, train under FSDP and TP like
one process, checkpoint alone, and export to HF merged or as a PEFT folder that transformers + PEFT
load with the same logits (tiny random-init HF models)."""

import json

import pytest
import torch

import test_llava_hf as llava
import test_qwen3_vl as qwen
from conftest import make_config, train_losses, train_without_recompiles
from test_parallel import SMALL, assert_layout_matches_single_process, seed_checkpoint
from test_qwen3_vl import media_root, tok  # noqa: F401 (fixtures)
from titan_mm.config import ConfigError, Lora
from titan_mm.hf.io import load_hf_weights, save_hf_weights
from titan_mm.hf.peft import save_peft_adapter
from titan_mm.models.lora import LoRALinear, apply_lora, init_adapters, is_adapter_key, trained_under_lora

transformers = pytest.importorskip("transformers")

# a large alpha / rank and no warmup, so that the adapters move the loss well beyond 1e-5 in 5 steps;
# lr 0.003, since at 0.01 step 4's gradient norm spikes to 90 and amplifies rounding to 5e-5
LORA = ["--lora.enabled", "true", "--lora.rank", "4", "--lora.alpha", "32", "--optimizer.lr", "0.003",
        "--lr_scheduler.warmup_steps", "0",
        "--lora.target_modules", "decoder.layers.*.attention.w[qkvo],decoder.layers.*.feed_forward.w[123],"
                                 "vision.layers.*.self_attn.*,vision.layers.*.mlp.fc[12],projector.linear_1"]


# the same adapters less the projector's, which trains in full with lora.modules_to_save = ["projector"]
WITH_PROJECTOR = ["--lora.target_modules", "decoder.layers.*.attention.w[qkvo],decoder.layers.*.feed_forward.w[123],"
                                           "vision.layers.*.self_attn.*,vision.layers.*.mlp.fc[12]",
                  "--lora.modules_to_save", "projector"]


def lora_config(*targets: str, rank: int = 4, alpha: float = 8.0, modules_to_save: list[str] = ()) -> Lora:
    return Lora(enabled=True, rank=rank, alpha=alpha, target_modules=list(targets),
                modules_to_save=list(modules_to_save))


@pytest.mark.parametrize("nproc,dp_world,layout", [
    (2, 2, ["--parallelism.data_parallel_shard_degree", "2"]),
    (2, 1, ["--parallelism.tensor_parallel_degree", "2"]),
    (4, 2, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]),
], ids=["fsdp2", "tp2", "fsdp2xtp2"])
def test_lora_layout_matches_single_process(tmp_path, nproc, dp_world, layout):
    """Adapters on decoder (colwise and rowwise layers), ViT and projector (replicated under TP):
    5 steps' losses within 1e-5 relative of one process."""
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, LORA, layout)


def test_compiled_lora_trains_like_eager_lora(tmp_path):
    """compile.enable with adapters in the compiled blocks: the same losses as eager over 4 steps
    (within 1e-5 relative; 2e-7 measured, inductor fuses the fp32 arithmetic differently), no
    recompile after the first step, and the base weights stay untouched."""
    import train
    common = [*SMALL, *LORA, "--training.steps", "4", "--metrics.log_freq", "100"]
    eager = train_losses(make_config(tmp_path / "eager", *common))
    trainer = train.Trainer(make_config(tmp_path / "compiled", *common, "--compile.enable", "true"))
    base = {k: v.clone() for k, v in trainer.model.state_dict().items() if not is_adapter_key(k)}
    compiled = train_without_recompiles(trainer, 4)
    print("eager", eager, "compiled", compiled)
    assert max(abs(a - b) / abs(b) for a, b in zip(compiled, eager)) < 1e-5, (compiled, eager)
    assert abs(eager[-1] - eager[0]) / eager[0] > 1e-2  # the adapters move the loss
    assert all(torch.equal(v, base[k]) for k, v in trainer.model.state_dict().items() if not is_adapter_key(k))


@pytest.mark.parametrize("saved", [[], ["projector"]], ids=["adapters", "adapters_and_projector"])
def test_lora_trains_only_the_adapters_and_adapters_only_checkpoints_resume(tmp_path, saved):
    """4 steps straight vs 2 + resume from an adapters-only checkpoint (base weights from the seed
    folder): identical losses; the checkpoint holds no base weight; frozen weights never change.
    With lora.modules_to_save = ["projector"] the projector trains in full (its weights move, the
    optimizer holds their state) and the checkpoint holds it beside the adapters."""
    seed = seed_checkpoint(tmp_path)  # base weights only: the adapters take their init from the job seed
    trained = trained_under_lora(saved)
    common = [*SMALL, *LORA, *(WITH_PROJECTOR if saved else []), "--checkpoint.enable", "true",
              "--checkpoint.initial_load_path", seed,
              "--lora.save_adapters_only", "true", "--checkpoint.export_model_only", "false",
              "--checkpoint.async_save", "false", "--training.steps", "4",
              "--lr_scheduler.warmup_steps", "20"]  # steps 1-4 warm up: the same lr whatever training.steps
    straight = train_losses(make_config(tmp_path / "straight", *common, "--checkpoint.interval", "100"))
    first = make_config(tmp_path / "resumed", *common, "--training.steps", "2")
    import train
    trainer = train.Trainer(first)
    base_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if not is_adapter_key(k)}
    trainer.train()
    changed = sorted(k for k, v in trainer.model.state_dict().items()
                     if not is_adapter_key(k) and not torch.equal(v, base_before[k]))
    import torch.distributed.checkpoint as dcp
    stored = dcp.FileSystemReader(str(tmp_path / "resumed" / "run" / "checkpoint" / "step-2")).read_metadata()
    model_keys = [k.removeprefix("model.") for k in stored.state_dict_metadata if k.startswith("model.")]
    moments = [k for k in stored.state_dict_metadata if k.startswith("optimizer.state.") and k.endswith(".exp_avg")]
    resumed = train_losses(make_config(tmp_path / "resumed", *common))
    # every weight of modules_to_save moves, no other base weight does
    assert changed == [k for k in sorted(base_before) if trained(k)], changed
    assert sorted(model_keys) == sorted(k for k in trainer.model.state_dict() if trained(k)), model_keys
    assert sorted(k.removeprefix("optimizer.state.").removesuffix(".exp_avg") for k in moments) == sorted(model_keys)
    assert any(not is_adapter_key(k) for k in model_keys) == bool(saved)
    assert trainer.losses[0].item() == straight[0]
    assert resumed == straight[2:], (resumed, straight)


def test_lora_config_errors_name_the_fix():
    from titan_mm.models.llava.model import LlavaModel
    from titan_mm.models.llava import FLAVORS
    with torch.device("meta"):
        model = LlavaModel(FLAVORS["debug"])
    with pytest.raises(ConfigError, match="matches no Linear layer"):
        apply_lora(model, lora_config("decoder.layers.*.attention.q_proj"))
    with pytest.raises(ConfigError, match="modules_to_save pattern 'connector' matches no module"):
        apply_lora(model, lora_config("decoder.layers.*.attention.wq", modules_to_save=["connector"]))
    with pytest.raises(ConfigError, match=r"'projector', which holds the LoRA targets \['projector.linear_1'\]"):
        apply_lora(model, lora_config("decoder.layers.*.attention.wq", "projector.linear_1",
                                      modules_to_save=["projector"]))
    from titan_mm.models.llama import FLAVORS as TEXT_FLAVORS
    from titan_mm.models.llama.model import TextModel
    with torch.device("meta"):
        untied = TextModel(TEXT_FLAVORS["debug-llama3"])
    with pytest.raises(ConfigError, match="never run"):
        apply_lora(untied, lora_config("decoder.*"))


def test_modules_to_save_train_in_full_with_weight_decay_on_their_matrices():
    """lora.modules_to_save = ["projector"]: every projector parameter trains beside the adapters,
    its Linear weights weight-decayed, its LayerNorm and biases not, none a Muon block matrix;
    training.freeze, applied after LoRA, still freezes it."""
    from titan_mm.models import get_model_spec
    from titan_mm.models.llava import FLAVORS
    from titan_mm.models.llava.model import LlavaModel
    from titan_mm.train.param_groups import describe_parameters, freeze_module_groups
    policy = get_model_spec("llava").param_policy
    with torch.device("meta"):
        model = LlavaModel(FLAVORS["debug"])
    _, saved = apply_lora(model, lora_config("decoder.layers.*.attention.wq", modules_to_save=["proj*"]))
    infos = [i for i in describe_parameters(model, policy) if not is_adapter_key(i.name)]
    assert saved == ["projector"]  # the outermost match only
    assert {i.name: i.decays for i in infos} == {
        "projector.norm.weight": False, "projector.norm.bias": False, "projector.linear_1.weight": True,
        "projector.linear_1.bias": False, "projector.linear_2.weight": True, "projector.linear_2.bias": False}
    assert not any(i.block_matrix for i in infos)
    freeze_module_groups(model, ["projector"], policy)
    assert all(is_adapter_key(i.name) for i in describe_parameters(model, policy))


# --- export: merged HF weights and PEFT folders against transformers + PEFT ------------------------
# In fp64 (models, exports and inputs): the tiny Qwen3-VL's fp32 round-off alone moves its logits
# (up to 17) by 3e-5, merged or not, ours or HF's; a wrong merge or name mapping moves them by O(1).

def with_random_adapters(model: torch.nn.Module, *targets: str, rank: int = 4, alpha: float = 8.0,
                         modules_to_save: list[str] = ()):
    """LoRA on ``targets`` of a CPU model, B random (at init B = 0 and any export would pass); the
    parameters of ``modules_to_save`` moved by random steps as if trained."""
    apply_lora(model, lora_config(*targets, rank=rank, alpha=alpha, modules_to_save=modules_to_save))
    torch.manual_seed(1)
    init_adapters(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0.0, 0.3)
        for name in modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
    return model.eval()


def export_both(ours, adapter, args, folder, modules_to_save: list[str] = ()):
    """Merged HF weights to folder/merged, the PEFT folder to folder/peft (fp64, see below)."""
    save_hf_weights(ours, adapter, args, str(folder / "merged"), dtype=torch.float64)
    save_peft_adapter(ours, adapter, str(folder / "peft"), list(modules_to_save))


def peft_model(hf_cls, folder, hf_base):
    """transformers' model of the merged export, and the HF base model with the PEFT folder."""
    peft = pytest.importorskip("peft")
    merged = hf_cls.from_pretrained(folder / "merged", attn_implementation="sdpa", dtype=torch.float64).eval()
    with_adapters = peft.PeftModel.from_pretrained(hf_base.double(), str(folder / "peft")).eval()
    return merged, with_adapters


def as_fp64(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


LLAVA_TARGETS = ("decoder.layers.*.attention.w[qkvo]", "decoder.layers.*.feed_forward.w[123]",
                 "vision.layers.*.self_attn.*", "vision.layers.*.mlp.fc1", "projector.linear_1")


@pytest.mark.parametrize("targets,saved,checkpointed", [
    (LLAVA_TARGETS, [], False), (LLAVA_TARGETS[:-1], ["projector"], False), (LLAVA_TARGETS, [], True)],
    ids=["adapters", "adapters_and_projector", "activation_checkpointed_blocks"])
def test_llava_lora_exports_merged_and_peft_with_equal_logits(tmp_path, targets, saved, checkpointed):
    """LLaVA (SigLIP2 + Qwen3): our unmerged LoRA model == our model from the merged export (<= 1e-5);
    HF base + the PEFT folder == transformers' model of the merged export (<= 1e-5) == ours (<= 1e-5;
    fp64). With lora.modules_to_save = ["projector"] (its weights moved) the merged export holds our
    projector exactly and the PEFT folder holds it as PEFT's modules_to_save. With the blocks
    wrapped by activation checkpointing (as a training run exports them) the names are the same."""
    from titan_mm.config import ActivationCheckpoint
    from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing
    hf = llava.hf_llava("qwen3")
    ours = with_random_adapters(llava.ours_from_hf(hf), *targets, modules_to_save=saved).double()
    if checkpointed:
        for blocks in (ours.decoder.layers, ours.vision.layers):
            apply_activation_checkpointing(blocks, ActivationCheckpoint(mode="full"))
    args = llava.ADAPTER.args_from_hf_config(hf.config.to_dict())
    export_both(ours, llava.ADAPTER, args, tmp_path, saved)
    plain = llava.LlavaModel(args).double()
    load_hf_weights(plain, llava.ADAPTER, str(tmp_path / "merged"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == (["model.multi_modal_projector"] if saved else None)
    if saved:
        assert all(torch.equal(v, ours.state_dict()[f"projector.{k}"]) for k, v in plain.projector.state_dict().items())
    our_inputs, hf_inputs = (as_fp64(x) for x in llava.build_inputs(llava.CASES["three_images"]))
    merged, with_peft = peft_model(transformers.LlavaForConditionalGeneration, tmp_path, hf)
    with torch.no_grad():
        logits = ours.decoder.logits(ours(**our_inputs))
        merged_diff = (plain.eval().decoder.logits(plain(**our_inputs)) - logits).abs().max().item()
        peft_logits = with_peft(**hf_inputs).logits
        peft_diff = (peft_logits - merged(**hf_inputs).logits).abs().max().item()
        ours_diff = (peft_logits - logits).abs().max().item()
        with with_peft.disable_adapter():
            base_diff = (with_peft(**hf_inputs).logits - peft_logits).abs().max().item()
    print(f"llava: merged {merged_diff:.2e}, peft vs merged HF {peft_diff:.2e}, peft vs ours {ours_diff:.2e}, "
          f"adapters move logits by {base_diff:.2e}")
    assert merged_diff <= 1e-5 and peft_diff <= 1e-5 and ours_diff <= 1e-5
    assert base_diff > 1e-2  # the adapters were loaded (and change the output)


QWEN3_VL_TARGETS = ("decoder.layers.*.attention.w[qkvo]", "decoder.layers.*.feed_forward.w[123]",
                    "vision.layers.*.attn.[qkv]_proj", "vision.layers.*.attn.proj", "vision.merger.linear_fc1")


def test_qwen3_vl_lora_exports_fused_vit_qkv_as_one_adapter(tmp_path, tok, media_root):
    """Qwen3-VL, whose HF ViT fuses q, k and v: their three rank-4 adapters are written as one rank-12
    adapter on qkv (block-diagonal B). Same three comparisons as for LLaVA, on one packed row with
    an image and a video."""
    hf = qwen.hf_reference()
    ours = with_random_adapters(qwen.ours_from_hf(hf), *QWEN3_VL_TARGETS).double()
    export_both(ours, qwen.ADAPTER, qwen.TINY, tmp_path)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"model\.visual\.blocks\.0\.attn\.qkv": 12,
                                      r"model\.visual\.blocks\.1\.attn\.qkv": 12,
                                      r"model\.visual\.blocks\.2\.attn\.qkv": 12}
    plain = qwen.Qwen3VLModel(qwen.TINY).double()
    load_hf_weights(plain, qwen.ADAPTER, str(tmp_path / "merged"))
    content = [qwen.image("tall"), qwen.text("x "), qwen.VIDEO, qwen.text("y.")]
    doc = qwen.builder(tok).interleaved("lora", content, str(media_root))
    batch = qwen.ours_batch([doc])
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw",
                                    "image_token_index")}
    merged, with_peft = peft_model(transformers.Qwen3VLForConditionalGeneration, tmp_path, hf)
    inputs, hf_inputs = (as_fp64(x) for x in (inputs, qwen.hf_inputs(doc)))
    n = len(doc.tokens)
    with torch.no_grad():
        logits = ours.decoder.logits(ours(**inputs))[0, :n]
        merged_diff = (plain.eval().decoder.logits(plain(**inputs))[0, :n] - logits).abs().max().item()
        peft_logits = with_peft(**hf_inputs).logits[0]
        peft_diff = (peft_logits - merged(**hf_inputs).logits[0]).abs().max().item()
        ours_diff = (peft_logits - logits).abs().max().item()
    print(f"qwen3_vl: merged {merged_diff:.2e}, peft vs merged HF {peft_diff:.2e}, peft vs ours {ours_diff:.2e}, "
          f"max |logit| {logits.abs().max():.1f}")
    assert merged_diff <= 1e-5 and peft_diff <= 1e-5 and ours_diff <= qwen.TOL


def test_peft_export_refuses_adapters_on_part_of_a_fused_layer(tmp_path):
    with torch.device("meta"):
        model = qwen.Qwen3VLModel(qwen.TINY)
    model.to_empty(device="cpu")
    with_random_adapters(model, "vision.layers.*.attn.q_proj")
    with pytest.raises(ValueError, match="adapters on all of its parts or none"):
        save_peft_adapter(model, qwen.ADAPTER, str(tmp_path / "peft"))

