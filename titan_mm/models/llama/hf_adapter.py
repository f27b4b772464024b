"""HF checkpoints of LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM <-> titan_mm's TextModel.

The decoder's key map and config translation are also used by the LLaVA family, whose language
model is the same decoder under another prefix.
"""

from dataclasses import asdict

from titan_mm.hf.adapter import HFAdapter
from titan_mm.models.llama.model import DecoderArgs, TextArgs
from titan_mm.models.rope import Llama3RopeScaling, RopeScaling, YarnRopeScaling

_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "q_norm": "q_norm",
              "k_norm": "k_norm"}
_FEED_FORWARD = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def decoder_key_map(hf_prefix: str, lm_head: str = "lm_head") -> list[tuple[str, str]]:
    """(titan_mm regex, HF template) pairs for a Decoder stored under ``decoder.``."""
    layer = r"decoder\.layers\.(?P<i>\d+)\."
    hf_layer = hf_prefix + "layers.{i}."
    key_map = [(r"decoder\.tok_embeddings\.weight", hf_prefix + "embed_tokens.weight"),
               (r"decoder\.norm\.weight", hf_prefix + "norm.weight"),
               (r"decoder\.output\.weight", lm_head + ".weight"),
               (layer + r"attention_norm\.weight", hf_layer + "input_layernorm.weight"),
               (layer + r"ffn_norm\.weight", hf_layer + "post_attention_layernorm.weight")]
    key_map += [(layer + rf"attention\.{ours}\.(?P<p>weight|bias)", hf_layer + f"self_attn.{theirs}.{{p}}")
                for ours, theirs in _ATTENTION.items()]
    key_map += [(layer + rf"feed_forward\.{ours}\.weight", hf_layer + f"mlp.{theirs}.weight")
                for ours, theirs in _FEED_FORWARD.items()]
    return key_map


def hf_model_type(d: DecoderArgs) -> str:
    if d.mrope_section is not None:
        raise ValueError("a decoder with M-RoPE belongs to a Qwen-VL checkpoint, not a text-only one")
    if d.qk_norm and d.qkv_bias:
        raise ValueError("q/k norm with qkv bias has no HF text architecture (Qwen3's attention_bias "
                         "would also add an o_proj bias)")
    return "qwen3" if d.qk_norm else "qwen2" if d.qkv_bias else "llama"


def decoder_hf_config(d: DecoderArgs) -> dict:
    """The text config.json of a Decoder (Llama, Qwen2 or Qwen3 by its options), in the
    rope_theta / rope_scaling form that transformers 4.x and 5.x both read."""
    model_type = hf_model_type(d)
    config = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": d.dim, "num_hidden_layers": d.n_layers, "num_attention_heads": d.n_heads,
        "num_key_value_heads": d.n_kv_heads, "head_dim": d.head_dim, "intermediate_size": d.ffn_hidden_dim,
        "vocab_size": d.vocab_size, "hidden_act": "silu", "rms_norm_eps": d.norm_eps,
        "rope_theta": d.rope_theta, "max_position_embeddings": d.max_position_embeddings,
        "rope_scaling": rope_scaling_to_hf(d.rope_scaling),
        "tie_word_embeddings": d.tie_embeddings,
    }
    if model_type != "qwen2":
        config["attention_bias"] = False
    return config


def decoder_args_from_hf_config(c: dict) -> DecoderArgs:
    model_type = c.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not a Llama / Qwen2 / Qwen3 text model; "
                         f"supported: {sorted(_ARCHITECTURES)}")
    unsupported = {"hidden_act": c.get("hidden_act", "silu") != "silu",
                   "attention_bias": model_type != "qwen2" and c.get("attention_bias", False),
                   "mlp_bias": c.get("mlp_bias", False),
                   "use_sliding_window": c.get("use_sliding_window", False)}
    if any(unsupported.values()):
        raise ValueError(f"{model_type} config sets {[k for k, v in unsupported.items() if v]}, which "
                         f"titan_mm's decoder does not implement")
    # transformers 5 writes rope_parameters; 4.x and the hub's configs rope_theta + rope_scaling
    rope = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 10000.0),
                                        **(c.get("rope_scaling") or {})}
    return DecoderArgs(
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        ffn_hidden_dim=c["intermediate_size"], vocab_size=c["vocab_size"], norm_eps=c["rms_norm_eps"],
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=rope_scaling_from_hf(rope, c.get("max_position_embeddings", 4096)),
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        tie_embeddings=c.get("tie_word_embeddings", False))


def rope_scaling_from_hf(rope: dict, max_position_embeddings: int) -> RopeScaling | None:
    """The scaling an HF rope_parameters / rope_scaling dict describes (old configs name the type
    "type"; Qwen-VL's "mrope" is plain RoPE), or None; a kind titan_mm lacks is refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", "mrope"):
        return None
    unsupported = [k for k in ("mscale", "mscale_all_dim") if rope.get(k)]
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported.append("partial_rotary_factor")
    if unsupported:
        raise ValueError(f"rope parameters {unsupported} are not implemented")
    # transformers falls back to max_position_embeddings as the pretraining length
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    if rope_type == "llama3":
        return Llama3RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                 high_freq_factor=rope["high_freq_factor"],
                                 original_max_position_embeddings=original)
    if rope_type == "yarn":
        return YarnRopeScaling(factor=rope["factor"], original_max_position_embeddings=original,
                               beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0,
                               attention_factor=rope.get("attention_factor"), truncate=rope.get("truncate", True))
    raise ValueError(f"rope_type {rope_type!r} is not implemented; titan_mm supports default, llama3 and yarn")


def rope_scaling_to_hf(scaling: RopeScaling | None) -> dict | None:
    """The rope_scaling entry of config.json (transformers 4.x and 5.x both read it)."""
    if scaling is None:
        return None
    if isinstance(scaling, Llama3RopeScaling):
        return {"rope_type": "llama3", **asdict(scaling)}
    fields = {k: v for k, v in asdict(scaling).items() if v is not None}
    return {"rope_type": "yarn", **fields}


class LlamaAdapter(HFAdapter):
    key_map = decoder_key_map("model.")

    def hf_config(self, args: TextArgs) -> dict:
        return decoder_hf_config(args.decoder)

    def args_from_hf_config(self, config: dict) -> TextArgs:
        return TextArgs(decoder_args_from_hf_config(config))
