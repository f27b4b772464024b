"""Output projection + cross-entropy in chunks of tokens, never materialising the [tokens, vocab]
logits.

With a 152k vocabulary an 8k-token row has 1.2 G logits: 5 GB in fp32, and as much again for their
gradient. Here each chunk of tokens gets its logits (fp32 softmax math), its loss and at once its
gradients with respect to the hidden states and the weight (the loss is the last op, so the
gradient of a chunk is known in forward: softmax - one_hot); backward only scales them by the
incoming gradient. Peak extra memory is one chunk of logits; no matmul is recomputed.
"""

import torch

from titan_mm.data.packing import IGNORE_INDEX

CHUNK_TOKENS = 4096
"""Tokens per chunk: 4096 x 152k vocab = 1.2 GB of bf16 logits (and as much for their gradient) at
a time; the softmax math runs in fp32 inside one fused kernel on GPUs."""


def linear_cross_entropy(h_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """sum over tokens with a label of cross_entropy(h @ weight.T, label), fp32 scalar.

    h is used in its own dtype (the compute dtype), the weight is cast to it; labels equal to
    IGNORE_INDEX contribute nothing. chunk_tokens defaults to CHUNK_TOKENS.
    """
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    if torch.is_autocast_enabled(h_TD.device.type):  # the matmuls run in the autocast dtype
        h_TD = h_TD.to(torch.get_autocast_dtype(h_TD.device.type))
    return _LinearCrossEntropy.apply(h_TD, weight_VD, labels_T, chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, weight_VD, labels_T, chunk_tokens):
        w = weight_VD.to(h_TD.dtype)
        grad_h = torch.empty_like(h_TD)
        grad_w = loss = None  # grad_w accumulated in the compute dtype, as the matmuls produce it
        chunk_fn = _compiled_chunk() if h_TD.is_cuda else _chunk_loss_and_grad_logits
        for start in range(0, h_TD.shape[0], chunk_tokens):
            h_c = h_TD[start:start + chunk_tokens]
            loss_c, grad_logits = chunk_fn(h_c, w, labels_T[start:start + chunk_tokens])
            torch.mm(grad_logits, w, out=grad_h[start:start + chunk_tokens])
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
        return grad_h * g, (grad_w * g).to(ctx.weight_dtype), None, None


def _chunk_loss_and_grad_logits(h_cD, w_VD, labels_c):
    """Loss sum of a chunk and d(loss)/d(logits) in the compute dtype."""
    logits = (h_cD @ w_VD.t()).to(_math_dtype(h_cD.dtype))
    valid = labels_c != IGNORE_INDEX
    target = labels_c.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, target[:, None])[:, 0]
    loss = ((lse - target_logit) * valid).sum()
    probs = torch.exp(logits - lse[:, None])
    one_hot = torch.nn.functional.one_hot(target, logits.shape[1]).to(probs.dtype)
    grad_logits = (probs - one_hot) * valid[:, None]
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
