"""Training-step throughput of titan_mm on one GPU, beside HF transformers' baseline shape.

Random-init Qwen3-VL-2B shape (the flavor "2B"), one 8192-token sample with four 512 x 512 images
(the shape of ../shared/bench/hf_vlm_baseline.py), bf16 parameters + fused AdamW like the baseline,
no activation checkpointing. Prints a Markdown table; with --hf-json (the baseline's output from the
same job) the HF row and the ratio are added.

    python scripts/bench.py [--hf-json $OUT/hf_baseline.json] [--steps 8] [--compile both]
"""

import argparse
import json
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from titan_mm.data.batch import BatchShape  # noqa: E402
from titan_mm.data.dataloader import collate_rows  # noqa: E402
from titan_mm.data.documents import Document, Image  # noqa: E402
from titan_mm.data.image import patchify  # noqa: E402
from titan_mm.data.packing import RowShape, build_row  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.parallel.common import apply_compile  # noqa: E402

IMAGE_ID, START_ID, END_ID = 151655, 151652, 151653


def baseline_batch(args, spec, seq_len: int, n_images: int, side: int) -> dict:
    """One document laid out like the HF baseline's: images every 64 text tokens, random ids."""
    vi = args.vision_input
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(vi.temporal_patch_size, 3, side, side, generator=g)
    patches, coords = patchify(frames, vi.patch_size, vi.temporal_patch_size, vi.spatial_merge_size)
    merged = patches.shape[0] // vi.merge_area
    tokens = torch.randint(0, 150000, (seq_len,), generator=g).tolist()
    images, pos = [], 16
    for _ in range(n_images):
        tokens[pos - 1], tokens[pos + merged] = START_ID, END_ID
        tokens[pos:pos + merged] = [IMAGE_ID] * merged
        images.append(Image(patches, coords, first_token=pos))
        pos += merged + 64
    doc = Document("bench", tokens, [True] * seq_len, images)
    doc.positions = vi.positions_fn(doc) if vi.positions_fn else None
    shape = RowShape(seq_len, n_images, patches.shape[0], vi.patch_dim, vi.merge_area, 0, (IMAGE_ID,),
                     vi.position_dims)
    return collate_rows([build_row([doc], shape)], patches.shape[0] // vi.merge_area)


def bench(family: str, flavor: str, compile_blocks: bool, steps: int, warmup: int) -> dict:
    spec = get_model_spec(family)
    args = spec.flavors[flavor]
    batch = baseline_batch(args, spec, 8192, 4, 512)
    shape = BatchShape.of(batch)
    labels = batch.pop("labels").cuda()
    batch.pop("stats")
    inputs = {k: v.cuda() for k, v in batch.items()}
    with torch.device("meta"):
        model = spec.model_cls(args)
    if compile_blocks:
        for blocks in (model.vision.layers, model.decoder.layers):
            apply_compile(blocks)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    model.init_weights()
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        logits = model(**inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    flops = spec.training_flops(args, shape)
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt
    torch.cuda.empty_cache()
    return dict(name=f"titan_mm {family}/{flavor}" + (" compiled" if compile_blocks else " eager"),
                params_b=round(n_params / 1e9, 3), step_s=round(dt, 4), tokens_per_s=round(8192 / dt, 1),
                mfu_vs_989=round(flops / dt / 989e12, 3), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                loss=round(loss.item(), 4))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-json", default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    opts = parser.parse_args()
    rows = []
    if opts.hf_json:
        hf = json.load(open(opts.hf_json))
        for r in hf["runs"]:
            if r.get("model") == "qwen3-vl-2b-shape" and not r.get("grad_ckpt") and "error" not in r:
                rows.append(dict(name="HF transformers qwen3-vl-2b-shape", params_b=r["params_b"],
                                 step_s=r["step_s"], tokens_per_s=r["tokens_per_s"],
                                 mfu_vs_989=r["mfu_vs_989"], peak_mem_gib=r["peak_mem_gib"], loss=r["loss"]))
    modes = {"off": [False], "on": [True], "both": [False, True]}[opts.compile]
    for compiled in modes:
        try:
            rows.append(bench("qwen3_vl", "2B", compiled, opts.steps, opts.warmup))
        except Exception as e:  # a failed variant is a row, not a lost job
            rows.append(dict(name=f"qwen3_vl/2B compiled={compiled}", error=repr(e)[:300]))
        print(json.dumps(rows[-1]), flush=True)
    hf_tps = rows[0]["tokens_per_s"] if rows and rows[0]["name"].startswith("HF") else None
    print("\n| run | params (B) | step (s) | tokens/s | MFU (ViT counted, vs 989) | peak GiB | vs HF |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} |")
            continue
        ratio = f"{r['tokens_per_s'] / hf_tps:.2f}x" if hf_tps else "-"
        print(f"| {r['name']} | {r['params_b']} | {r['step_s']} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['mfu_vs_989']:.1f}% | {r['peak_mem_gib']} | {ratio} |")
    if opts.out:
        json.dump(rows, open(opts.out, "w"), indent=1)


if __name__ == "__main__":
    main()
