"""How the Llama / Qwen text family is parallelized: tensor parallelism, then activation checkpointing,
then compile, then FSDP2."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.llama.model import TextModel
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_mm.parallel.common import apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import apply_tp_decoder, apply_tp_embeddings_and_head


def parallelize_llama(model: TextModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                      compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype):
    apply_sequence_parallel(model, mesh, parallel_dims)
    blocks = model.decoder.layers
    if parallel_dims.tp_enabled:
        apply_tp_decoder(blocks, mesh["tp"], model.args.decoder.qk_norm)
        apply_tp_embeddings_and_head(model.decoder, mesh["tp"])
    apply_activation_checkpointing(blocks, ac_cfg)
    if compile_cfg.enable:
        apply_compile(blocks)
    if parallel_dims.fsdp_enabled:
        apply_fsdp(list(blocks.values()), model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model


def tensor_parallel_sizes(args, cfg) -> dict[str, int]:
    """What tensor parallelism splits: heads, MLP units, the vocabulary (embeddings and output head)
    and the sequence (sequence parallelism)."""
    d = args.decoder
    return {"decoder n_heads": d.n_heads, "decoder n_kv_heads": d.n_kv_heads,
            "decoder ffn_hidden_dim": d.ffn_hidden_dim, "decoder vocab_size": d.vocab_size,
            "training.seq_len": cfg.training.seq_len}


def vlm_tensor_parallel_sizes(args, cfg) -> dict[str, int]:
    """A vision-language model's: the decoder's, plus the ViT's heads, MLP units and patch slots
    (its sequence)."""
    return {**tensor_parallel_sizes(args, cfg), "vision n_heads": args.vision.n_heads,
            "vision ffn_hidden_dim": args.vision.ffn_hidden_dim,
            "data.patches_per_slot": cfg.data.patches_per_slot}
