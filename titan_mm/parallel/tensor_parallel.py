"""Tensor parallelism with sequence parallelism for transformer blocks (torch.distributed.tensor.parallel).

Inside a block the residual stream is split along the sequence over the tp ranks: the norms run on
their sequence slice (SequenceParallel), attention and MLP all-gather it, split the heads / hidden
units (colwise in-projections), and reduce-scatter back to sequence slices (rowwise out-projection).
Between blocks the stream is whole on every tp rank, so the projector / mergers, image scattering,
DeepStack additions and the final norm stay single-device code with replicated weights (identical
inputs give identical gradients, so they need no reduction). The token embeddings and the output
head are split over the vocabulary (``apply_tp_embeddings_and_head``); with loss parallelism the
loss is computed on each rank's vocabulary slice of the logits (titan_mm/objectives/loss.py).

Family-specific ViT plans (Qwen2.5-VL, Qwen3-VL) live in the family's parallelize.py and use
``parallelize_block``. A LoRA layer (titan_mm/models/lora.py) in a plan gets its adapters split
with its base weight: colwise, lora_B by output rows and lora_A whole; rowwise, lora_A by input
columns and lora_B whole, its partial sums reduced with the base layer's.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from titan_mm.models.lora import LoRALinear


def apply_tp_decoder(blocks: nn.ModuleDict, tp_mesh: DeviceMesh, qk_norm: bool):
    """Llama / Qwen decoder blocks: forward(h, cos, sin, mask)."""
    plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    if qk_norm:
        # q/k norms act on this rank's heads (dim 2 of [B, S, heads, head_dim]); their replicated
        # weights get the sum of every rank's head-slice gradients
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    for block in blocks.values():
        parallelize_block(block, tp_mesh, plan, n_extra_inputs=3)


def apply_tp_vision(blocks: nn.ModuleDict, tp_mesh: DeviceMesh):
    """SigLIP2 ViT blocks: forward(x_NLD, mask); the sequence is the patch axis L."""
    plan = {
        "layer_norm1": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None),
                                        desired_input_layouts=(Replicate(), None)),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.out_proj": RowwiseParallel(output_layouts=Shard(1)),
        "layer_norm2": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
    }
    for block in blocks.values():
        parallelize_block(block, tp_mesh, plan, n_extra_inputs=1)


def qwen_vit_block_plan(mlp: dict) -> dict:
    """Qwen-VL ViT blocks (norm1, attn(x, cos, sin, mask) with q/k/v_proj and proj, norm2, mlp):
    sequence parallelism splits the patch axis L for the norms; attention runs on all L patches
    with its heads split; ``mlp`` maps the MLP's linears to Colwise / Rowwise(output Shard(1))."""
    return {
        "norm1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                   desired_input_layouts=(Replicate(), None, None, None)),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
        "norm2": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        **mlp,
    }


def apply_tp_embeddings_and_head(decoder: nn.Module, tp_mesh: DeviceMesh):
    """Token embeddings and output head split over the vocabulary (rows of both weights).

    The lookup gives each rank the rows of its vocabulary slice (zeros elsewhere) and all-reduces
    them. The final norm hands its output on as a replicated DTensor: the objective applies the
    head with F.linear on the output weight, or on the embedding table when tied (no module call,
    so no module hooks there), which gives each rank the logits of its vocabulary slice, a DTensor
    sharded on the last dim (titan_mm/objectives/loss.py). Modules a pipeline stage lacks are
    skipped.
    """
    plan = {}
    if decoder.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if decoder.output is not None:
        # splits output.weight by rows (vocabulary); its hooks would give the same sharded logits
        plan["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if decoder.norm is not None:
        plan["norm"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Replicate(),
                                           use_local_output=False)
    parallelize_module(decoder, tp_mesh, plan)


def parallelize_block(block: nn.Module, tp_mesh: DeviceMesh, plan: dict, n_extra_inputs: int):
    """Apply ``plan`` to a block whose forward takes the residual stream plus ``n_extra_inputs``
    tensors that are not split (rotary tables, masks)."""
    plan = {fqn: with_adapters(style) if isinstance(block.get_submodule(fqn), LoRALinear) else style
            for fqn, style in plan.items()}
    frozen = [name for name, p in block.named_parameters() if not p.requires_grad]
    parallelize_module(block, tp_mesh, plan)
    # SequenceParallel re-creates the norms' parameters trainable (torch 2.11 - 2.13): frozen
    # weights (LoRA's base model) stay frozen
    for name in frozen:
        block.get_parameter(name).requires_grad_(False)
    extra = (None,) * n_extra_inputs
    # the stream enters whole and leaves whole: cut it to this rank's sequence slice on the way in
    # (no communication), gather it on the way out
    parallelize_module(block, tp_mesh, PrepareModuleInput(
        input_layouts=(Replicate(), *extra), desired_input_layouts=(Shard(1), *extra), use_local_output=True))
    parallelize_module(block, tp_mesh, PrepareModuleOutput(
        output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))


class LoRAColwiseParallel(ColwiseParallel):
    """ColwiseParallel of a LoRALinear: weight, bias and lora_B split by output rows, lora_A
    replicated (each rank's B slice maps the whole A x to its output columns)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        # called for the layer ("") and each of its children
        _distribute_own_parameters(module, device_mesh, Replicate() if name == "lora_A" else Shard(0),
                                   self.src_data_rank)


class LoRARowwiseParallel(RowwiseParallel):
    """RowwiseParallel of a LoRALinear: weight and lora_A split by input columns, bias and lora_B
    replicated; B applied to A x's partial sums gives partial outputs, reduced with the base
    layer's."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name == "":
            super()._partition_linear_fn(name, module, device_mesh)
        elif name in ("lora_A", "lora_B"):
            _distribute_own_parameters(module, device_mesh, Shard(1) if name == "lora_A" else Replicate(),
                                       self.src_data_rank)


def with_adapters(style):
    """The LoRA form of a Colwise / Rowwise style, with the same layouts."""
    kinds = {ColwiseParallel: LoRAColwiseParallel, RowwiseParallel: LoRARowwiseParallel}
    if type(style) not in kinds:
        raise NotImplementedError(f"LoRA layers under tensor parallelism take ColwiseParallel or RowwiseParallel, "
                                  f"not {type(style).__name__}")
    return kinds[type(style)](input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                              use_local_output=style.use_local_output)


def _distribute_own_parameters(module: nn.Module, mesh: DeviceMesh, placement, src_data_rank):
    for name, param in module.named_parameters(recurse=False):
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad))
