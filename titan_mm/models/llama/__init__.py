"""Llama 3.x / Qwen2.5 / Qwen3 language models (text only) on the shared batch layout."""

from titan_mm.models import ModelSpec
from titan_mm.models.llama.hf_adapter import LlamaAdapter
from titan_mm.models.llama.model import DecoderArgs, TextArgs, TextModel, training_flops
from titan_mm.models.llama.parallelize import parallelize_llama, tensor_parallel_sizes
from titan_mm.models.rope import Llama3RopeScaling


def _qwen3(dim: int, n_layers: int, n_heads: int, ffn_hidden_dim: int, tie: bool) -> DecoderArgs:
    return DecoderArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, head_dim=128,
                       ffn_hidden_dim=ffn_hidden_dim, vocab_size=151936, norm_eps=1e-6, rope_theta=1e6,
                       qk_norm=True, tie_embeddings=tie, max_position_embeddings=40960)


# tiny variants of each architecture: qk-norm + tied (Qwen3), llama3 rope scaling (Llama 3.1),
# qkv bias (Qwen2.5); "debug" learns the bundled captions on a laptop CPU in a minute
_DEBUG = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden_dim=768, vocab_size=512)

FLAVORS = {
    "debug": TextArgs(DecoderArgs(**_DEBUG, qk_norm=True, tie_embeddings=True)),
    # original context 64, so all three llama3 frequency bands occur at a head_dim of 64
    "debug-llama3": TextArgs(DecoderArgs(**_DEBUG, norm_eps=1e-5, rope_theta=500000.0,
                                         rope_scaling=Llama3RopeScaling(original_max_position_embeddings=64))),
    "debug-qwen2": TextArgs(DecoderArgs(**_DEBUG, rope_theta=1e6, qkv_bias=True)),
    "llama3.1-8b": TextArgs(DecoderArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_hidden_dim=14336,
        vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(),
        max_position_embeddings=131072)),
    "qwen2.5-7b": TextArgs(DecoderArgs(
        dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128, ffn_hidden_dim=18944,
        vocab_size=152064, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, max_position_embeddings=131072)),
    "qwen3-0.6b": TextArgs(_qwen3(1024, 28, 16, 3072, tie=True)),
    "qwen3-1.7b": TextArgs(_qwen3(2048, 28, 16, 6144, tie=True)),
    "qwen3-4b": TextArgs(_qwen3(2560, 36, 32, 9728, tie=True)),
    "qwen3-8b": TextArgs(_qwen3(4096, 36, 32, 12288, tie=False)),
    "qwen3-14b": TextArgs(_qwen3(5120, 40, 40, 17408, tie=False)),
    "qwen3-32b": TextArgs(_qwen3(5120, 64, 64, 25600, tie=False)),
}

SPEC = ModelSpec(name="llama", flavors=FLAVORS, model_cls=TextModel, parallelize=parallelize_llama,
                 training_flops=training_flops, hf_adapter=LlamaAdapter(),
                 tensor_parallel_sizes=tensor_parallel_sizes)
