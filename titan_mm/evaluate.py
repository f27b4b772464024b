"""Caption loss of a trained model on held-out samples, with true or swapped images."""

import json
import os

import torch
import torch.distributed.checkpoint as dcp

from titan_mm.config import JobConfig
from titan_mm.data.dataloader import build_document_builder, collate_rows
from titan_mm.data.packing import IGNORE_INDEX, BestFitPacker, RowShape
from titan_mm.data.sources import ListSource
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.models import get_model_spec
from titan_mm.objectives.loss import linear_cross_entropy
from titan_mm.train.checkpoint import ModelState


def latest_model_export(dump_folder: str, checkpoint_folder: str) -> str:
    folder = os.path.join(dump_folder, checkpoint_folder)
    exports = sorted((int(d.removeprefix("model-step-")), d) for d in os.listdir(folder)
                     if d.startswith("model-step-"))
    if not exports:
        raise FileNotFoundError(f"no model-step-N export in {folder}; train with "
                                f"checkpoint.export_model_only = true")
    return os.path.join(folder, exports[-1][1])


def load_model(cfg: JobConfig, weights: str) -> torch.nn.Module:
    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.model_cls(spec.flavors[cfg.model.flavor])
    model.to_empty(device="cpu")
    model.init_weights()
    dcp.load({"model": ModelState(model)}, checkpoint_id=weights)
    return model.eval()


def caption_docs(cfg: JobConfig, tok: Tokenizer, model_args, path: str, shift: int) -> list:
    """Documents of ``path``'s captions, each with the image of the sample ``shift`` places later."""
    builder = build_document_builder(cfg.data, tok, model_args.vision_input)
    root = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    n = len(samples)
    return [builder.caption(s["id"], os.path.join(root, samples[(i + shift) % n]["image"]), s["caption"])
            for i, s in enumerate(samples)]


@torch.no_grad()
def caption_loss(cfg: JobConfig, model: torch.nn.Module, model_args, path: str, shift: int = 0) -> float:
    """Mean loss per caption token over every sample of ``path`` (all packed rows, one pass)."""
    tok = Tokenizer(cfg.model.tokenizer_path, get_model_spec(cfg.model.name).special_tokens)
    docs = caption_docs(cfg, tok, model_args, path, shift)
    spec = model_args.vision_input
    shape = RowShape(cfg.training.seq_len, cfg.data.image_slots_per_row, cfg.data.patches_per_slot,
                     spec.patch_dim, spec.merge_area, tok.pad_id, (tok.image_id,),
                     position_dims=spec.position_dims)
    total, count = 0.0, 0
    for row in BestFitPacker(ListSource(docs), shape, cfg.data.pack_open_bins):
        batch = collate_rows([row], cfg.data.patches_per_slot // spec.merge_area)
        labels = batch.pop("labels")
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}  # not stats, skips
        # summed loss, logits never materialised
        total += linear_cross_entropy(model(**inputs).flatten(0, 1), model.decoder.head_weight(),
                                      labels.flatten()).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


SWAP_SHIFT = 37
"""Swapped images: caption i is paired with the image of sample i + 37 (mod the sample count)."""


def grounding_losses(cfg: JobConfig, model: torch.nn.Module, model_args, path: str) -> tuple[float, float]:
    """Held-out caption loss with the true images and with images swapped between samples: a model
    that ignores its images scores the same on both."""
    return (caption_loss(cfg, model, model_args, path, shift=0),
            caption_loss(cfg, model, model_args, path, shift=SWAP_SHIFT))
