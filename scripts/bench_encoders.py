"""Throughput of the CLIP and DINOv2 encoders on one device, beside transformers' same models.

For each encoder at Cambrian's image size (CLIP-L/14 at 336, DINOv2-L/14 and -g/14 at 378), random
init, bf16 parameters: a training step's forward + backward (the encoder trained) and a forward
under no_grad (the encoder frozen), eager and with each block compiled; HF's CLIPVisionModel /
Dinov2Model of the same config (SDPA attention, hidden_states[-2] / last_hidden_state read) when
transformers is installed. FLOPs are ``args.flops_per_image`` (x3 for a training step) over the
blocks each side runs. Prints a Markdown table and writes results.json to the output folder.

    python scripts/bench_encoders.py OUT_DIR [--device cuda] [--batch 32] [--steps 10]
    python scripts/bench_encoders.py OUT_DIR --device cpu --tiny     # debug flavors, a smoke test
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402

from titan_mm.models.clip import FLAVORS as CLIP_FLAVORS  # noqa: E402
from titan_mm.models.clip.hf_adapter import clip_hf_config  # noqa: E402
from titan_mm.models.clip.model import CLIPVisionEncoder  # noqa: E402
from titan_mm.models.dinov2 import FLAVORS as DINOV2_FLAVORS  # noqa: E402
from titan_mm.models.dinov2.hf_adapter import dinov2_hf_config  # noqa: E402
from titan_mm.models.dinov2.model import Dinov2Encoder  # noqa: E402
from titan_mm.parallel.common import apply_compile  # noqa: E402
from titan_mm.train.metrics import device_peak_tflops  # noqa: E402

# (name, our class, args, image side): what Cambrian feeds each
REAL = [("clip-vit-l-14-336", CLIPVisionEncoder, CLIP_FLAVORS["vit-l-14-336"], 336),
        ("dinov2-vit-l-14", Dinov2Encoder, DINOV2_FLAVORS["vit-l-14"], 378),
        ("dinov2-vit-g-14", Dinov2Encoder, DINOV2_FLAVORS["vit-g-14"], 378)]
TINY = [("clip-debug", CLIPVisionEncoder, CLIP_FLAVORS["debug"], 64),
        ("dinov2-debug", Dinov2Encoder, DINOV2_FLAVORS["debug"], 56)]


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def ours(model_cls, args, device, compile_blocks: bool):
    with torch.device("meta"):
        model = model_cls(args)
    model.to_empty(device=device)
    model.init_weights()
    model.to(torch.bfloat16)
    if compile_blocks:
        apply_compile(model.layers)
    return model, lambda x: model(x)[0]


def hf(model_cls, args, device):
    import transformers
    config = (clip_hf_config if model_cls is CLIPVisionEncoder else dinov2_hf_config)(
        dataclasses.replace(args, select_layer=-1))
    hf_cls = getattr(transformers, config["architectures"][0])
    model = hf_cls(hf_cls.config_class(**config, attn_implementation="sdpa")).to(device, torch.bfloat16)
    if model_cls is CLIPVisionEncoder:  # the penultimate hidden state, as our flavor reads
        return model, lambda x: model(pixel_values=x, output_hidden_states=True).hidden_states[args.select_layer]
    return model, lambda x: model(pixel_values=x).last_hidden_state


def measure(model, features, x, steps, warmup, device) -> dict:
    def train_step():
        features(x).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def frozen():
        features(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"train_s": timed(train_step, steps, warmup, device), "frozen_s": timed(frozen, steps, warmup, device)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=32, help="images a step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="debug flavors (CPU smoke test)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' models")
    opts = p.parse_args()
    device = torch.device(opts.device)
    peak = device_peak_tflops(0.0) if device.type == "cuda" else 0.0
    rows = []
    for name, model_cls, args, side in TINY if opts.tiny else REAL:
        x = torch.randn(opts.batch, 3, side, side, device=device, dtype=torch.bfloat16)
        flops = args.flops_per_image(side, side) * opts.batch
        impls = [("titan_mm eager", lambda: ours(model_cls, args, device, False)),
                 ("titan_mm compiled", lambda: ours(model_cls, args, device, True))]
        if not opts.no_hf:
            impls.append(("HF transformers", lambda: hf(model_cls, args, device)))
        for impl, build in impls:
            model, features = build()
            r = measure(model, features, x, opts.steps, opts.warmup, device)
            r.update(encoder=name, impl=impl, side=side, batch=opts.batch, blocks=args.layers_built,
                     train_images_s=opts.batch / r["train_s"], frozen_images_s=opts.batch / r["frozen_s"],
                     train_tflops=3 * flops / r["train_s"] / 1e12, frozen_tflops=flops / r["frozen_s"] / 1e12)
            if peak:
                r.update(train_mfu=r["train_tflops"] / peak, frozen_mfu=r["frozen_tflops"] / peak)
            rows.append(r)
            del model, features
            if device.type == "cuda":
                torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, bf16, {opts.batch} images a step\n")
    print("| encoder | impl | train img/s | train TFLOP/s | train MFU | frozen img/s | frozen MFU | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = lambda k: f"{r[k]:.1%}" if k in r else "-"  # noqa: E731
        print(f"| {r['encoder']} @{r['side']} | {r['impl']} | {r['train_images_s']:.1f} | {r['train_tflops']:.1f} "
              f"| {mfu('train_mfu')} | {r['frozen_images_s']:.1f} | {mfu('frozen_mfu')} "
              f"| {r.get('peak_gib', float('nan')):.1f} |")
    os.makedirs(opts.out_dir, exist_ok=True)
    with open(os.path.join(opts.out_dir, "results.json"), "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
