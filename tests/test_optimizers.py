"""Optimizers (docs/optimizers.md): parameter groups by module type, Muon's orthogonalisation, Muon
under FSDP2 / TP against one process, Muon's state through a checkpoint, freezing and per-module
learning rates."""

import pytest
import torch
from torch import nn

from conftest import train_losses
from test_parallel import FSDP2_TP2, TP2, assert_layout_matches_single_process
from titan_mm.config import ConfigError, Optimizer
from titan_mm.models import get_model_spec
from titan_mm.objectives.base import normalise_targets
from titan_mm.train.muon import orthogonalise, update_scale
from titan_mm.train.optimizer import build_optimizer
from titan_mm.train.param_groups import describe_parameters

MUON_FP32 = ["--optimizer.name", "muon", "--optimizer.muon_ns_dtype", "fp32"]


def meta_model(family: str):
    spec = get_model_spec(family)
    with torch.device("meta"):
        return spec.model_cls(spec.flavors["debug"]), spec.param_policy


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl", "llama", "cambrian"])
def test_weight_decay_follows_module_type_not_names(family):
    """Decayed: the weights of Linear layers and of the Conv3d-shaped patch embeddings. Not decayed:
    norms, biases, token embeddings and position tables (Qwen3-VL's is an nn.Embedding named
    vision.pos_embed.weight, which the old name rule decayed). Muon takes the 2-D block matrices."""
    model, policy = meta_model(family)
    infos = {i.name: i for i in describe_parameters(model, policy)}
    decayed = {n for n, i in infos.items() if i.decays}
    modules = dict(model.named_modules())
    linear_weights = {f"{m}.weight" for m, mod in modules.items() if isinstance(mod, nn.Linear)}
    patch_embeds = {n for n in infos if n.endswith("patch_embed.weight")}
    assert decayed == linear_weights | patch_embeds
    for name in ("vision.pos_embed.weight", "vision.pos_embed", "decoder.tok_embeddings.weight"):
        assert name not in decayed
    assert not any(n.endswith(("bias", "norm.weight", "norm1.weight", "norm2.weight")) for n in decayed)
    muon = {n for n, i in infos.items() if i.block_matrix}
    assert muon == {n for n in linear_weights if ".layers." in n and infos[n].group in ("vision", "decoder")}
    assert {i.group for i in infos.values()} == set(policy.module_groups)


