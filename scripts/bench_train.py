"""The trainer measured end to end on a data file: train.py's own path (loader workers, packer,
prefetch to the device, model, loss, optimizer, compile and the CUDA graph when configured) for
--steps steps after --warmup steps, from random weights.

    python scripts/bench_train.py --job.config_file train_configs/qwen3_vl_2b.toml \
        --data.path /data/realistic/captions/captions.jsonl --data.dataset captions \
        --model.tokenizer_path assets/tokenizer [--section.key value ...] \
        [--warmup 4] [--steps 8] [--name NAME] [--out FILE.json]

Prints the exact config used and a Markdown row, and writes the figures as JSON to --out (default
$OUT/bench_train_NAME.json when OUT is set). Per GPU (a batch's work divided over the ranks that
share it), over the measured steps:
- useful_tokens_per_s: tokens of documents (padding excluded); images_per_s: images and videos;
- mfu: the family's training_flops of the real tokens and patches (vision encoder included, padding
  excluded) per second over the GPU's peak (metrics.peak_tflops or the known table; none on CPU);
- token_padding, patch_padding: shares of the token slots and image patch slots that are padding;
- data_wait: share of the wall time the training process spent blocked on the loader;
- peak_mem_gib: the device's peak allocated memory over the whole run (CPU: peak resident memory);
- step_s: wall time per measured step (the device synchronised before and after).

The run writes no checkpoints or TensorBoard events and loads no initial weights (those keys are
cleared), so any config with its data runs as it is.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402

import train  # noqa: E402
from titan_mm.config import ConfigError, parse_args, to_toml  # noqa: E402
from titan_mm.parallel.parallel_dims import ParallelismError  # noqa: E402
from titan_mm.train.metrics import peak_memory_gib  # noqa: E402

FIELDS = ("useful_tokens_per_s", "images_per_s", "mfu", "token_padding", "patch_padding", "data_wait",
          "peak_mem_gib", "step_s")


def bench_overrides(steps: int) -> list[str]:
    """What a measurement changes in any config: its length, and nothing written or loaded."""
    return ["--training.steps", str(steps), "--metrics.log_freq", str(steps),
            "--metrics.enable_tensorboard", "false", "--checkpoint.enable", "false",
            "--checkpoint.initial_load_path", "", "--checkpoint.initial_load_hf_path", "",
            "--checkpoint.export_hf_path", "", "--lora.export_peft_path", ""]


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: train.Trainer, warmup: int, steps: int) -> dict:
    """Train warmup + steps steps; the figures of the last ``steps``."""
    for _ in range(warmup):
        trainer.train_state.step += 1
        trainer.train_step()
    synchronize(trainer.device)
    metrics = trainer.metrics
    before_steps, before_data = metrics.step_totals.copy(), metrics.data_totals.copy()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_state.step += 1
        trainer.train_step()
    synchronize(trainer.device)
    elapsed = time.perf_counter() - start
    done = metrics.step_totals - before_steps
    data = metrics.data_totals - before_data
    share = trainer.parallel_dims.ranks_per_batch
    seq_len = trainer.cfg.training.seq_len
    return dict(
        step_s=elapsed / steps, useful_tokens_per_s=done["tokens"] / elapsed,
        images_per_s=data["images"] / share / elapsed,
        mfu=done["flops"] / elapsed / metrics.peak_flops if metrics.peak_flops else None,
        token_padding=data["pad_tokens"] / max(1, data["rows"] * seq_len),
        patch_padding=data["pad_patches"] / max(1, data["patch_slots"]),
        data_wait=done["data_wait_s"] / elapsed, peak_mem_gib=peak_memory_gib(trainer.device),
        documents_per_row=data["documents"] / max(1, data["rows"]),
        loss=trainer.losses[-1].item())


def profile_steps(trainer: train.Trainer, path: str):
    """Two more steps under the profiler: kernel time by kind, then the top kernels."""
    from bench import write_profile

    def two_steps():
        for _ in range(2):
            trainer.train_state.step += 1
            trainer.train_step()
    write_profile(two_steps, path)


def markdown(result: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    return "\n".join([
        "| run | useful tokens/s | images/s | MFU (useful) | token pad | patch pad | data wait | peak GiB | step (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['name']} | {result['useful_tokens_per_s']:,.0f} | {result['images_per_s']:.1f} | "
        f"{pct(result['mfu'])} | {pct(result['token_padding'])} | {pct(result['patch_padding'])} | "
        f"{pct(result['data_wait'])} | {result['peak_mem_gib']:.2f} | {result['step_s']:.4f} |"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=4, help="steps before the measurement (compile, CUDA graph capture)")
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--name", default=None, help="the run's name (default: config file stem)")
    p.add_argument("--out", default=None, help="JSON file (default $OUT/bench_train_NAME.json when OUT is set)")
    p.add_argument("--profile", default=None, help="after the measurement, profile two more steps and write "
                   "their GPU kernel time by kind to this file (scripts/bench.py's table)")
    opts, rest = p.parse_known_args(argv)
    if opts.warmup < 0 or opts.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    # the run's config.toml and losses.json go to a temporary folder unless one is named
    scratch = None if any(a.startswith("--job.dump_folder") for a in rest) else tempfile.mkdtemp(prefix="bench_train_")
    try:
        cfg, _ = parse_args(rest + bench_overrides(opts.warmup + opts.steps + (2 if opts.profile else 0))
                            + (["--job.dump_folder", scratch] if scratch else []))
        config_file = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a in ("--job.config_file",
                                                                                  "--config_file")), "config")
        name = opts.name or Path(config_file).stem
        trainer = train.Trainer(cfg)
    except (ConfigError, ParallelismError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    result = dict(name=name, **measure(trainer, opts.warmup, opts.steps))
    if opts.profile:
        profile_steps(trainer, opts.profile)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(warmup=opts.warmup, steps=opts.steps, model=f"{cfg.model.name}/{cfg.model.flavor}",
                  data=cfg.data.path, seq_len=cfg.training.seq_len, data_workers=trainer.dataloader.num_workers,
                  device=torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
                  torch=torch.__version__, argv=argv, config=to_toml(cfg))
    if trainer.rank == 0:
        print(f"config used:\n{result['config']}")
        print(markdown(result))
        out = opts.out or (os.path.join(os.environ["OUT"], f"bench_train_{name}.json") if "OUT" in os.environ
                           else None)
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
