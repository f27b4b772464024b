"""Training-step throughput of titan_mm on one GPU, beside HF transformers' baseline shape.

Random-init Qwen3-VL-2B shape (the flavor "2B"), one 8192-token sample with four 512 x 512 images
(the shape of ../shared/bench/hf_vlm_baseline.py), bf16 parameters + fused AdamW like the baseline,
no activation checkpointing by default; the loss goes through the trainer's path (chunked output
head + cross-entropy). Prints a Markdown table; with --hf-json (the baseline's output from the same
job) the HF row and the ratio are added.

    python scripts/bench.py [--hf-json $OUT/hf_baseline.json] [--backend varlen flex sdpa] \
        [--compile on|off|both] [--ac none full]
"""

import argparse
import json
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402

from titan_mm.data.batch import BatchShape  # noqa: E402
from titan_mm.data.dataloader import collate_rows  # noqa: E402
from titan_mm.data.documents import Document, Image  # noqa: E402
from titan_mm.data.image import patchify  # noqa: E402
from titan_mm.data.packing import RowShape, build_row  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.objectives.loss import linear_cross_entropy  # noqa: E402
from titan_mm.config import ActivationCheckpoint  # noqa: E402
from titan_mm.parallel.activation_checkpoint import apply_activation_checkpointing  # noqa: E402
from titan_mm.parallel.common import apply_compile  # noqa: E402
from titan_mm.train.cuda_graph import StepGraph  # noqa: E402
from train import with_attention_backend  # noqa: E402

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


def bench(family: str, flavor: str, compile_blocks: bool, steps: int, warmup: int, backend: str = "flex",
          ac: str = "none", seq_len: int = 8192, n_images: int = 4, side: int = 512,
          profile: str | None = None, skip_guards: bool = False, cuda_graph: bool = False,
          compile_mode: str | None = None) -> dict:
    """Train ``steps`` steps on one baseline-shaped batch; tokens/s, MFU, peak memory."""
    spec = get_model_spec(family)
    args = with_attention_backend(spec.flavors[flavor], backend)
    batch = baseline_batch(args, spec, seq_len, n_images, side)
    shape = BatchShape.of(batch)
    inputs = {k: v.cuda() for k, v in batch.items() if isinstance(v, torch.Tensor)}  # not stats, skips
    with torch.device("meta"):
        model = spec.model_cls(args)
    for blocks in (model.vision.layers, model.decoder.layers):
        apply_activation_checkpointing(blocks, ac_config(ac))
        if compile_blocks:
            apply_compile(blocks, compile_mode)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    model.init_weights()
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=cuda_graph)
    n_labels = int((inputs["labels"] != -100).sum())

    def step(inputs):
        # the trainer's path: final hidden states, then the output head + cross-entropy fused in chunks
        h = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = linear_cross_entropy(h.flatten(0, 1), model.decoder.head_weight(), inputs["labels"].flatten()) / n_labels
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # with a CUDA graph the memory of the step is allocated while it is captured (the call after
    # the warm-up): the peak counts from before that
    run = StepGraph(step, warmup) if cuda_graph else step
    if cuda_graph:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup + cuda_graph):
        run(inputs)
    if skip_guards:  # every graph exists now: check only the guards that tell cached graphs apart
        torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    torch.cuda.synchronize()
    if not cuda_graph:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = run(inputs)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    last_loss = loss.item()
    if profile:
        write_profile(lambda: run(inputs), profile)
    if skip_guards:
        torch.compiler.set_stance(skip_guard_eval_unsafe=False)
    flops = spec.training_flops(args, shape)
    n_params = sum(p.numel() for p in model.parameters())
    name = (f"titan_mm {family}/{flavor} {backend} {'compiled' if compile_blocks else 'eager'} ac={ac}"
            + (" skip-guards" if skip_guards else "") + (" cuda-graph" if cuda_graph else "")
            + (f" {compile_mode}" if compile_mode else "") + (f" {seq_len} tokens" if seq_len != 8192 else ""))
    return dict(name=name, family=family, flavor=flavor, backend=backend, compiled=compile_blocks, ac=ac,
                params_b=round(n_params / 1e9, 3), step_s=round(dt, 4), tokens_per_s=round(seq_len / dt, 1),
                mfu_vs_989=round(flops / dt / 989e12, 3),
                peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=round(last_loss, 4))


AC_MODES = ("none", "full", "op", "2")
BACKENDS = ("flex", "flex_flash", "varlen", "sdpa")


def ac_config(name: str) -> ActivationCheckpoint:
    """none | full | op (per-op selective) | k (every k-th block)."""
    if name in ("none", "full"):
        return ActivationCheckpoint(mode=name)
    return ActivationCheckpoint(mode="selective", selective_ac_option=name)