def test_qwen3_vl_projector_group_holds_the_mergers():
    model, policy = meta_model("qwen3_vl")
    groups = {i.name: i.group for i in describe_parameters(model, policy)}
    assert groups["vision.merger.linear_fc1.weight"] == "projector"
    assert groups["vision.deepstack_mergers.0.norm.weight"] == "projector"
    assert groups["vision.pos_embed.weight"] == "vision"
    assert groups["decoder.layers.0.attention.wq.weight"] == "decoder"


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)])
def test_newton_schulz_brings_singular_values_near_one(shape):
    """5 quintic steps in bf16: every singular value of a random Gaussian matrix ends in [0.5, 1.3]
    (the iteration's fixed band is about [0.7, 1.2]; bf16 widens it), and the update is scaled to
    RMS 0.2 * sqrt(max(m, n)) / sqrt(min(m, n)) ... i.e. 0.2 for a square matrix."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalise(g, steps=5, dtype=torch.bfloat16).float()
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape
    assert s.min() > 0.5 and s.max() < 1.3, s
    if shape[0] == shape[1]:
        rms = (o * update_scale(o.shape)).pow(2).mean().sqrt()
        assert 0.15 < rms < 0.25, rms


@pytest.mark.parametrize("shape", [(3, 48, 80), (4, 80, 48)])
def test_newton_schulz_of_a_stack_is_that_of_each_matrix(shape):
    """Muon orthogonalises same-shape matrices as one stack: each result is its own matrix's
    (each normalised by its own norm, the tall ones transposed), fp32."""
    scales = torch.tensor([1.0, 10.0, 0.1, 3.0])[:shape[0], None, None]
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * scales
    stacked = orthogonalise(g, steps=5, dtype=torch.float32)
    for k in range(shape[0]):
        torch.testing.assert_close(stacked[k], orthogonalise(g[k], steps=5, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_muon_step_in_stacks_equals_matrix_by_matrix(monkeypatch):
    """The stacked step (many same-shape matrices together) and one matrix at a time
    (STACK_ELEMENTS = 1) give the same parameters and momentum after two steps (fp32)."""
    import titan_mm.train.muon as muon
    results = []
    for stack_elements in (muon.STACK_ELEMENTS, 1):
        monkeypatch.setattr(muon, "STACK_ELEMENTS", stack_elements)
        model, policy = meta_model("llama")
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        opt = build_optimizer(Optimizer(name="muon", muon_ns_dtype="fp32"), model, torch.device("cpu"), policy=policy)
        for step in range(2):
            for k, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + k))
            opt.step()
        results.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                        [s.get("momentum_buffer") for s in opt.state.values()]))
    (stacked, stacked_state), (single, single_state) = results
    for n in stacked:
        torch.testing.assert_close(stacked[n], single[n], rtol=1e-5, atol=1e-7, msg=n)
    assert sum(b is not None for b in stacked_state) > 2
    for a, b in zip(stacked_state, single_state):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_optimizer_state_has_no_entry_for_frozen_parameters_and_lr_multipliers_apply():
    model, policy = meta_model("llava")
    model.to_empty(device="cpu")
    for p in model.vision.parameters():
        p.requires_grad_(False)
    cfg = Optimizer(name="muon", lr=1e-3, lr_multipliers={"projector": 10.0})
    opt = build_optimizer(cfg, model, torch.device("cpu"), policy=policy)
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.vision.parameters())
    for g in opt.param_groups:
        expected = 1e-2 if any(p is q for p in g["params"] for q in model.projector.parameters()) else 1e-3
        assert g["lr"] == pytest.approx(expected)


def test_unknown_module_group_is_a_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match=r"training.freeze names \['encoder'\].*\['decoder', 'projector', 'vision'\]"):
        train_losses(tiny_cfg("--training.freeze", "encoder"))


def training_state_bytes(model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """Bytes this process holds for parameters, gradients and optimizer state."""
    params = [p for part in model_parts for p in part.parameters()]
    state = [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"parameters": sum(p.nbytes for p in params),
            "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
            "optimizer_state": sum(v.nbytes for v in state)}


def test_frozen_modules_keep_their_weights_and_take_no_memory(tiny_cfg):
    """Frozen vision + projector: after 3 steps their weights are bit-identical, they have no
    gradients and no optimizer state; the bytes of parameters + gradients + optimizer state shrink
    by 12 bytes per frozen parameter (fp32 gradient and two AdamW moments)."""
    import train

    def trained(*overrides):
        trainer = train.Trainer(tiny_cfg("--training.steps", "3", "--checkpoint.enable", "false", *overrides))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        # gradients of one more microbatch, as they are at the optimizer step
        mb = trainer.prepare_batch(next(iter(trainer.dataloader)))
        trainer.forward_backward(mb, normalise_targets(mb["targets"], mb["loss_tokens"].sum().float()))
        return trainer, before, training_state_bytes(trainer.model_parts, trainer.optimizers)

    full, _, full_bytes = trained()
    frozen, before, frozen_bytes = trained("--training.freeze", "vision,projector")
    for name, p in frozen.model.named_parameters():
        if name.startswith(("vision.", "projector.")):
            assert torch.equal(p, before[name]) and p.grad is None and p not in frozen.optimizers[0].state, name
        else:
            assert not torch.equal(p, before[name]) and p.grad is not None, name
    n_frozen = sum(p.numel() for n, p in frozen.model.named_parameters() if n.startswith(("vision.", "projector.")))
    assert frozen_bytes["parameters"] == full_bytes["parameters"]
    assert full_bytes["gradients"] - frozen_bytes["gradients"] == 4 * n_frozen
    assert full_bytes["optimizer_state"] - frozen_bytes["optimizer_state"] == 8 * n_frozen + 4 * sum(
        1 for n, _ in frozen.model.named_parameters() if n.startswith(("vision.", "projector.")))
    print({"full": full_bytes, "frozen vision+projector": frozen_bytes, "frozen parameters": n_frozen})


def test_muon_resume_gives_identical_losses(tiny_cfg):
    """Muon's state (momentum buffers, the AdamW moments of the rest) goes through a checkpoint:
    4 steps with a save at 2, then a resume from step 2 gives steps 3-4 bitwise."""
    first = train_losses(tiny_cfg(*MUON_FP32, "--training.steps", "4", "--checkpoint.interval", "2"))
    resumed = train_losses(tiny_cfg(*MUON_FP32, "--training.steps", "4", "--checkpoint.interval", "2",
                                    "--checkpoint.load_step", "2"))
    assert resumed == first[2:], list(zip(resumed, first[2:]))


def test_muon_flagged_step_changes_nothing():
    """A non-finite step (found_inf = 1, train/nonfinite.py) leaves parameters, momentum buffers
    and AdamW moments bit-identical, NaN gradients and all."""
    model, policy = meta_model("llama")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    opt = build_optimizer(Optimizer(name="muon", muon_ns_dtype="fp32"), model, torch.device("cpu"), policy=policy)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    before = ({n: p.clone() for n, p in model.named_parameters()},
              [{k: v.clone() for k, v in s.items()} for s in opt.state.values()])
    opt.found_inf = torch.ones(())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert all(torch.equal(p, before[0][n]) for n, p in model.named_parameters())
    assert all(torch.equal(v, s0[k]) for s, s0 in zip(opt.state.values(), before[1]) for k, v in s.items())
    assert any(g["use_muon"] for g in opt.param_groups) and any(not g["use_muon"] for g in opt.param_groups)


@pytest.mark.parametrize("nproc,dp_world,layout", [
    (2, 2, ["--parallelism.data_parallel_shard_degree", "2"]),
    (2, 1, TP2),
    (4, 2, FSDP2_TP2),
], ids=["fsdp2", "tp2", "fsdp2xtp2"])
def test_muon_layout_matches_single_process(tmp_path, nproc, dp_world, layout):
    """Muon orthogonalises whole matrices under FSDP(2), TP(2) and FSDP(2) x TP(2) (the
    _StridedShard layout): 5 steps' losses within 1e-5 relative of one process (fp32 Newton-Schulz)."""
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, MUON_FP32, layout)


