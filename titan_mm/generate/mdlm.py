"""Answers of a masked diffusion model (objective mdlm) from the same prompts as causal generation:
the prompt document, then ``gen_length`` mask tokens that the sampler unmasks
(titan_mm/objectives/mdlm_sampler.py)."""

from dataclasses import dataclass
from typing import Literal

import torch

from titan_mm.data.documents import Document
from titan_mm.generate.decode import prompt_batch
from titan_mm.generate.load import InferenceModel
from titan_mm.objectives.mdlm_sampler import mdlm_generate


@dataclass
class MDLMSampling:
    gen_length: int = 32
    """Answer length: the number of mask tokens after the prompt."""
    steps: int = 32
    block_length: int = 32
    """Semi-autoregressive blocks, left to right; must divide gen_length."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    temperature: float = 0.0
    seed: int = 0


def with_masked_answer(im: InferenceModel, prompt: Document, gen_length: int) -> Document:
    """``prompt`` followed by ``gen_length`` mask tokens (positions recomputed over the whole)."""
    doc = Document(prompt.ref, prompt.tokens + [im.objective.mask_id] * gen_length,
                   [False] * (len(prompt.tokens) + gen_length), prompt.images)
    positions_fn = im.args.vision_input.positions_fn
    if positions_fn is not None:
        doc.positions = positions_fn(doc)
    return doc


def generate_mdlm(im: InferenceModel, prompt: Document, s: MDLMSampling) -> list[int]:
    """The answer's token ids, cut at the first eos."""
    if im.objective.causal:
        raise ValueError("this model was trained with causal_lm; generate with titan_mm.generate.generate")
    inputs = prompt_batch(im, [with_masked_answer(im, prompt, s.gen_length)])
    generator = torch.Generator().manual_seed(s.seed)
    answer = mdlm_generate(im.model, inputs, len(prompt.tokens), mask_id=im.objective.mask_id,
                           gen_length=s.gen_length, steps=s.steps, block_length=s.block_length,
                           remasking=s.remasking, temperature=s.temperature, generator=generator,
                           shift=im.objective.shift).tolist()
    eos = im.tokenizer.eos_id
    return answer[:answer.index(eos)] if eos in answer else answer
