"""The training loss: summed token cross-entropy, on whole or vocabulary-sharded logits.

train.py divides the sum by the global number of label tokens. With tensor parallelism and
parallelism.enable_loss_parallel the model returns logits as a DTensor split over the vocabulary
(titan_mm/parallel/tensor_parallel.py); cross-entropy then runs on each rank's slice with
all-reduces of the per-token max and sum of exponentials inside, so the full [B, S, V] logits are
never gathered. torch requires the forward's loss and its backward to run in ``loss_parallel()``.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from titan_mm.data.packing import IGNORE_INDEX


def loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum (fp32, a 0-dim plain tensor) of the cross-entropies of the tokens whose label is not
    IGNORE_INDEX. ``logits_BSV`` is a plain tensor, or a DTensor sharded over the vocabulary when
    called (together with backward) inside ``loss_parallel_context(True)``."""
    loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)
    # the sum is replicated on every tp rank; its local value carries the gradient
    return loss.to_local() if isinstance(loss, DTensor) else loss


def loss_parallel_context(enabled: bool):
    """torch's loss_parallel() when the logits are vocabulary-sharded, else nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()
