"""Output head + weighted cross-entropy on final hidden states: the loss every objective shares.

``linear_cross_entropy`` runs the output projection and the loss in chunks of tokens, never
materialising the [tokens, vocab] logits. With a 152k vocabulary an 8k-token row has 1.2 G logits:
5 GB in fp32, and as much again for their gradient. Each chunk of tokens gets its logits (fp32
softmax math), its loss and at once its gradients with respect to the hidden states and the weight
(the loss is the last op, so the gradient of a chunk is known in forward: w * (softmax - one_hot));
backward only scales them by the incoming gradient. Peak extra memory is one chunk of logits; no
matmul is recomputed.

``vocab_parallel_cross_entropy`` is the tensor-parallel path: the output weight is split over the
vocabulary (titan_mm/parallel/tensor_parallel.py), so each rank computes the logits of its slice, a
DTensor sharded on the last dim. With loss parallelism the cross-entropy runs on those slices, with
all-reduces of the per-token max and sum of exponentials inside, so the full logits are never
gathered; torch requires that loss and its backward to run in ``loss_parallel()``
(``loss_parallel_context``). Without it the logits are gathered first.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from titan_mm.data.packing import IGNORE_INDEX

CHUNK_TOKENS = 4096
"""Tokens per chunk: 4096 x 152k vocab = 1.2 GB of bf16 logits (and as much for their gradient) at
a time; the softmax math runs in fp32 inside one fused kernel on GPUs."""


def linear_cross_entropy(h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor,
                         weights_T: torch.Tensor | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """sum over tokens with a label of weight * cross_entropy(h @ weight_VD.T, label), fp32 scalar.

    h is used in its own dtype (the compute dtype), the weight is cast to it; labels equal to
    IGNORE_INDEX contribute nothing; ``weights_T`` (fp32) defaults to 1. chunk_tokens defaults to
    CHUNK_TOKENS.
    """
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    if torch.is_autocast_enabled(h_TD.device.type):  # the matmuls run in the autocast dtype
        h_TD = h_TD.to(torch.get_autocast_dtype(h_TD.device.type))
    if weights_T is None:
        weights_T = torch.ones(labels_T.shape, device=h_TD.device)
    return _LinearCrossEntropy.apply(h_TD, weight_VD, labels_T, weights_T, chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, weight_VD, labels_T, weights_T, chunk_tokens):
        w = weight_VD.to(h_TD.dtype)
        grad_h = torch.empty_like(h_TD)
        grad_w = loss = None  # grad_w accumulated in the compute dtype, as the matmuls produce it
        chunk_fn = _compiled_chunk() if h_TD.is_cuda else _chunk_loss_and_grad_logits
        for start in range(0, h_TD.shape[0], chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            h_c = h_TD[chunk]
            loss_c, grad_logits = chunk_fn(h_c, w, labels_T[chunk], weights_T[chunk])
            torch.mm(grad_logits, w, out=grad_h[chunk])
            if grad_w is None:
                loss, grad_w = loss_c, grad_logits.t() @ h_c
            else:
                loss += loss_c
                grad_w.addmm_(grad_logits.t(), h_c)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_loss.to(grad_h.dtype)
        return grad_h * g, (grad_w * g).to(ctx.weight_dtype), None, None, None


def _chunk_loss_and_grad_logits(h_cD, w_VD, labels_c, weights_c):
    """Weighted loss sum of a chunk and d(loss)/d(logits) in the compute dtype."""
    logits = (h_cD @ w_VD.t()).to(_math_dtype(h_cD.dtype))
    weight = torch.where(labels_c != IGNORE_INDEX, weights_c, 0).to(logits.dtype)
    target = labels_c.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, target[:, None])[:, 0]
    loss = ((lse - target_logit) * weight).sum()
    probs = torch.exp(logits - lse[:, None])
    one_hot = F.one_hot(target, logits.shape[1]).to(probs.dtype)
    grad_logits = (probs - one_hot) * weight[:, None]
    return loss, grad_logits.to(h_cD.dtype)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and loss in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


_compiled = None


def _compiled_chunk():
    """The chunk math compiled once (fused softmax / one-hot / masking; GPUs only)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_chunk_loss_and_grad_logits)
    return _compiled


def vocab_parallel_cross_entropy(h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor,
                                 weights_T: torch.Tensor, loss_parallel: bool) -> torch.Tensor:
    """linear_cross_entropy's sum with a vocabulary-split output weight (a DTensor sharded on dim
    0) and replicated hidden states: a 0-dim plain tensor, the same on every tp rank (its local
    value carries the gradient). ``loss_parallel``: call it (and backward) inside
    ``loss_parallel_context(True)``."""
    logits_TV = F.linear(h_TD, weight_VD)  # each rank: its vocabulary slice, Shard(-1)
    if not loss_parallel:
        logits_TV = logits_TV.redistribute(placements=[Replicate()]).to_local()
    ce_T = F.cross_entropy(logits_TV.float(), labels_T, reduction="none", ignore_index=IGNORE_INDEX)
    if isinstance(ce_T, DTensor):
        ce_T = ce_T.to_local()
    return (ce_T * weights_T).sum()


def loss_parallel_context(enabled: bool):
    """torch's loss_parallel() when the logits are vocabulary-sharded, else nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()
