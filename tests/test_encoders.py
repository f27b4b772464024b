"""The fixed-size image encoders of the Cambrian family: CLIP's vision tower and DINOv2 equal
transformers' CLIPVisionModel / Dinov2Model / Dinov2WithRegistersModel (tiny random configs, fp32,
CPU, eval) at several image sizes, load HF folders and write them back bit for bit, count their
FLOPs as the PyTorch FLOP counter does, and split over tensor-parallel ranks (gloo)."""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from titan_mm.config import ActivationCheckpoint
from titan_mm.hf.io import load_hf_weights, save_hf_weights
from titan_mm.models.clip import FLAVORS as CLIP_FLAVORS
from titan_mm.models.clip.hf_adapter import CLIPVisionAdapter
from titan_mm.models.clip.model import CLIPVisionEncoder
from titan_mm.models.clip.parallelize import apply_tp_clip
from titan_mm.models.dinov2 import FLAVORS as DINOV2_FLAVORS
from titan_mm.models.dinov2.hf_adapter import Dinov2Adapter
from titan_mm.models.dinov2.model import Dinov2Args, Dinov2Encoder
from titan_mm.models.dinov2.parallelize import apply_tp_dinov2
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def randomize(model):
    """Random norms, biases, layer scales and special tokens, so that a wrong mapping cannot hide
    behind ones / zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or "lambda1" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias") or "token" in name or "class_embedding" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def hf_clip():
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8,
                                           attn_implementation="sdpa")
    torch.manual_seed(0)
    return randomize(transformers.CLIPVisionModel(config))


def hf_dinov2(variant: str):
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
                  attn_implementation="sdpa")
    torch.manual_seed(0)
    if variant == "registers":
        return randomize(transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=3, **common)))
    return randomize(transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=variant == "swiglu", **common)))


def ours_from_hf_folder(model_cls, adapter, folder):
    """Our encoder built from the folder's config.json and loaded through load_hf_weights (DCP)."""
    with open(os.path.join(folder, "config.json")) as f:
        args = adapter.args_from_hf_config(json.load(f))
    with torch.device("meta"):
        model = model_cls(args)
    model.to_empty(device="cpu")
    model.init_weights()
    load_hf_weights(model, adapter, folder)
    return model.eval()


