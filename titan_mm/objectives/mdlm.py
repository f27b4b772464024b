"""Masked diffusion language modelling (MDLM: Sahoo et al. 2024; LLaDA's training recipe).

For each document of a microbatch a masking level t ~ U(eps, 1) is drawn; each trainable token
(one that carries a label: an assistant or caption token, never a prompt, padding or image / video
token) is replaced by the mask token with probability t, independently. The decoder attends
bidirectionally within each packed document and predicts the original token at every masked
position (with ``mdlm_shift``, from the position before it, as an autoregressive model does: the
Dream / Tiny-A2D recipe for starting from an autoregressive checkpoint). The loss is LLaDA's Monte-Carlo estimate of the negative ELBO:

    loss = sum over masked tokens i of CE(logits_i, x_i) / t_doc(i)  /  number of trainable tokens

with the count taken over the whole global batch (all data-parallel, sequence-parallel and
pipeline ranks and microbatches), as the trainer does for every objective.

The masks are drawn on the host from a generator seeded per microbatch by the trainer (job seed,
step, the microbatch's place in the global batch), so a resumed run and every parallel layout see
the masks one process sees.
"""

import torch
import torch.nn.functional as F

from titan_mm.config import Objective as ObjectiveConfig
from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.objectives.base import Objective, loss_targets


class MDLM(Objective):
    causal = False

    def __init__(self, cfg: ObjectiveConfig, mask_id: int, *, vocab_parallel: bool, loss_parallel: bool):
        super().__init__(vocab_parallel=vocab_parallel, loss_parallel=loss_parallel)
        self.eps, self.antithetic, self.mask_id = cfg.mdlm_eps, cfg.mdlm_antithetic, mask_id
        self.shift = cfg.mdlm_shift

    def prepare(self, batch: dict, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        return self.mask_tokens(batch, self.masking_levels(batch["document_ids"], generator), generator)

    def mask_tokens(self, batch: dict, t_BS: torch.Tensor, generator: torch.Generator) -> dict:
        """``prepare`` at given masking levels (evaluation fixes t)."""
        input_ids_BS = batch["input_ids"]
        trainable_BS = trainable_tokens(batch["labels"])
        masked_BS = trainable_BS & (torch.rand(input_ids_BS.shape, generator=generator) < t_BS)
        labels_BS = torch.where(masked_BS, input_ids_BS, IGNORE_INDEX)
        weights_BS = 1.0 / t_BS
        if self.shift:  # position i - 1 predicts token i (never across documents: a first token is not trainable)
            labels_BS = F.pad(labels_BS[:, 1:], (0, 1), value=IGNORE_INDEX)
            weights_BS = F.pad(weights_BS[:, 1:], (0, 1), value=1.0)
        return {**batch, "input_ids": torch.where(masked_BS, self.mask_id, input_ids_BS),
                "targets": loss_targets(labels_BS, weights_BS), "loss_tokens": trainable_BS}

    def masking_levels(self, document_ids_BS: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, S] fp32: the t of each token's document, drawn from U(eps, 1) per document (padding
        gets the first document's; it is never masked)."""
        n_docs_B = document_ids_BS.amax(dim=1).clamp(min=-1) + 1
        first_B = n_docs_B.cumsum(0) - n_docs_B
        n = int(n_docs_B.sum())
        if self.antithetic:  # one offset, the documents' levels evenly spread (stratified)
            u_K = (torch.rand(1, generator=generator) + torch.arange(n) / max(n, 1)) % 1
        else:
            u_K = torch.rand(n, generator=generator)
        t_K = torch.cat([self.eps + (1 - self.eps) * u_K, torch.ones(1)])  # a spare for empty rows
        return t_K[(first_B[:, None] + document_ids_BS.clamp(min=0)).clamp(max=n)]


def trainable_tokens(labels_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: tokens that carry a label. The loader's labels are next tokens (labels[i] is
    the target of position i, token i + 1), so token i is trainable where labels[i - 1] is set;
    a document's first token never is."""
    trainable_BS = torch.zeros_like(labels_BS, dtype=torch.bool)
    trainable_BS[:, 1:] = labels_BS[:, :-1] != IGNORE_INDEX
    return trainable_BS
