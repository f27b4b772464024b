"""Time of one optimizer step, Muon against fused AdamW, on a family's full-size shape (one device).

    python scripts/bench_optimizer.py --family qwen3_vl --flavor 2B --out OUTDIR          # a GPU
    python scripts/bench_optimizer.py --family qwen3_vl --flavor debug --device cpu --out OUTDIR

Builds the model on the device (random weights, the trainer's parameter groups from the family
policy), gives every parameter a random gradient, and times ``optimizer.step()`` after --warmup
steps (the first allocates the state), the device synchronised around each. Prints a Markdown table
and writes OUTDIR/bench_optimizer.json. Muon runs Newton-Schulz on every block matrix of this one
device, the whole per-step work of a single-GPU run; with N ranks each orthogonalises about 1/N of
the matrices.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402

from titan_mm.config import Optimizer  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.train.optimizer import build_optimizer  # noqa: E402
from titan_mm.train.param_groups import describe_parameters  # noqa: E402

VARIANTS = {
    "adamw": dict(name="adamw", implementation="fused"),
    "muon": dict(name="muon", implementation="fused", muon_ns_dtype="bf16"),
    "muon-fp32ns": dict(name="muon", implementation="fused", muon_ns_dtype="fp32"),
}
"""What each row runs: fused AdamW; Muon (its AdamW part fused) with Newton-Schulz in bf16 or fp32."""


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(optimizer: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_variant(variant: str, model: torch.nn.Module, spec, device: torch.device, warmup: int, steps: int) -> dict:
    cfg = Optimizer(lr=1e-5, **VARIANTS[variant])
    optimizer = build_optimizer(cfg, model, device, policy=spec.param_policy)
    times = time_steps(optimizer, device, warmup, steps)
    state_bytes = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    del optimizer
    times.sort()
    return dict(variant=variant, median_ms=1e3 * times[len(times) // 2], min_ms=1e3 * times[0],
                max_ms=1e3 * times[-1], state_gib=state_bytes / 2**30)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_vl")
    p.add_argument("--flavor", default="2B")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--param-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameters, gradients and optimizer state (the trainer's training.param_dtype)")
    p.add_argument("--variants", default="adamw,muon,muon-fp32ns", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_optimizer.json")
    opts = p.parse_args(argv)
    variants = opts.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(opts.device)
    spec = get_model_spec(opts.family)
    with torch.device("meta"):
        model = spec.model_cls(spec.flavors[opts.flavor])
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    dtype = torch.bfloat16 if opts.param_dtype == "bf16" else torch.float32
    for param in model.parameters():
        param.data = param.data.to(dtype)
        param.grad = torch.randn_like(param) * 1e-3
    infos = describe_parameters(model, spec.param_policy)
    muon_params = sum(i.param.numel() for i in infos if i.block_matrix)
    total = sum(i.param.numel() for i in infos)
    rows = [bench_variant(v, model, spec, device, opts.warmup, opts.steps) for v in variants]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{opts.family}/{opts.flavor} on {device_name}, torch {torch.__version__}, {opts.param_dtype} parameters: "
          f"{total / 1e9:.3f}B parameters, {sum(i.block_matrix for i in infos)} block matrices "
          f"({muon_params / 1e9:.3f}B) take Muon steps")
    print("| optimizer | step median (ms) | min (ms) | max (ms) | state (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['state_gib']:.2f} |")
    result = dict(family=opts.family, flavor=opts.flavor, device=device_name, torch=torch.__version__,
                  param_dtype=opts.param_dtype, parameters=total, muon_parameters=muon_params,
                  warmup=opts.warmup, steps=opts.steps, rows=rows)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        path = os.path.join(opts.out, "bench_optimizer.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
