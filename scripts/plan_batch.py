"""Choose the row budgets from the data: token padding, patch padding and activation memory of
S / N / L choices around a config's, on a sample of its data.

    python scripts/plan_batch.py --job.config_file train_configs/qwen3_vl_2b.toml \
        --data.path /data/train.jsonl [--section.key value ...] [--samples 300] [--memory-gib 40]

The sample is read by the trainer's own source and document builder (data.path, kind, chat
format, image bounds, tokenizer), and each choice is packed by the trainer's packer
(titan_mm/data/plan.py). Per choice it prints:
- token padding and patch padding (the vision encoder computes every N x L patch slot);
- documents and images per row, and the share of documents that fit no row (skipped as overlong);
- useful compute: the family's training FLOPs of the real tokens and patches over those of every
  slot (attention left out), i.e. what padding costs;
- activations: the memory of one microbatch's activations, estimated as below.

Activation estimate (bf16, 2 bytes a value; per token for decoder blocks, per patch slot for
vision blocks, padding included): without checkpointing a block keeps the input and the output
of each of its Linear layers (weight gradients need the inputs; attention, activation functions
and products keep the outputs); per-op selective checkpointing keeps the block input, the attention
output and every second matmul output; full checkpointing keeps each block's input, plus one
block's activations while it is recomputed; "k" = every k-th block fully checkpointed. Add one loss
chunk of logits and their gradient, and the pixel input. The result is divided over
tensor x context x Ulysses parallel ranks; pipeline parallelism is not modelled. Checked against
measured peaks less the weights, gradients and optimizer state on one H100 / H200 (docs/benchmarks.md,
issue 12): the Qwen3-VL-2B benchmark shape (8192 tokens, 4 x 1024 patches) without checkpointing,
estimated 22.3 GiB, measured 17.2 compiled and 26.0 eager; with per-op checkpointing 10.3 vs 6.1
compiled; with full checkpointing 4.0 vs 0.8 (the estimate holds a whole loss chunk and a recomputed
block at once); train.py with the 2B config's 8 x 4096 slots and no checkpointing, estimated 46.1 +
31.7 GiB of fp32 state = 77.8 GiB vs a 74.3 GiB peak.

The config's choice is marked `config`; `recommended` has the most useful compute among the
choices that skip no more documents than the config and need no more activation memory than it (or
--memory-gib).
"""

import argparse
import dataclasses
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from titan_mm.config import ActivationCheckpoint, ConfigError, Data, JobConfig, parse_args  # noqa: E402
from titan_mm.data.batch import BatchShape  # noqa: E402
from titan_mm.data.dataloader import row_shape  # noqa: E402
from titan_mm.data.image import MultiEncoderInputSpec  # noqa: E402
from titan_mm.data.plan import PLAN_ROWS, estimate_packing, read_sample  # noqa: E402
from titan_mm.data.tokenizer import Tokenizer  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.objectives.loss import CHUNK_TOKENS  # noqa: E402

BYTES = 2
"""Bytes of one activation value (bf16)."""


def with_budgets(cfg: Data, n: int, l: int) -> Data:
    """data with N image slots of L patches per row."""
    return dataclasses.replace(cfg, image_slots_per_row=n, patches_per_slot=l)


N_FACTORS = (1 / 4, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1, 5 / 4, 3 / 2, 2)
"""Image slot counts tried, as multiples of the config's: fine steps near it, where the patch
budget N x L starts or stops closing rows."""


L_FACTORS = (1 / 2, 1, 9 / 8, 5 / 4, 3 / 2, 2)
"""Slot lengths tried around the config's: a slot a little longer than the largest image often
packs far tighter than one of exactly its size (an image of L patches leaves no room beside it)."""