def test_frozen_vision_and_lr_multipliers_under_fsdp_x_tp_match_single_process(tmp_path):
    """A frozen ViT (FSDP shards it without gradients; its TP-replicated norms stay frozen) and a
    10x projector learning rate under FSDP(2) x TP(2): 5 steps' losses within 1e-5 relative of one
    process."""
    assert_layout_matches_single_process(
        tmp_path, 4, 2, ["--training.freeze", "vision", "--optimizer.lr_multipliers", "projector=10"], FSDP2_TP2)


def test_lr_multipliers_parse_from_toml_and_command_line(tmp_path):
    from titan_mm.config import load_toml, parse_args, to_toml, JobConfig
    cfg, _ = parse_args(["--optimizer.lr_multipliers", "vision=0.1,projector=2", "--training.freeze", "decoder"])
    assert cfg.optimizer.lr_multipliers == {"vision": 0.1, "projector": 2.0}
    assert cfg.training.freeze == ["decoder"]
    (tmp_path / "merged.toml").write_text(to_toml(cfg))  # {vision = 0.1, projector = 2.0}
    again = JobConfig()
    load_toml(again, str(tmp_path / "merged.toml"))
    assert again == cfg
    with pytest.raises(ConfigError, match="optimizer.lr_multipliers expects name=value pairs"):
        parse_args(["--optimizer.lr_multipliers", "vision"])
    with pytest.raises(ConfigError, match=r"optimizer.lr_multipliers = \{'vision': -1.0\} must be > 0"):
        parse_args(["--optimizer.lr_multipliers", "vision=-1"])


def test_staged_recipe_configs_chain():
    """Stage 1 trains the projector alone and exports its last weights where stage 2 starts from;
    stage 2 trains every module, the vision encoder at a lower learning rate."""
    from titan_mm.config import parse_args
    stage1, _ = parse_args(["--job.config_file", "train_configs/qwen3_vl_2b_stage1_align.toml"])
    stage2, _ = parse_args(["--job.config_file", "train_configs/qwen3_vl_2b_stage2_finetune.toml"])
    assert sorted(stage1.training.freeze) == ["decoder", "vision"] and stage1.checkpoint.export_model_only
    assert stage2.checkpoint.initial_load_path == (
        f"{stage1.job.dump_folder}/{stage1.checkpoint.folder}/model-step-{stage1.training.steps}")
    assert stage2.training.freeze == [] and stage2.optimizer.lr_multipliers["vision"] < 1


def test_lora_adapters_take_adamw_with_weight_decay():
    """With LoRA only the adapter factors train: weight-decayed as matrices (as HF Trainer does),
    with AdamW under either optimizer (a rank-r factor is not a block's weight matrix)."""
    from titan_mm.config import Lora
    from titan_mm.models.lora import apply_lora
    model, policy = meta_model("llava")
    apply_lora(model, Lora(enabled=True))
    infos = describe_parameters(model, policy)
    assert infos and all(".lora_" in i.name for i in infos)
    assert all(i.decays and not i.block_matrix for i in infos)
