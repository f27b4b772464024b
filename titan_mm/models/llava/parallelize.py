"""How the LLaVA family is parallelized: the shared vision-language order
(titan_mm/parallel/vision_language.py) with the SigLIP2 ViT plan; each ViT block is an FSDP unit."""

import functools

from titan_mm.parallel.tensor_parallel import apply_tp_vision
from titan_mm.parallel.vision_language import parallelize_vision_language

parallelize_llava = functools.partial(
    parallelize_vision_language, apply_tp_vision=apply_tp_vision,
    vision_fsdp_units=lambda vision: list(vision.layers.values()),
    # the projector runs per image token: the sequence-parallel ranks split it with the ViT
    vision_output=lambda model: model.projector)
