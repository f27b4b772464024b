"""Attention kernels alone on one GPU: forward + backward time and TFLOP/s of each backend for a
packed decoder row (documents given by --docs), bf16.

    python scripts/bench_attention.py [--seq 8192] [--heads 16] [--kv-heads 8] [--head-dim 128] \
        [--docs 8192] [--docs 2048 2048 4096]

Rows: titan_mm's backends (flex, varlen, sdpa with the dense document mask), flex with other tile
sizes (kernel_options), and for a single document PyTorch's causal SDPA kernels (flash, cuDNN,
memory-efficient) as the ceiling for what a packed-document kernel could reach.
"""

import argparse
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

from titan_mm.data.dataloader import run_lengths  # noqa: E402
from titan_mm.models.attention import attend, segment_mask  # noqa: E402

FLEX_OPTIONS = {
    "flex 128x64 fwd, 64x128 bwd": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128,
                                        BLOCK_N2=64, num_warps=8, num_stages=3),
    "flex 128x128 fwd": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "flex bwd 32x128/128x32": dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, num_warps=4, num_stages=3),
}


def time_fwd_bwd(fn, q, k, v, iters: int = 10) -> float:
    for _ in range(3):
        fn(q, k, v).backward(torch.ones_like(q))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(q, k, v).backward(torch.ones_like(q))
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--docs", type=int, nargs="+", default=None, help="document lengths (default: one)")
    opts = parser.parse_args()
    S, H, Hkv, D = opts.seq, opts.heads, opts.kv_heads, opts.head_dim
    docs = opts.docs or [S]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(docs)])[None].cuda()
    lengths = run_lengths(ids.cpu()).cuda()
    # causal attention FLOPs inside each document: fwd 2 matmuls x 2 x (n^2 / 2) x H x D, bwd 2.5 x fwd
    flops = 3.5 * sum(2 * 2 * n * n / 2 * H * D for n in docs)

    def make(h):
        return torch.randn(1, S, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = make(H), make(Hkv), make(Hkv)
    rows = []

    def run(name, fn):
        try:
            dt = time_fwd_bwd(fn, q, k, v)
            rows.append((name, dt * 1e3, flops / dt / 1e12))
        except Exception as e:  # a kernel that does not support the shape is a row, not a lost job
            rows.append((name, float("nan"), repr(e)[:120]))
        print(rows[-1], flush=True)

    for backend in ("flex", "varlen", "sdpa"):
        mask = segment_mask(ids, causal=True, backend=backend, segment_lengths_BK=lengths)
        run(f"titan_mm {backend}", lambda q, k, v, mask=mask: attend(q, k, v, mask))

    block_mask = segment_mask(ids, causal=True, backend="flex").block_mask
    for name, options in FLEX_OPTIONS.items():
        compiled = torch.compile(flex_attention)
        run(name, lambda q, k, v, o=options, c=compiled: c(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True,
            kernel_options=o).transpose(1, 2))

    if len(docs) == 1:
        for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def causal(q, k, v, kernel=kernel):
                with sdpa_kernel(kernel):
                    return F.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                        enable_gqa=True).transpose(1, 2)
            run(f"sdpa is_causal {kernel.name}", causal)

    print(f"\nS={S} heads={H} kv_heads={Hkv} head_dim={D} documents={docs}, bf16, fwd+bwd\n")
    print("| kernel | ms | TFLOP/s |\n|---|---|---|")
    for name, ms, tflops in rows:
        print(f"| {name} | {ms:.2f} | {tflops if isinstance(tflops, str) else f'{tflops:.0f}'} |")


if __name__ == "__main__":
    main()
