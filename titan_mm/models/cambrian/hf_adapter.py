"""The official Cambrian checkpoint layout (cambrian-mllm/cambrian, ``CambrianLlamaForCausalLM``
with ``mm_projector_type = "sva"``) -> titan_mm's CambrianModel, so training can start from released
weights.

Official names (one query group) and ours:

| official | titan_mm |
|---|---|
| ``model.mm_projector_aux_{k}.{0,2,3}`` (Linear, Linear, LayerNorm) | ``vision.projections.{k}.{linear_1,linear_2,norm}`` |
| ``model.vision_query`` [1, C] (one vector shared by every cell) | ``vision.queries`` [G*G, C] (that vector in every cell) |
| ``model.vision_sampler_0.layers.{l}.*`` | ``vision.layers.{l}.*`` |
| ``model.vision_sampler_layers.{j}.layers.0.*`` | ``decoder_sva.{j}.*`` |
| ``model.mm_projector.{0,2}`` | ``vision.projector_{1,2}`` |
| ``model.image_newline`` | ``vision.image_newline`` |
| ``model.*`` / ``lm_head`` (Llama / Qwen) | ``decoder.*`` |
| ``model.vision_tower_aux_list.{k}.vision_tower.*`` (the encoder's HF layout) | ``vision.encoders.{k}.*`` |

Inside an SVA layer (``VisionCrossAttentionLayer``): ``cross_attn.q_proj.{0,1}`` (LayerNorm,
Linear) -> ``q_norm`` / ``q_proj``, ``cross_attn.{k,v}_proj_{k}.{0,1}`` -> ``{k,v}_norms.{k}`` /
``{k,v}_projs.{k}``, ``cross_attn.o_proj`` -> ``o_proj``, ``proj_out.linear_{1,2}`` ->
``mlp_{1,2}``, ``pos_embed_{k}`` -> ``pos_embeds.{k}``; ``proj_context``, ``proj_in`` and ``norm``
keep their names. Encoders are mapped by their kind's HF key map (``ENCODERS[kind].hf_key_map``:
Siglip2VisionModel's, CLIPVisionModel's or Dinov2Model's names under the tower's prefix); a tower
stored in another layout (an open_clip / timm SigLIP) has none and is reported missing.
"""


import os

import torch

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.cambrian.encoders import ENCODERS
from titan_mm.models.cambrian.model import CambrianArgs, CambrianModel
from titan_mm.models.llama.hf_adapter import decoder_key_map

