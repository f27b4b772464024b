"""Run two parallel layouts of one config deterministically and compare their loss curves.

    python scripts/compare_losses.py --config train_configs/debug_vlm.toml --steps 10 \
        --a "nproc=1" --b "nproc=2 --parallelism.data_parallel_shard_degree 2" [-- --training.seq_len 256]

Both runs start from one seed checkpoint (scripts/create_seed_checkpoint.py), so they begin from
identical weights. Layout B's data-parallel degree must equal layout A's for the batches to match
(compare different data-parallel degrees with tests/test_parallel.py's single-process emulation).
Prints a table of per-step losses and the max relative difference; exits 1 above --rtol.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_layout(layout: str, config: str, steps: int, seed: str, dump: str, extra: list[str]) -> dict:
    words = shlex.split(layout)
    nproc = 1
    if words and words[0].startswith("nproc="):
        nproc = int(words.pop(0).split("=", 1)[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), "--job.config_file", config, "--job.dump_folder", dump,
           "--training.steps", str(steps), "--checkpoint.initial_load_path", seed,
           "--checkpoint.interval", str(steps + 1), "--checkpoint.export_model_only", "false",
           "--metrics.enable_tensorboard", "false", *extra, *words]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(dump, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--a", default="nproc=1", help="layout A: nproc=N and --section.key value overrides")
    parser.add_argument("--b", required=True, help="layout B, same form")
    parser.add_argument("--rtol", type=float, default=1e-5)
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from create_seed_checkpoint import create_seed_checkpoint
    from titan_mm.config import parse_args
    with tempfile.TemporaryDirectory() as tmp:
        seed = os.path.join(tmp, "seed")
        create_seed_checkpoint(parse_args(["--job.config_file", args.config, *extra])[0], seed)
        a = run_layout(args.a, args.config, args.steps, seed, os.path.join(tmp, "a"), extra)
        b = run_layout(args.b, args.config, args.steps, seed, os.path.join(tmp, "b"), extra)
    print(f"\n| step | A: {args.a} | B: {args.b} | rel diff |\n|---|---|---|---|")
    worst = 0.0
    for step in sorted(a):
        rel = abs(a[step] - b[step]) / abs(a[step])
        worst = max(worst, rel)
        print(f"| {step} | {a[step]:.6f} | {b[step]:.6f} | {rel:.2e} |")
    print(f"\nmax relative difference: {worst:.2e} (rtol {args.rtol:g})")
    sys.exit(0 if worst <= args.rtol else 1)


if __name__ == "__main__":
    main()
