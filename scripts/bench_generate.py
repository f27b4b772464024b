"""Greedy decoding speed of titan_mm.generate beside transformers' ``generate``, same weights.

    python scripts/bench_generate.py --flavor 2B --device cuda --out OUT_DIR          # one GPU, bf16
    python scripts/bench_generate.py --flavor debug --device cpu --new_tokens 16 --out OUT_DIR

A random-init Qwen3-VL of ``--flavor``'s shape (transformers' Qwen3VLForConditionalGeneration from
the config our adapter writes; its weights copied into our model through the adapter), in bf16 on
cuda or fp32 on cpu. Each prompt is one image (``--image_size`` px square, random pixels) and a
line of text, written in the bundled tokenizer's ids; a batch repeats it. For each batch size both
generate exactly ``--new_tokens`` tokens (no stop token), after one warm-up run (on cuda titan_mm
also with its decode step replayed as a CUDA graph), and each is timed
twice: the whole generation and the prefill alone (one new token), so

    decode tokens/s = batch x (new_tokens - 1) / (time(new_tokens) - time(1))

Prints a Markdown table and writes it as JSON to OUT_DIR/bench_generate_FLAVOR_DEVICE.json, with
how many of batch 1's greedy tokens agree between the two (bf16 sums in other orders may part
ways after a near tie; fp32 tests show them equal, tests/test_generate.py).
"""

import argparse
import dataclasses
import inspect
import io
import json
import os
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from titan_mm.data.chat import ChatDocumentBuilder  # noqa: E402
from titan_mm.data.documents import DocumentBuilder  # noqa: E402
from titan_mm.data.image import ImageProcessor  # noqa: E402
from titan_mm.data.tokenizer import Tokenizer  # noqa: E402
from titan_mm.generate import InferenceModel, Sampling, generate, text_prompt  # noqa: E402
from titan_mm.hf.io import load_hf_state_dict  # noqa: E402
from titan_mm.models.qwen3_vl import SPEC  # noqa: E402
from titan_mm.objectives.causal_lm import CausalLM  # noqa: E402

PROMPT = "Describe the picture in detail: the objects, their colours and where they are."


def build_models(flavor: str, device: str, dtype: torch.dtype, tok: Tokenizer):
    """(transformers model, our model, args), both with the same random weights."""
    import transformers
    # the bundled tokenizer's placeholder ids, so that both models read the same prompts
    args = dataclasses.replace(SPEC.flavors[flavor], image_token_id=tok.image_id, video_token_id=-1,
                               vision_start_token_id=tok.image_start_id, vision_end_token_id=tok.image_end_id)
    config = transformers.AutoConfig.for_model(**SPEC.hf_adapter.hf_config(args))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    with torch.device("meta"):
        ours = SPEC.model_cls(args)
    ours.to_empty(device=device)
    ours.init_weights()  # the rotary tables; every parameter is overwritten below
    load_hf_state_dict(ours, SPEC.hf_adapter, hf_state_dict(hf))
    for param in ours.parameters():
        param.data = param.data.to(dtype)
    return hf, ours.eval(), args


