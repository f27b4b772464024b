"""Generation from a trained model: incremental decoding with a KV cache, for every family.

The API (stable; scripts/generate.py, the evaluation harness and the server call it)::

    from titan_mm.generate import (Sampling, chat_prompt, completion_text, generate, generate_stream,
                                   load_model_for_inference, text_prompt)

    im = load_model_for_inference(cfg, checkpoint="outputs/run/checkpoint/model-step-300")
    #   cfg: a JobConfig (model.name / flavor / tokenizer_path, objective, data.chat_format);
    #   or hf_path="folder" for an HF folder; device="cuda", dtype=torch.bfloat16;
    #   chat_format="qwen2_vl" to override data.chat_format
    prompt = chat_prompt(im, [{"role": "user", "content": [
        {"type": "image", "image": "a.jpg"},          # a path (relative to media_root) or bytes
        {"type": "video", "video": "clip.mp4"},       # Qwen families
        {"type": "text", "text": "What is in the picture?"}]}], media_root=".")
    #   or text_prompt(im, "a plain continuation", media_root) / text_prompt(im, [parts...])
    ids = generate(im, [prompt, other_prompt], Sampling(max_new_tokens=64))  # list[list[int]]
    #   generate(..., cuda_graph=True) replays the decode step as a CUDA graph
    text = completion_text(im.tokenizer, ids[0], sampling.stop_strings)
    for step_tokens in generate_stream(im, [prompt], sampling):   # one list per decode step:
        token = step_tokens[0]                                     # an id, or None once stopped

``Sampling``: max_new_tokens, temperature (0 = greedy), top_k, top_p, stop_token_ids (default: eos
and the chat format's turn end), stop_strings, seed. Stop tokens are not part of the output; the
token that completes a stop string is. Prompts of a batch may differ in length and media (left
padding): batched output equals one-at-a-time output. Generations may share one InferenceModel
(threads of a server, or streams consumed in turn): each has its own cache, attached to the model
for one forward at a time under ``im.lock``.

Pieces: ``kv_cache.py`` (the cache, attached to the decoder through its ``build_mask`` and
``attend`` hooks, so model code is unchanged), ``decode.py`` (prompt batch, prefill, decode
loop), ``sampling.py``, ``load.py`` (weights from DCP or HF, tokenizer, prompt builders).
docs/generation.md has the design and the measurements.
"""

from titan_mm.generate.decode import generate, generate_stream, prompt_batch
from titan_mm.generate.kv_cache import KVCache
from titan_mm.generate.load import InferenceModel, chat_prompt, load_model_for_inference, text_prompt
from titan_mm.generate.sampling import Sampling, completion_text, next_tokens

__all__ = ["InferenceModel", "KVCache", "Sampling", "chat_prompt", "completion_text", "generate",
           "generate_stream", "load_model_for_inference", "next_tokens", "prompt_batch", "text_prompt"]
