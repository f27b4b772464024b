"""How the Llama / Qwen text family is parallelized: tensor parallelism, then activation checkpointing,
then compile, then FSDP2."""

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_mm.config import ActivationCheckpoint, Compile
from titan_mm.models.llama.model import TextModel
from titan_mm.parallel.common import apply_activation_checkpointing, apply_compile, apply_fsdp, fsdp_mesh
from titan_mm.parallel.parallel_dims import ParallelDims
from titan_mm.parallel.sequence import apply_sequence_parallel
from titan_mm.parallel.tensor_parallel import apply_tp_decoder


def parallelize_llama(model: TextModel, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                      compile_cfg: Compile, ac_cfg: ActivationCheckpoint, param_dtype: torch.dtype):
    apply_sequence_parallel(model.decoder, mesh, parallel_dims)
    blocks = model.decoder.layers
    if parallel_dims.tp_enabled:
        apply_tp_decoder(blocks, mesh["tp"], model.args.decoder.qk_norm)
    if ac_cfg.mode == "full":
        apply_activation_checkpointing(blocks)
    if compile_cfg.enable:
        apply_compile(blocks)
    if parallel_dims.fsdp_enabled:
        apply_fsdp(list(blocks.values()), model, fsdp_mesh(mesh, parallel_dims.dp_replicate), param_dtype)
    return model


def tensor_parallel_sizes(args, cfg) -> dict[str, int]:
    """What tensor parallelism splits: heads, MLP units, and the sequence (sequence parallelism)."""
    d = args.decoder
    return {"decoder n_heads": d.n_heads, "decoder n_kv_heads": d.n_kv_heads,
            "decoder ffn_hidden_dim": d.ffn_hidden_dim, "training.seq_len": cfg.training.seq_len}
