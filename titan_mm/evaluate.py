"""Caption loss and accuracy of a trained model on held-out samples, with true or swapped images,
for its training objective (causal: next tokens; MDLM: masked tokens at t = 0.5)."""

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from titan_mm.config import JobConfig
from titan_mm.data.dataloader import build_document_builder, collate_rows
from titan_mm.data.packing import IGNORE_INDEX, BestFitPacker, RowShape
from titan_mm.data.sources import ListSource
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.models import get_model_spec
from titan_mm.objectives import objective_setup
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
    """The config's model (for its objective: MDLM grows the vocabulary) with DCP ``weights``."""
    spec = get_model_spec(cfg.model.name)
    _, _, args = objective_setup(cfg)
    with torch.device("meta"):
        model = spec.model_cls(args)
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


MDLM_EVAL_T = 0.5
"""Masking level of MDLM evaluation: half of each caption's tokens are masked."""

MODEL_INPUTS = ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw", "image_token_index")


@dataclass
class DocumentScore:
    """A model's score of one document's predicted tokens (its supervised span)."""

    loss: float
    """Summed cross-entropy (negative log-likelihood, nats) of the predicted tokens."""
    correct: int
    """Predicted tokens that are the argmax of their logits."""
    tokens: int
    """Predicted tokens."""


def row_shape(cfg: JobConfig, tok: Tokenizer, model_args) -> RowShape:
    """The training rows' shape (training.seq_len tokens, data.image_slots_per_row x patches_per_slot)."""
    spec = model_args.vision_input
    return RowShape(cfg.training.seq_len, cfg.data.image_slots_per_row, cfg.data.patches_per_slot,
                    spec.patch_dim, spec.merge_area, tok.pad_id, (tok.image_id,), position_dims=spec.position_dims)


@torch.no_grad()
def score_documents(cfg: JobConfig, model: torch.nn.Module, model_args, docs: list, seed: int = 0,
                    device: torch.device | str = "cpu") -> list[DocumentScore | None]:
    """Loss, argmax hits and count of each document's predicted tokens (in the order of ``docs``),
    packed into the training rows' shape, one forward per row. causal_lm predicts each supervised
    token from the ones before; mdlm masks each supervised token with probability MDLM_EVAL_T
    (generator seeded by ``seed``) and predicts the masked ones from the rest. A document that fits
    no row scores None."""
    tok, objective, _ = objective_setup(cfg)
    spec = model_args.vision_input
    generator = torch.Generator().manual_seed(seed)
    scores: list[DocumentScore | None] = [None] * len(docs)
    packer = BestFitPacker(ListSource(docs), row_shape(cfg, tok, model_args), cfg.data.pack_open_bins)
    for row in packer:
        batch = collate_rows([row], cfg.data.patches_per_slot // spec.merge_area)
        if cfg.objective.name == "mdlm":
            t_BS = torch.full(batch["input_ids"].shape, MDLM_EVAL_T)
            batch = objective.mask_tokens(batch, t_BS, generator)
        else:
            batch = objective.prepare(batch, seed)
        labels_S = batch["targets"][0, 0].long()
        predicted_S = labels_S != IGNORE_INDEX
        h_BSD = model(**{k: batch[k].to(device) for k in MODEL_INPUTS})
        # logits of the predicted positions only
        logits_TV = model.decoder.logits(h_BSD[0][predicted_S.to(device)]).float()
        targets_T = labels_S[predicted_S].to(device)
        loss_T = F.cross_entropy(logits_TV, targets_T, reduction="none").cpu()
        correct_T = (logits_TV.argmax(-1) == targets_T).cpu()
        doc_T = batch["document_ids"][0][predicted_S]
        n = len(row["refs"])
        loss_n = torch.zeros(n, dtype=torch.float64).index_add_(0, doc_T, loss_T.double())
        correct_n = torch.zeros(n, dtype=torch.long).index_add_(0, doc_T, correct_T.long())
        tokens_n = torch.bincount(doc_T, minlength=n)
        for i, ref in enumerate(row["refs"]):
            scores[ref] = DocumentScore(float(loss_n[i]), int(correct_n[i]), int(tokens_n[i]))
    return scores


def caption_metrics(cfg: JobConfig, model: torch.nn.Module, model_args, path: str, shift: int = 0,
                    seed: int = 0) -> tuple[float, float]:
    """Mean loss and accuracy (argmax) per predicted caption token over every sample of ``path``
    (``score_documents``)."""
    tok, _, _ = objective_setup(cfg)
    scores = [s for s in score_documents(cfg, model, model_args, caption_docs(cfg, tok, model_args, path, shift),
                                         seed) if s is not None]
    count = sum(s.tokens for s in scores)
    return sum(s.loss for s in scores) / count, sum(s.correct for s in scores) / count


def caption_loss(cfg: JobConfig, model: torch.nn.Module, model_args, path: str, shift: int = 0) -> float:
    """Mean loss per predicted caption token (``caption_metrics``)."""
    return caption_metrics(cfg, model, model_args, path, shift)[0]


SWAP_SHIFT = 37
"""Swapped images: caption i is paired with the image of sample i + 37 (mod the sample count)."""


def grounding_losses(cfg: JobConfig, model: torch.nn.Module, model_args, path: str) -> tuple[float, float]:
    """Held-out caption loss with the true images and with images swapped between samples: a model
    that ignores its images scores the same on both."""
    return (caption_loss(cfg, model, model_args, path, shift=0),
            caption_loss(cfg, model, model_args, path, shift=SWAP_SHIFT))
