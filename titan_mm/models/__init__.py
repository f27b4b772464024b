"""Model families. Each folder holds single-device model code; ``ModelSpec`` says how to build,
parallelize and count FLOPs for one family."""

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from titan_mm.config import ConfigError


@dataclass(frozen=True)
class ParamPolicy:
    """How a family's parameters are grouped for training (titan_mm/train/param_groups.py)."""

    module_groups: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"decoder": ("decoder",)})
    """Module group (what training.freeze and optimizer.lr_multipliers name) -> the parameter-name
    prefixes it covers; the longest matching prefix decides."""
    matrix_modules: tuple[type[nn.Module], ...] = (nn.Linear,)
    """Modules whose ``weight`` is a weight matrix (weight decay; Muon inside transformer blocks).
    Every other parameter (norms, biases, embeddings, position tables) has no weight decay."""


@dataclass
class ModelSpec:
    name: str
    flavors: dict
    """Size presets: flavor name -> the family's args dataclass."""
    model_cls: type[nn.Module]
    parallelize: Callable
    """parallelize(model, parallel_dims, mesh, compile_cfg, ac_cfg, param_dtype) -> model."""
    training_flops: Callable
    """training_flops(args, BatchShape) -> FLOPs of one step."""
    hf_adapter: object = None
    """An titan_mm.hf.adapter.HFAdapter for HF checkpoint conversion, or None."""
    special_tokens: dict = field(default_factory=dict)
    """Tokenizer special-token names this family uses (see data.tokenizer.Tokenizer)."""
    tensor_parallel_sizes: Callable | None = None
    """tensor_parallel_sizes(args, job_config) -> {name: size} of everything tensor parallelism
    splits (each must divide by the tp degree); None = the family has no tensor parallelism."""
    pipeline_first_stage_layers: Callable | None = None
    """pipeline_first_stage_layers(args) -> how many leading decoder layers the first pipeline stage
    must hold (Qwen3-VL adds DeepStack vision features after them); None = 1."""
    param_policy: ParamPolicy = field(default_factory=ParamPolicy)
    """Module groups and weight-matrix modules of the family."""


def get_model_spec(name: str) -> ModelSpec:
    # imported lazily so a family's dependencies load only when it is used
    if name == "llava":
        from titan_mm.models.llava import SPEC
        return SPEC
    if name == "llama":
        from titan_mm.models.llama import SPEC
        return SPEC
    if name == "qwen2_5_vl":
        from titan_mm.models.qwen2_5_vl import SPEC
        return SPEC
    if name == "qwen3_vl":
        from titan_mm.models.qwen3_vl import SPEC
        return SPEC
    if name == "cambrian":
        from titan_mm.models.cambrian import SPEC
        return SPEC
    raise ConfigError(f"unknown model.name {name!r}; available: ['llava', 'llama', 'qwen2_5_vl', 'qwen3_vl', "
                      f"'cambrian']")