_SVA_LAYER = [  # (ours, official) inside one SVA layer
    (r"proj_context\.weight", "proj_context.weight"),
    (r"proj_in\.weight", "proj_in.weight"),
    (r"q_norm\.(?P<p>weight|bias)", "cross_attn.q_proj.0.{p}"),
    (r"q_proj\.weight", "cross_attn.q_proj.1.weight"),
    (r"k_norms\.(?P<k>\d+)\.(?P<p>weight|bias)", "cross_attn.k_proj_{k}.0.{p}"),
    (r"k_projs\.(?P<k>\d+)\.weight", "cross_attn.k_proj_{k}.1.weight"),
    (r"v_norms\.(?P<k>\d+)\.(?P<p>weight|bias)", "cross_attn.v_proj_{k}.0.{p}"),
    (r"v_projs\.(?P<k>\d+)\.weight", "cross_attn.v_proj_{k}.1.weight"),
    (r"o_proj\.weight", "cross_attn.o_proj.weight"),
    (r"norm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"mlp_1\.weight", "proj_out.linear_1.weight"),
    (r"mlp_2\.weight", "proj_out.linear_2.weight"),
    (r"pos_embeds\.(?P<k>\d+)", "pos_embed_{k}"),
]


def sva_key_map(ours_prefix: str, official_prefix: str) -> list[tuple[str, str]]:
    return [(ours_prefix + ours, official_prefix + theirs) for ours, theirs in _SVA_LAYER]


class CambrianAdapter(HFAdapter):
    """Official Cambrian state dict -> ours for the model of ``args`` (its encoders and query grid
    decide the encoder maps and the query tiling): ``CambrianAdapter(args).from_hf(state_dict)``."""

    def __init__(self, args: CambrianArgs):
        self.args = args
        self.key_map = [
            (r"vision\.projections\.(?P<k>\d+)\.linear_1\.(?P<p>weight|bias)", "model.mm_projector_aux_{k}.0.{p}"),
            (r"vision\.projections\.(?P<k>\d+)\.linear_2\.(?P<p>weight|bias)", "model.mm_projector_aux_{k}.2.{p}"),
            (r"vision\.projections\.(?P<k>\d+)\.norm\.(?P<p>weight|bias)", "model.mm_projector_aux_{k}.3.{p}"),
            (r"vision\.queries", "model.vision_query"),
            (r"vision\.projector_1\.(?P<p>weight|bias)", "model.mm_projector.0.{p}"),
            (r"vision\.projector_2\.(?P<p>weight|bias)", "model.mm_projector.2.{p}"),
            (r"vision\.image_newline", "model.image_newline"),
            *sva_key_map(r"vision\.layers\.(?P<l>\d+)\.", "model.vision_sampler_0.layers.{l}."),
            *sva_key_map(r"decoder_sva\.(?P<j>\d+)\.", "model.vision_sampler_layers.{j}.layers.0."),
            *decoder_key_map("model.", lm_head="lm_head"),
        ]
        self.fused_key_map = []
        for k, e in enumerate(args.encoders):
            hf_prefix, ours_prefix = f"model.vision_tower_aux_list.{k}.vision_tower.", f"vision.encoders.{k}."
            self.key_map += ENCODERS[e.kind].hf_key_map(hf_prefix, ours_prefix)
            self.fused_key_map += ENCODERS[e.kind].hf_fused_key_map(hf_prefix, ours_prefix)

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        groups = hf_state_dict.get("model.vision_query")
        if groups is not None and groups.shape[0] != 1:
            raise ValueError(f"the checkpoint has {groups.shape[0]} query groups; titan_mm's Cambrian "
                             f"implements one (query_num_list of one grid)")
        out = super().from_hf(hf_state_dict)
        if "vision.queries" in out:
            # one learned vector for every cell: the same grid of queries
            out["vision.queries"] = out["vision.queries"].expand(self.args.query_side ** 2, -1).clone()
        return out

    def ignored_hf_key(self, key: str) -> bool:
        # a tied lm_head duplicates the embeddings
        return self.args.decoder.tie_embeddings and key == "lm_head.weight"

    def hf_config(self, args: CambrianArgs) -> dict:
        raise NotImplementedError("titan_mm reads the official Cambrian layout; it does not write it")

    def args_from_hf_config(self, config: dict) -> CambrianArgs:
        raise NotImplementedError("build CambrianArgs from a flavor; the adapter maps the weights")




def official_to_dcp(args: CambrianArgs, official_folder: str, out_folder: str):
    """An official Cambrian checkpoint folder (its *.safetensors) -> a model-only DCP folder that
    ``checkpoint.initial_load_path`` starts training from. Every parameter must be found (strict)."""
    from safetensors.torch import load_file
    import torch.distributed.checkpoint as dcp
    from titan_mm.train.checkpoint import ModelState

    official = {}
    for name in sorted(os.listdir(official_folder)):
        if name.endswith(".safetensors"):
            official.update(load_file(os.path.join(official_folder, name)))
    if not official:
        raise FileNotFoundError(f"no .safetensors files in {official_folder}")
    with torch.device("meta"):
        model = CambrianModel(args)
    model.to_empty(device="cpu")
    model.load_state_dict(CambrianAdapter(args).from_hf(official), strict=True)
    dcp.save({"model": ModelState(model)}, checkpoint_id=out_folder)
