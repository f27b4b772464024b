"""Causal language modelling: every label-bearing token predicts the next one, with causal
attention inside each packed document. The loader's labels are already the next tokens."""

from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.objectives.base import Objective, loss_targets


class CausalLM(Objective):
    causal = True

    def prepare(self, batch: dict, seed: int) -> dict:
        labels_BS = batch["labels"]
        loss_tokens_BS = labels_BS != IGNORE_INDEX
        return {**batch, "targets": loss_targets(labels_BS, loss_tokens_BS.float()),
                "loss_tokens": loss_tokens_BS}