def hf_state_dict(hf) -> dict:
    """The tensors under the names save_pretrained writes (transformers >= 5.20 renames some in
    memory; earlier releases keep them)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return hf.state_dict()
    return revert_weight_conversion(hf, hf.state_dict())


def prompt_document(im: InferenceModel, image_size: int):
    pixels = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    return text_prompt(im, [{"type": "image", "image": png.getvalue()}, {"type": "text", "text": PROMPT}])


def hf_inputs(hf, doc, batch: int, image_id: int, device: str) -> dict:
    ids = torch.tensor([doc.tokens] * batch)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
              "pixel_values": torch.cat([m.patches for m in doc.images] * batch).to(device),
              "image_grid_thw": torch.tensor([m.grid for m in doc.images] * batch).to(device)}
    # transformers >= 5.2x places M-RoPE by token type; earlier releases find the image tokens by id
    if "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters:
        inputs["mm_token_type_ids"] = (ids == image_id).long().to(device)
    return inputs


def timed(fn, device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="2B", help="a qwen3_vl flavor (2B; debug on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", default="1,16")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--image_size", type=int, default=448)
    p.add_argument("--min_pixels", type=int, default=32 * 32)
    p.add_argument("--max_pixels", type=int, default=1024 * 1024)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of the JSON file")
    opts = p.parse_args(argv)
    dtype = torch.bfloat16 if opts.device.startswith("cuda") else torch.float32
    tok = Tokenizer("assets/tokenizer", SPEC.special_tokens)
    hf, model, args = build_models(opts.flavor, opts.device, dtype, tok)
    spec = args.vision_input
    processor = ImageProcessor(spec, opts.min_pixels, opts.max_pixels)
    im = InferenceModel(model, args, tok, CausalLM(vocab_parallel=False, loss_parallel=False),
                        DocumentBuilder(tok, processor, spec.positions_fn),
                        ChatDocumentBuilder(tok, processor, "plain", spec.positions_fn), source="random init")
    doc = prompt_document(im, opts.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"qwen3_vl/{opts.flavor}: {n_params / 1e6:.1f}M parameters, {opts.device} {dtype}, prompt of "
          f"{len(doc.tokens)} tokens ({doc.images[0].patches.shape[0]} patches), {opts.new_tokens} new tokens")

    def ours(batch: int, n: int, cuda_graph: bool = False):
        return generate(im, [doc] * batch, Sampling(max_new_tokens=n, stop_token_ids=()), cuda_graph=cuda_graph)

    def ours_graphed(batch: int, n: int):
        return ours(batch, n, cuda_graph=True)

    def theirs(batch: int, n: int):
        inputs = hf_inputs(hf, doc, batch, tok.image_id, opts.device)
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_id)
        return out[:, len(doc.tokens):].tolist()

    rows, first_tokens = [], {}
    for batch in [int(b) for b in opts.batch_sizes.split(",")]:
        impls = [("titan_mm", ours), ("transformers", theirs)]
        if opts.device.startswith("cuda"):
            impls.insert(1, ("titan_mm + CUDA graph", ours_graphed))
        for name, fn in impls:
            try:
                fn(batch, 4)  # warm-up: kernels, allocator
                total, tokens = timed(lambda: fn(batch, opts.new_tokens), opts.device)
                prefill, _ = timed(lambda: fn(batch, 1), opts.device)
            except Exception as e:  # one implementation failing still leaves the others' numbers
                print(f"{name} at batch {batch} failed: {type(e).__name__}: {e}")
                rows.append({"impl": name, "batch": batch, "error": f"{type(e).__name__}: {e}"})
                continue
            decode_tps = batch * (opts.new_tokens - 1) / max(total - prefill, 1e-9)
            rows.append({"impl": name, "batch": batch, "new_tokens": opts.new_tokens, "prefill_s": prefill,
                         "total_s": total, "decode_tokens_per_s": decode_tps,
                         "end_to_end_tokens_per_s": batch * opts.new_tokens / total})
            if batch == 1:
                first_tokens[name] = tokens[0]
    eager, hf_tokens = first_tokens.get("titan_mm", []), first_tokens.get("transformers", [])
    agree = next((i for i, (a, b) in enumerate(zip(eager, hf_tokens)) if a != b), min(len(eager), len(hf_tokens)))
    graph_equal = first_tokens.get("titan_mm + CUDA graph", eager) == eager
    print("| impl | batch | prefill s | total s | decode tokens/s | end-to-end tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['batch']} | failed | | | |")
            continue
        print(f"| {r['impl']} | {r['batch']} | {r['prefill_s']:.3f} | {r['total_s']:.2f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['end_to_end_tokens_per_s']:.1f} |")
    print(f"batch 1: the first {agree} of {opts.new_tokens} greedy tokens agree with transformers; "
          f"CUDA graph tokens {'equal' if graph_equal else 'DIFFER FROM'} eager ones")
    result = {"flavor": opts.flavor, "device": torch.cuda.get_device_name() if opts.device.startswith("cuda")
              else "cpu", "dtype": str(dtype), "torch": torch.__version__, "prompt_tokens": len(doc.tokens),
              "rows": rows, "batch1_tokens_agree": agree,
              "cuda_graph_tokens_equal_eager": graph_equal}
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, f"bench_generate_{opts.flavor}_{opts.device.split(':')[0]}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