def images(height, width, batch=2, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def compare(out, hidden_BLD, extra_tokens: int = 0):
    """max |ours - HF| over the patch grid and the class token."""
    grid_BhwD, cls_BD = out
    B, h, w, D = grid_BhwD.shape
    ref_grid = hidden_BLD[:, 1 + extra_tokens:].reshape(B, h, w, D)
    return max((grid_BhwD - ref_grid).abs().max().item(), (cls_BD - hidden_BLD[:, 0]).abs().max().item())


# (height, width) with a 4 x 4 position table of 8 x 8 patches: native, enlarged, shrunk, extreme ratios
SIZES = [(32, 32), (56, 40), (24, 24), (16, 64), (48, 48)]


@pytest.mark.parametrize("select_layer", [-1, -2, 1])
def test_clip_matches_clip_vision_model(tmp_path, select_layer):
    """Patch grid and class token of hidden_states[select_layer] equal CLIPVisionModel's at the
    native 32 x 32 and, with interpolate_pos_encoding on both sides, at 4 other sizes (enlarged,
    shrunk, 1:4): max abs diff <= 1e-4."""
    hf = hf_clip()
    hf.save_pretrained(tmp_path)
    ours = ours_from_hf_folder(CLIPVisionEncoder, CLIPVisionAdapter(select_layer, interpolate_pos_encoding=True),
                               tmp_path)
    assert len(ours.layers) == {-1: 3, -2: 2, 1: 1}[select_layer]
    for height, width in SIZES:
        x = images(height, width)
        with torch.no_grad():
            ref = hf(pixel_values=x, interpolate_pos_encoding=(height, width) != (32, 32),
                     output_hidden_states=True).hidden_states[select_layer]
            diff = compare(ours(x), ref)
        print(f"select_layer={select_layer} {height}x{width}: max abs diff {diff:.2e}")
        assert diff <= TOL


@pytest.mark.parametrize("variant", ["plain", "swiglu", "registers"])
def test_dinov2_matches_hf(tmp_path, variant):
    """Patch grid and class token equal last_hidden_state of Dinov2Model (GELU or SwiGLU MLP) or
    Dinov2WithRegistersModel (3 registers, antialiased position resize) at 5 image sizes (the
    native 32 x 32, enlarged, shrunk, 1:4), and with select_layer=-2 / 1 the final LayerNorm of
    hidden_states[-2] / [1]: max abs diff <= 1e-4."""
    hf = hf_dinov2(variant)
    hf.save_pretrained(tmp_path)
    registers = 3 if variant == "registers" else 0
    for select_layer in (-1, -2, 1):
        ours = ours_from_hf_folder(Dinov2Encoder, Dinov2Adapter(select_layer), tmp_path)
        for height, width in SIZES:
            x = images(height, width)
            with torch.no_grad():
                out = hf(pixel_values=x, output_hidden_states=True)
                ref = out.last_hidden_state if select_layer == -1 else hf.layernorm(out.hidden_states[select_layer])
                diff = compare(ours(x), ref, extra_tokens=registers)
            print(f"{variant} select_layer={select_layer} {height}x{width}: max abs diff {diff:.2e}")
            assert diff <= TOL


@pytest.mark.parametrize("encoder", ["clip", "dinov2-swiglu", "dinov2-registers"])
def test_hf_folder_round_trips_bit_exactly(tmp_path, encoder):
    """HF folder -> ours -> HF folder: every tensor written equals the one read (torch.equal), and
    the only ones left out are those titan_mm does not build (CLIP's post_layernorm, DINOv2's mask
    token). transformers loads the export and gives the original's hidden states exactly."""
    if encoder == "clip":
        hf, model_cls, adapter, left_out = hf_clip(), CLIPVisionEncoder, CLIPVisionAdapter(-1), {
            "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}
    else:
        hf, model_cls, adapter, left_out = hf_dinov2(encoder.split("-")[1]), Dinov2Encoder, Dinov2Adapter(), {
            "embeddings.mask_token"}
    hf.save_pretrained(tmp_path / "hf")
    ours = ours_from_hf_folder(model_cls, adapter, tmp_path / "hf")
    save_hf_weights(ours, adapter, ours.args, str(tmp_path / "export"))
    original = load_file(tmp_path / "hf" / "model.safetensors")
    if encoder == "clip":  # transformers 5 writes a bare CLIPVisionModel without the published prefix
        original = {"vision_model." + k: v for k, v in original.items()}
    exported = load_file(tmp_path / "export" / "model-00001-of-00001.safetensors")
    assert set(original) - set(exported) == left_out and set(exported) <= set(original)
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    reloaded = type(hf).from_pretrained(tmp_path / "export").eval()
    x = images(32, 32)
    with torch.no_grad():
        a = hf(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        b = reloaded(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(a, b)
    assert adapter.args_from_hf_config(adapter.hf_config(ours.args)) == ours.args


@pytest.mark.parametrize("encoder,args", [
    ("clip", dataclasses.replace(CLIP_FLAVORS["debug"], interpolate_pos_encoding=True)),
    ("dinov2", Dinov2Args(dim=64, n_layers=2, n_heads=4, patch_size=8, image_size=32, swiglu=True,
                          num_register_tokens=2, pos_embed_antialias=True, select_layer=-2)),
])
def test_flops_per_image_equals_the_flop_counter(encoder, args):
    """flops_per_image(H, W) x images equals torch's FlopCounterMode over a forward (matmuls and
    attention, the latter in SDPA's math kernel, which the counter sees) at two sizes, exactly."""
    model = (CLIPVisionEncoder if encoder == "clip" else Dinov2Encoder)(args)
    model.init_weights()
    for height, width in ((64, 64), (40, 24)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(images(height, width, batch=3))
        assert counter.get_total_flops() == 3 * args.flops_per_image(height, width)


@pytest.mark.parametrize("flavor", ["clip/vit-l-14-336", "dinov2/vit-l-14", "dinov2/vit-l-14-reg4",
                                    "dinov2/vit-g-14"])
def test_real_flavors_have_the_shapes_of_their_hf_configs(flavor):
    """Every parameter of a real flavor (on the meta device, select_layer=-1: all blocks) has the
    shape of its HF tensor in a transformers model built from the flavor's exported config, and
    the HF model has no other parameters than those titan_mm leaves out."""
    family, name = flavor.split("/")
    if family == "clip":
        args, model_cls, adapter = CLIP_FLAVORS[name], CLIPVisionEncoder, CLIPVisionAdapter(-1)
    else:
        args, model_cls, adapter = DINOV2_FLAVORS[name], Dinov2Encoder, Dinov2Adapter(-1)
    args = dataclasses.replace(args, select_layer=-1)
    config = adapter.hf_config(args)
    hf_cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        ours = model_cls(args)
        hf = hf_cls(hf_cls.config_class(**config))
    # the published layout: what save_pretrained writes
    hf_shapes = {k: v.shape for k, v in hf.state_dict().items()}
    if family == "clip":
        hf_shapes = {"vision_model." + k: v for k, v in hf_shapes.items()}
    else:
        hf_shapes = {k.replace("attention.q_proj", "attention.attention.query")
                     .replace("attention.k_proj", "attention.attention.key")
                     .replace("attention.v_proj", "attention.attention.value")
                     .replace("attention.o_proj", "attention.output.dense")
                     .replace("mlp.down_proj", "mlp.weights_out"): v for k, v in hf_shapes.items()}
        for k in [k for k in hf_shapes if "mlp.gate_proj" in k]:  # fused in checkpoints
            gate = hf_shapes.pop(k)
            hf_shapes.pop(k.replace("gate_proj", "up_proj"))
            hf_shapes[k.replace("gate_proj", "weights_in")] = torch.Size([2 * gate[0], *gate[1:]])
    ours_hf = adapter.to_hf({k: v for k, v in ours.state_dict().items()})
    assert {k: v.shape for k, v in ours_hf.items()} == {k: hf_shapes[k] for k in ours_hf}
    assert all(adapter.ignored_hf_key(k) for k in set(hf_shapes) - set(ours_hf))


def test_bad_inputs_name_the_fix():
    clip = CLIPVisionEncoder(CLIP_FLAVORS["debug"])
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        clip(images(64, 60))
    with pytest.raises(ValueError, match="CLIP takes 64 x 64 images, got .* set interpolate_pos_encoding"):
        clip(images(32, 32))
    with pytest.raises(ValueError, match="select_layer=-5 is outside the 4 hidden states"):
        CLIPVisionEncoder(CLIP_FLAVORS["debug"].__class__(n_layers=3, select_layer=-5))


def test_activation_checkpointing_and_compiled_blocks_give_the_same_gradients():
    """Blocks wrapped for full activation checkpointing and traced whole by torch.compile
    (fullgraph, aot_eager backend: no graph break, the same ops) give the eager model's output
    and gradients (max abs diff <= 1e-6)."""
    clip = dataclasses.replace(CLIP_FLAVORS["debug"], interpolate_pos_encoding=True)
    for model_cls, args in ((CLIPVisionEncoder, clip), (Dinov2Encoder, DINOV2_FLAVORS["debug"])):
        torch.manual_seed(0)
        ref = model_cls(args)
        ref.init_weights()
        wrapped = model_cls(args)
        wrapped.load_state_dict(ref.state_dict())
        apply_activation_checkpointing(wrapped.layers, ActivationCheckpoint(mode="full"))
        for block in wrapped.layers.values():
            block.compile(fullgraph=True, backend="aot_eager")
        x = images(40, 56)
        losses = [sum(o.square().sum() for o in m(x)) for m in (ref, wrapped)]
        for loss in losses:
            loss.backward()
        assert (losses[0] - losses[1]).abs() <= 1e-6 * losses[0].abs()
        # the checkpoint wrapper adds a level to the names
        grads = {k.replace("._checkpoint_wrapped_module", ""): p.grad for k, p in wrapped.named_parameters()}
        for name, p in ref.named_parameters():
            assert (p.grad - grads[name]).abs().max() <= 1e-6, name


def tensor_parallel_matches_one_process(rank: int, world: int, store: str):
    """One rank of ``test_tensor_parallel_encoders_match_one_process``."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        dinov2 = Dinov2Args(dim=64, n_layers=2, n_heads=4, patch_size=8, image_size=32, swiglu=True,
                            num_register_tokens=2, pos_embed_antialias=True)
        for model_cls, args, apply_tp in ((CLIPVisionEncoder, CLIP_FLAVORS["debug"], apply_tp_clip),
                                          (Dinov2Encoder, dinov2, apply_tp_dinov2)):
            torch.manual_seed(0)
            ref = model_cls(args)
            ref.init_weights()
            tp = model_cls(args)
            tp.load_state_dict(ref.state_dict())
            apply_tp(tp, mesh)
            # 1 + 8 x 8 and 1 + 5 x 3 + 2 registers tokens: odd counts, which the plan need not divide
            x = (images(40, 24) if model_cls is Dinov2Encoder else images(64, 64)).double()
            losses = [sum(o.square().sum() for o in m(x)) for m in (ref, tp)]
            for loss in losses:
                loss.backward()
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
            tp_params = dict(tp.named_parameters())
            for name, p in ref.named_parameters():
                grad = tp_params[name].grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_encoders_match_one_process(tmp_path):
    """apply_tp_clip / apply_tp_dinov2 on 2 gloo ranks (heads and MLP units split, the
    whole stream on every rank, odd token counts; fp64): the loss equals one process's within 1e-12
    relative and every parameter's (gathered) gradient within 1e-10 relative + 1e-12."""
    mp.spawn(tensor_parallel_matches_one_process, args=(2, str(tmp_path / "store")), nprocs=2)
