"""Training objectives: what a model learns to predict from its final hidden states.

Every model's forward returns final hidden states (after the final norm). An ``Objective``, built
once from the ``[objective]`` config and the parallel layout, owns the rest (docs/objectives.md):

- ``prepare``: host work on a loader batch (whole rows, before sequence sharding): the inputs the
  model sees (MDLM masks tokens) and the loss targets ``targets`` [B, 2, S] (label, weight of each
  token) with ``loss_tokens`` [B, S], the tokens the loss is normalised by;
- ``causal``: the decoder's attention, causal or bidirectional within each document;
- ``loss``: the output head and the weighted cross-entropy, chunked, or vocabulary-parallel under
  tensor parallelism.

The trainer divides each token's weight by the number of ``loss_tokens`` of the global batch
(summed over data-parallel, sequence-parallel and pipeline ranks and microbatches) before the
forward, so the plain, tensor-parallel and pipeline paths all call ``loss`` the same way and need
no further scaling.
"""

import dataclasses

from titan_mm.config import ConfigError, JobConfig
from titan_mm.config import Objective as ObjectiveConfig
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.objectives.base import Objective


def build_objective(cfg: ObjectiveConfig, tokenizer: Tokenizer, *, vocab_parallel: bool,
                    loss_parallel: bool) -> Objective:
    """The objective ``cfg.name`` names; ``vocab_parallel``: the output head is split over the
    vocabulary (tensor parallelism); ``loss_parallel``: the loss runs on those slices."""
    if cfg.name == "causal_lm":
        from titan_mm.objectives.causal_lm import CausalLM
        return CausalLM(vocab_parallel=vocab_parallel, loss_parallel=loss_parallel)
    if cfg.name == "mdlm":
        from titan_mm.objectives.mdlm import MDLM
        vocab = tokenizer.vocab_size
        objective = MDLM(cfg, tokenizer.add_special_token(cfg.mask_token), vocab_parallel=vocab_parallel,
                         loss_parallel=loss_parallel)
        objective.added_tokens = tokenizer.vocab_size > vocab
        return objective
    raise ConfigError(f"unknown objective.name {cfg.name!r}; choose causal_lm or mdlm")


VOCAB_MULTIPLE = 64
"""A grown vocabulary is rounded up to a multiple of this (tensor parallelism splits it)."""


def args_for_objective(model_args, objective: Objective, tokenizer: Tokenizer):
    """The family's args with the decoder attention ``objective`` needs, and, when the objective
    added a token (MDLM's mask token) that the embedding has no row for, a vocabulary grown to hold
    it (new rows are initialised like the others; an HF export records the grown size)."""
    decoder = dataclasses.replace(model_args.decoder, causal=objective.causal)
    if objective.added_tokens and tokenizer.vocab_size > decoder.vocab_size:
        vocab = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        decoder = dataclasses.replace(decoder, vocab_size=vocab)
    return dataclasses.replace(model_args, decoder=decoder)


def objective_setup(cfg: JobConfig) -> tuple[Tokenizer, Objective, object]:
    """For one process outside the trainer (seed checkpoints, evaluation, sampling): the
    tokenizer, the objective and the model args that the trainer builds for ``cfg``."""
    from titan_mm.models import get_model_spec
    spec = get_model_spec(cfg.model.name)
    tokenizer = Tokenizer(cfg.model.tokenizer_path, spec.special_tokens)
    objective = build_objective(cfg.objective, tokenizer, vocab_parallel=False, loss_parallel=False)
    return tokenizer, objective, args_for_objective(spec.flavors[cfg.model.flavor], objective, tokenizer)