def write_profile(step, path: str):
    """One profiled step: GPU kernel time by kind, then the top kernels, as text at ``path``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    # kernels only: GPU-side ranges of user annotations (e.g. the optimizer's step) would count twice
    kernels = [e for e in prof.key_averages()
               if e.device_type.name == "CUDA" and e.self_device_time_total > 0 and not e.is_user_annotation]
    kinds: dict[str, float] = {}
    for e in kernels:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + e.self_device_time_total / 1e3
    with open(path, "w") as f:
        f.write(f"GPU kernel time: {sum(kinds.values()):.1f} ms\n")
        for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
            f.write(f"{kind:12s} {ms:8.1f} ms\n")
        f.write("\nkernels:\n")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:80]:
            f.write(f"{e.self_device_time_total / 1e3:8.2f} ms {e.count:6d}x  {kernel_kind(e.key):10s} {e.key[:150]}\n")


KERNEL_KINDS = (("matmul", ("nvjet", "gemm", "xmma", "cutlass_80", "cublas", "_mm_", "addmm", "bmm")),
                ("attention", ("flex", "flash", "fmha", "attention", "triton_tem")),
                ("optimizer", ("adam", "multi_tensor")),
                ("triton", ("triton_",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def hf_rows(path: str, model: str = "qwen3-vl-2b-shape", grad_ckpt: bool = False) -> list[dict]:
    """The baseline's row for ``model`` (with or without activation checkpointing) from
    hf_vlm_baseline.py's JSON."""
    rows = []
    for r in json.load(open(path))["runs"]:
        if r.get("model") == model and bool(r.get("grad_ckpt")) == grad_ckpt and "error" not in r:
            rows.append(dict(name=f"HF transformers {model}" + (" grad ckpt" if grad_ckpt else ""),
                             params_b=r["params_b"],
                             step_s=r["step_s"], tokens_per_s=r["tokens_per_s"], mfu_vs_989=r["mfu_vs_989"],
                             peak_mem_gib=r["peak_mem_gib"], loss=r["loss"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    hf_tps = next((r["tokens_per_s"] for r in rows if r["name"].startswith("HF")), None)
    lines = ["| run | params (B) | step (s) | tokens/s | MFU (ViT counted, vs 989) | peak GiB | vs HF |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |")
            continue
        ratio = f"{r['tokens_per_s'] / hf_tps:.2f}x" if hf_tps else "-"
        lines.append(f"| {r['name']} | {r['params_b']} | {r['step_s']} | {r['tokens_per_s']:,.0f} | "
                     f"{100 * r['mfu_vs_989']:.1f}% | {r['peak_mem_gib']} | {ratio} |")
    return "\n".join(lines)


def run_variant(**kwargs) -> dict:
    """bench(), with a failure recorded as a row instead of losing the job."""
    try:
        row = bench(**kwargs)
    except Exception as e:
        row = dict(name=f"titan_mm {kwargs}", error=repr(e)[:300], **{k: str(v) for k, v in kwargs.items()})
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-json", default=None)
    parser.add_argument("--hf-model", default="qwen3-vl-2b-shape", help="which baseline row to compare with")
    parser.add_argument("--hf-grad-ckpt", action="store_true", help="the baseline row with activation "
                        "checkpointing (compare with --ac full)")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens of the one sample")
    parser.add_argument("--images", type=int, default=4, help="images in the sample")
    parser.add_argument("--family", default="qwen3_vl")
    parser.add_argument("--flavor", default="2B")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", nargs="+", default=["flex"], choices=BACKENDS)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="on")
    parser.add_argument("--ac", nargs="+", default=["none"], choices=AC_MODES)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--skip-guards", action="store_true",
                        help="after warm-up, evaluate only the guards that tell compiled graphs apart")
    parser.add_argument("--cuda-graph", nargs="+", choices=["off", "on"], default=["off"],
                        help="capture the whole step as one CUDA graph")
    parser.add_argument("--compile-mode", nargs="+", default=["default"],
                        help="torch.compile modes to compare, e.g. default max-autotune-no-cudagraphs")
    parser.add_argument("--profile", default=None, help="write a kernel-time table of one step per "
                        "variant into this folder")
    opts = parser.parse_args()
    rows = hf_rows(opts.hf_json, opts.hf_model, opts.hf_grad_ckpt) if opts.hf_json else []
    modes = {"off": [False], "on": [True], "both": [False, True]}[opts.compile]
    for backend in opts.backend:
        for compiled in modes:
            for ac in opts.ac:
                for graph, mode in ((g, m) for g in opts.cuda_graph for m in opts.compile_mode):
                    profile = (f"{opts.profile}/{backend}_{'compiled' if compiled else 'eager'}_{ac}_graph{graph}_{mode}.txt"
                               if opts.profile else None)
                    rows.append(run_variant(family=opts.family, flavor=opts.flavor, compile_blocks=compiled,
                                            steps=opts.steps, warmup=opts.warmup, backend=backend, ac=ac,
                                            side=opts.side, seq_len=opts.seq_len, n_images=opts.images,
                                            profile=profile, skip_guards=opts.skip_guards,
                                            cuda_graph=graph == "on",
                                            compile_mode=None if mode == "default" else mode))
    print()
    print(markdown_table(rows))
    if opts.out:
        json.dump(rows, open(opts.out, "w"), indent=1)


if __name__ == "__main__":
    main()
