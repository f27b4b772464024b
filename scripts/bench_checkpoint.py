"""How long a checkpoint save stalls training on one GPU: checkpoint.async_save off vs on.

The Qwen3-VL-2B shape (random init, fp32 parameters, fused AdamW, bf16 autocast: the trainer's
single-GPU setup) trains on scripts/bench.py's batch (8192 tokens, four 512 x 512 images); the
real CheckpointManager saves the full training state (model, optimizer, schedule, RNG). For each
mode and each of two saves: the time the step waits for the save call (sync: the whole write and
commit; async: the copy to host memory, pinned memory allocated at the first save), how much the
steps that run during a background write slow down, and when the write and commit finish.

    python scripts/bench_checkpoint.py [--flavor 2B] [--folder /tmp/ckpt_bench] [--steps 5]

Each checkpoint (about 12 bytes per parameter) is deleted once measured, so the disk holds one at a
time.
"""

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench import baseline_batch  # noqa: E402
from titan_mm.config import Checkpoint, LRScheduler, Optimizer  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.objectives.loss import linear_cross_entropy  # noqa: E402
from titan_mm.train.checkpoint import CheckpointManager  # noqa: E402
from titan_mm.train.lr_scheduler import build_lr_scheduler  # noqa: E402
from titan_mm.train.optimizer import build_optimizer  # noqa: E402
from train import TrainState, with_attention_backend  # noqa: E402


class NoData:
    """The dataloader's place in the checkpoint (this benchmark has no data state)."""
    dataset = None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(mode: str, flavor: str, folder: str, steps: int) -> list[dict]:
    spec = get_model_spec("qwen3_vl")
    args = with_attention_backend(spec.flavors[flavor], "flex")
    inputs = {k: v.cuda() for k, v in baseline_batch(args, spec, 8192, 4, 512).items() if isinstance(v, torch.Tensor)}
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cuda")
    torch.manual_seed(0)
    model.init_weights()
    optimizer = build_optimizer(Optimizer(lr=1e-5), model, torch.device("cuda"))
    scheduler = build_lr_scheduler(LRScheduler(), optimizer, 1000)
    n_labels = int((inputs["labels"] != -100).sum())
    state = TrainState()
    manager = CheckpointManager(Checkpoint(async_save=mode == "async", keep_latest_k=0), folder,
                                model_parts=[model], optimizers=[optimizer], lr_schedulers=[scheduler],
                                dataloader=NoData(), train_state=state, rank=0, dp_rank=0, job={"model": flavor})

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = linear_cross_entropy(h.flatten(0, 1), model.decoder.head_weight(), inputs["labels"].flatten()) / n_labels
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1

    for _ in range(3):  # warm-up: optimizer state, kernels
        step()
    baseline = statistics.median(timed(step) for _ in range(steps))
    rows = []
    for save in (1, 2):
        step()
        start = time.perf_counter()
        stall = timed(lambda: manager.save(state.step, wait=False))
        extra, overlapped = 0.0, 0
        while manager.pending is not None and not manager.pending[1].done():
            extra += timed(step) - baseline
            overlapped += 1
        manager.wait()
        done = time.perf_counter() - start
        rows.append(dict(mode=mode, save=save, step_s=baseline, stall_s=stall, overlapped=overlapped,
                         extra_s=extra, done_s=done))
        shutil.rmtree(os.path.join(folder, "checkpoint"))  # one checkpoint on disk at a time
    manager.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="2B")
    parser.add_argument("--folder", default="/tmp/ckpt_bench")
    parser.add_argument("--steps", type=int, default=5, help="steps timed for the baseline step time")
    args = parser.parse_args()
    rows = []
    for mode in ("sync", "async"):
        rows += measure(mode, args.flavor, os.path.join(args.folder, mode), args.steps)
        torch.cuda.empty_cache()
    print(f"\nqwen3_vl/{args.flavor} on {torch.cuda.get_device_name()}, {args.folder}\n")
    print("| checkpoint.async_save | save | step (s) | the step waits (s) | steps during the write | "
          "their extra time (s) | saved after (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode'] == 'async'} | {r['save']} | {r['step_s']:.3f} | {r['stall_s']:.2f} | {r['overlapped']} | "
              f"{r['extra_s']:.2f} | {r['done_s']:.1f} |")


if __name__ == "__main__":
    main()