def budget_grid(seq_len: int, n: int, l: int, merge_area: int) -> list[tuple[int, int, int]]:
    """(S, N, L) around the config's: at the config's S, N x N_FACTORS and L x L_FACTORS; at S/2
    and 2S, N x 1/2, 1, 2 at the config's L. L is a multiple of the merge area, and of 128
    (FlexAttention's block) for slots of 1024 patches or more; the config's own choice is always in."""
    step = 128 if 128 % merge_area == 0 and l >= 1024 else merge_area
    grid = {(seq_len, n, l)}
    for f in N_FACTORS:
        for g in L_FACTORS:
            ll = round(l * g / step) * step
            if ll >= step:
                grid.add((seq_len, max(1, round(n * f)), ll))
    for s in (seq_len // 2, seq_len * 2):
        for f in (1 / 2, 1, 2):
            grid.add((s, max(1, round(n * f)), l))
    return sorted(grid)


@dataclasses.dataclass
class BlockMemory:
    """Bytes one transformer block keeps for backward per token (decoder) or patch slot (ViT)."""
    none: int
    op: int
    full: int

    @classmethod
    def of(cls, block: nn.Module) -> "BlockMemory":
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        ins, outs = sum(m.in_features for m in linears), sum(m.out_features for m in linears)
        width = linears[0].in_features  # the residual stream
        return cls(none=BYTES * (ins + outs), op=BYTES * (2 * width + outs // 2), full=BYTES * width)


def stack_bytes(blocks: nn.ModuleDict, items: int, ac: ActivationCheckpoint) -> tuple[int, int]:
    """(kept bytes, bytes of one block being recomputed) of a block stack over ``items`` tokens/slots."""
    mems = [BlockMemory.of(b) for b in blocks.values()]
    if ac.mode == "none":
        return items * sum(m.none for m in mems), 0
    if ac.mode == "selective" and ac.selective_ac_option == "op":
        return items * sum(m.op for m in mems), items * max(m.none for m in mems)
    every = 1 if ac.mode == "full" else int(ac.selective_ac_option)
    kept = sum(m.full if (i + 1) % every == 0 else m.none for i, m in enumerate(mems))
    return items * kept, items * max(m.none for m in mems)


def activation_gib(model: nn.Module, cfg: JobConfig, s: int, n: int, l: int, patch_dim: int) -> float:
    """Estimated activation memory of one microbatch (module docstring)."""
    rows = cfg.training.local_batch_size
    ac = cfg.activation_checkpoint
    kept, recompute = stack_bytes(model.decoder.layers, rows * s, ac)
    if getattr(model, "vision", None) is not None:
        vit_kept, vit_recompute = stack_bytes(model.vision.layers, rows * n * l, ac)
        kept, recompute = kept + vit_kept, max(recompute, vit_recompute)
        kept += rows * n * l * patch_dim * 4  # the fp32 pixel input
        for k, encoder in getattr(model.vision, "encoders", {}).items():
            # Cambrian: each encoder reads every image place at its own size (items: its patches)
            e, spec = model.args.encoders[int(k)], model.args.vision_input
            patches = rows * n * l // spec.tokens_per_image * (e.image_size // e.vision.patch_size) ** 2
            enc_kept, enc_recompute = stack_bytes(encoder.layers, patches, ac)
            kept, recompute = kept + enc_kept, max(recompute, enc_recompute)
    loss_chunk = 2 * min(CHUNK_TOKENS, rows * s) * model.decoder.args.vocab_size * BYTES
    p = cfg.parallelism
    split = p.tensor_parallel_degree * p.context_parallel_degree * p.ulysses_degree
    return (kept + recompute + loss_chunk) / split / 2**30


def useful_compute(spec, args, est, s: int, n: int, l: int) -> float:
    """Training FLOPs of the real tokens and patches over those of every slot (no attention)."""
    def flops(tokens, patches):
        return spec.training_flops(args, BatchShape(tokens=tokens, doc_len_sq_sum=0, patches=patches,
                                                    image_patches_sq_sum=0, label_tokens=0))
    full = flops(s, n * l)
    return flops(s * (1 - est.token_padding), n * l * (1 - est.patch_padding)) / full if full else 0.0


def parse(argv: list[str]) -> tuple[argparse.Namespace, JobConfig]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=300, help="samples read from data.path")
    p.add_argument("--rows", type=int, default=PLAN_ROWS // 2, help="rows packed per choice")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="activation memory a recommendation may use (default: the config's choice's)")
    opts, rest = p.parse_known_args(argv)
    try:
        cfg, _ = parse_args(rest)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return opts, cfg


def main(argv: list[str]):
    opts, cfg = parse(argv)
    spec = get_model_spec(cfg.model.name)
    args = spec.flavors[cfg.model.flavor]
    vi = args.vision_input
    tok = Tokenizer(cfg.model.tokenizer_path, spec.special_tokens)
    with torch.device("meta"):
        model = spec.model_cls(args)
    S, N, L = cfg.training.seq_len, cfg.data.image_slots_per_row, cfg.data.patches_per_slot
    docs, skipped = read_sample(cfg.data, tok, vi, seq_len=S, samples=opts.samples, seed=cfg.job.seed)
    if not docs:
        sys.exit(f"no sample of {cfg.data.path} could be read: {dict(skipped)}")
    tokens = sorted(len(d.tokens) for d in docs)
    patches = sorted(img.patches.shape[0] for d in docs for img in d.images)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.model.name}/{cfg.model.flavor} ({n_params / 1e9:.3f} B parameters: fp32 weights, gradients "
          f"and AdamW = {16 * n_params / 2**30:.1f} GiB over the FSDP ranks), activation checkpointing "
          f"{cfg.activation_checkpoint.mode}"
          + (f" {cfg.activation_checkpoint.selective_ac_option}" if cfg.activation_checkpoint.mode == "selective" else "")
          + f", {cfg.training.local_batch_size} row(s) per microbatch")
    print(f"sample: {len(docs)} documents of {cfg.data.path} ({cfg.data.dataset}); tokens per document "
          f"median {tokens[len(tokens) // 2]}, max {tokens[-1]}; {len(patches)} images, patches per image "
          + (f"median {patches[len(patches) // 2]}, max {patches[-1]}" if patches else "-")
          + (f"; skipped while reading: {dict(skipped)}" if skipped else ""))
    print()
    rows = []
    # Cambrian's images are a fixed number of rows each: slots hold whole images
    unit = vi.tokens_per_image if isinstance(vi, MultiEncoderInputSpec) else vi.merge_area
    for s, n, l in budget_grid(S, N, L, unit):
        est = estimate_packing(docs, row_shape(with_budgets(cfg.data, n, l), tok, vi, s), cfg.data.pack_open_bins,
                               rows=opts.rows, seed=cfg.job.seed)
        rows.append(dict(s=s, n=n, l=l, est=est, useful=useful_compute(spec, args, est, s, n, l),
                         act=activation_gib(model, cfg, s, n, l, vi.patch_dim)))
    mine = next(r for r in rows if (r["s"], r["n"], r["l"]) == (S, N, L))
    limit = opts.memory_gib if opts.memory_gib is not None else mine["act"]
    fits = [r for r in rows if r["est"].rows and r["est"].overlong <= mine["est"].overlong and r["act"] <= limit]
    best = max(fits, key=lambda r: (r["useful"], -r["act"])) if fits else None
    print("| S | N | L | token pad | patch pad | docs/row | images/row | overlong | useful compute | "
          "activations GiB (est.) | |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        e = r["est"]
        if not e.rows:
            print(f"| {r['s']} | {r['n']} | {r['l']} | no document fits a row | | | | 100% | | | |")
            continue
        mark = " ".join(m for m, on in (("config", r is mine), ("recommended", r is best)) if on)
        print(f"| {r['s']} | {r['n']} | {r['l']} | {100 * e.token_padding:.1f}% | {100 * e.patch_padding:.1f}% | "
              f"{e.documents_per_row:.1f} | {e.images_per_row:.1f} | {100 * e.overlong:.1f}% | "
              f"{100 * r['useful']:.1f}% | {r['act']:.2f} | {mark} |")
    print()
    if best is None:
        print(f"no choice fits {limit:.1f} GiB of activations without skipping more documents than the config")
    else:
        print(f"recommended: --training.seq_len {best['s']} --data.image_slots_per_row {best['n']} "
              f"--data.patches_per_slot {best['l']}")


if __name__ == "__main__":
    main(sys.argv[1:])
