"""Sampling from a masked diffusion LM (LLaDA's reverse process): iterative unmasking.

The answer starts as ``gen_length`` mask tokens after the prompt (text, images: the model inputs
of one packed row, as in training). It is generated in semi-autoregressive blocks of
``block_length`` tokens, left to right; each block gets ``steps / number of blocks`` steps. Every
step runs the model on the whole row (attention is bidirectional within the document), predicts
every masked position of the answer, and keeps a share of the current block's masked positions:
the most confident predictions (``remasking = "low_confidence"``) or random ones (``"random"``);
the rest stay masked for the next step. ``temperature > 0`` samples the predictions with Gumbel
noise instead of taking the most likely token.
"""

from typing import Literal

import torch
import torch.nn.functional as F


def tokens_per_step(n_masked: int, steps: int) -> list[int]:
    """How many of ``n_masked`` positions each of ``steps`` steps unmasks: as evenly as possible,
    the earlier steps taking the remainder."""
    base, extra = divmod(n_masked, steps)
    return [base + (i < extra) for i in range(steps)]


@torch.no_grad()
def mdlm_generate(model: torch.nn.Module, inputs: dict, answer_start: int, *, mask_id: int, gen_length: int,
                  steps: int, block_length: int, remasking: Literal["low_confidence", "random"] = "low_confidence",
                  temperature: float = 0.0, generator: torch.Generator | None = None,
                  shift: bool = False) -> torch.Tensor:
    """The answer's ``gen_length`` token ids [gen_length]. ``inputs``: the model inputs of one row
    (B = 1) whose input_ids hold mask_id at [answer_start, answer_start + gen_length). ``shift``:
    the model was trained with ``mdlm_shift`` (position i - 1 predicts token i)."""
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError(f"block_length = {block_length} must divide gen_length = {gen_length}, and the "
                         f"{gen_length // block_length} blocks must divide steps = {steps}")
    ids_BS = inputs["input_ids"].clone()
    answer = slice(answer_start, answer_start + gen_length)
    predictor = slice(answer.start - shift, answer.stop - shift)  # the positions whose states predict the answer
    n_blocks = gen_length // block_length
    for block in range(n_blocks):
        start = answer_start + block * block_length
        in_block_S = torch.zeros(ids_BS.shape[1], dtype=torch.bool)
        in_block_S[start:start + block_length] = True
        n_masked = int((ids_BS[0, in_block_S] == mask_id).sum())
        for k in tokens_per_step(n_masked, steps // n_blocks):
            h_BSD = model(**{**inputs, "input_ids": ids_BS})
            logits_GV = model.decoder.logits(h_BSD[0, predictor]).double()
            logits_GV[:, mask_id] = -torch.inf  # never predict the mask itself
            predicted_G = _predict(logits_GV, temperature, generator)
            if remasking == "low_confidence":
                score_G = F.softmax(logits_GV, -1).gather(1, predicted_G[:, None])[:, 0]
            else:
                score_G = torch.rand(gen_length, generator=generator, dtype=torch.float64)
            # only masked positions of the current block can be kept this step
            open_G = (ids_BS[0, answer] == mask_id) & in_block_S[answer]
            score_G = torch.where(open_G, score_G, -torch.inf)
            keep_G = score_G.topk(k).indices
            ids_BS[0, answer_start + keep_G] = predicted_G[keep_G]
    return ids_BS[0, answer]


def _predict(logits_GV: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax of the logits, or with temperature > 0 a sample by the Gumbel-max trick."""
    if temperature == 0:
        return logits_GV.argmax(-1)
    u = torch.rand(logits_GV.shape, generator=generator, dtype=torch.float64).clamp(min=1e-20)
    return (logits_GV / temperature - torch.log(-torch.log(u))).argmax(-1)
