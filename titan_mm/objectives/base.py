"""What every objective shares: the output head + weighted cross-entropy on final hidden states."""

import torch

from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.objectives.loss import linear_cross_entropy, loss_parallel_context, vocab_parallel_cross_entropy


class Objective:
    """Subclasses say what the model sees and predicts (``prepare``) and with which attention
    (``causal``); the loss is the same for all: sum over tokens of weight x cross-entropy."""

    causal: bool = True
    """The decoder's attention within each document: causal, or bidirectional."""
    added_tokens: bool = False
    """Whether building the objective added tokens to the tokenizer (the embedding grows)."""

    def __init__(self, *, vocab_parallel: bool, loss_parallel: bool):
        self.vocab_parallel, self.loss_parallel = vocab_parallel, loss_parallel

    def prepare(self, batch: dict, seed: int) -> dict:
        """The batch with the model inputs this objective trains on and the loss targets:
        ``targets`` [B, 2, S] fp32 (label or IGNORE_INDEX, weight) and ``loss_tokens`` [B, S]
        bool. ``seed`` identifies the batch in the run (the same in every parallel layout)."""
        raise NotImplementedError

    def loss(self, h_BSD: torch.Tensor, head_weight_VD: torch.Tensor, targets_B2S: torch.Tensor) -> torch.Tensor:
        """sum over tokens of weight x cross_entropy(h @ head_weight.T, label): an fp32 0-dim
        tensor. Call it and its backward inside ``context()``."""
        labels_T = targets_B2S[:, 0].flatten().long()
        weights_T = targets_B2S[:, 1].flatten()
        if self.vocab_parallel:
            return vocab_parallel_cross_entropy(h_BSD.flatten(0, 1), head_weight_VD, labels_T, weights_T,
                                                self.loss_parallel)
        return linear_cross_entropy(h_BSD.flatten(0, 1), head_weight_VD, labels_T, weights_T)

    def context(self):
        """What the loss and its backward run in (torch's loss_parallel under loss parallelism)."""
        return loss_parallel_context(self.vocab_parallel and self.loss_parallel)


def loss_targets(labels_BS: torch.Tensor, weights_BS: torch.Tensor) -> torch.Tensor:
    """[B, 2, S] fp32: labels (exact below 2^24) and per-token weights in one tensor, so the
    pipeline schedule cuts both into microbatches as it does any target."""
    return torch.stack([labels_BS.float(), torch.where(labels_BS != IGNORE_INDEX, weights_BS, 0.0)], dim=1)


def normalise_targets(targets_B2S: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """The targets with every weight divided by the global number of loss tokens."""
    scale_12 = torch.stack([torch.ones_like(num_tokens), 1.0 / num_tokens])[None, :, None]
    return targets_B2S * scale_12
