"""How early and how reliably does the debug VLM learn to use its images? Trains the debug config
once per seed (and per CPU thread count, which changes the floating-point summation order the way
another machine's kernels do) and prints the held-out caption loss with the true images over the
loss with images swapped between samples, every --eval_every steps.

    python scripts/grounding_spread.py --seeds 0-7 --threads 1,2 [--eval_every 50] \
        [--stop_below 0.9] [--section.key value ...]

``--section.key value`` overrides apply to train_configs/debug_vlm.toml as in train.py. A ratio of
1 means the images are ignored. The summary gives, per run, the first eval step whose ratio is
below --stop_below (where a run stops when the flag is given), and the ratio per step.
tests/test_train.py::test_model_learns_to_use_the_images runs ratios_during_training on the
quick-start config; docs/testing.md has the numbers this script measured for it.
"""

import argparse
import sys
import tempfile

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.config import parse_args  # noqa: E402
from titan_mm.evaluate import grounding_losses  # noqa: E402

VAL = "assets/sample_data/captions_val.jsonl"


def int_list(text: str) -> list[int]:
    """'0-3' or '1,2' -> [0, 1, 2, 3] / [1, 2]."""
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(v) for v in text.split(",")]


def ratios_during_training(overrides: list[str], seed: int, threads: int, eval_every: int,
                           stop_below: float = 0.0) -> dict[int, float]:
    """{step: true / swapped held-out caption loss} of one run, every eval_every steps, until the
    last step or until a ratio is below stop_below."""
    import train
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as dump:
        cfg, _ = parse_args(["--job.config_file", "train_configs/debug_vlm.toml", "--job.dump_folder", dump,
                             "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
                             "--metrics.log_freq", "1000000", "--job.seed", str(seed), *overrides])
        trainer = train.Trainer(cfg)
        ratios = {}
        while trainer.train_state.step < cfg.training.steps:
            trainer.train_state.step += 1
            trainer.train_step()
            step = trainer.train_state.step
            if step % eval_every == 0 or step == cfg.training.steps:
                true_loss, swapped_loss = grounding_losses(cfg, trainer.model.eval(), trainer.model_args, VAL)
                trainer.model.train()
                ratios[step] = true_loss / swapped_loss
                print(f"seed {seed} threads {threads} step {step}: true {true_loss:.4f} swapped "
                      f"{swapped_loss:.4f} ratio {ratios[step]:.3f}", flush=True)
                if ratios[step] < stop_below:
                    break
    return ratios


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int_list, default=[1])
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--stop_below", type=float, default=0.0)
    opts, overrides = parser.parse_known_args(argv)
    runs = {(s, t): ratios_during_training(overrides, s, t, opts.eval_every, opts.stop_below)
            for s in opts.seeds for t in opts.threads}
    print("\nratio true / swapped per step (1.0 = images ignored); overrides:", " ".join(overrides))
    for (seed, threads), ratios in runs.items():
        below = [step for step, r in ratios.items() if r < opts.stop_below]
        print(f"seed {seed} threads {threads}: first below {opts.stop_below}: "
              f"{below[0] if below else 'never'}; " + " ".join(f"{s}:{r:.3f}" for s, r in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
