"""Progress lines, TensorBoard events, throughput, MFU, peak memory and ETA."""

import json
import logging
import os
import resource
import time
from collections import Counter

import torch

from titan_mm.data.packing import SIZE_STATS

logger = logging.getLogger(__name__)

MAX_SKIPS_SHOWN = 3
"""Skipped samples named (reason and reference) on a progress line."""

# dense bf16 peak of one device, TFLOP/s (datasheet)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0}


def device_peak_tflops(configured: float) -> float:
    """Peak TFLOP/s for MFU: the configured value, else the GPU's from the table, else 0 (none)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
            if key in name:
                return value
    return 0.0


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux: the process's peak resident memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    def __init__(self, *, log_freq: int, total_steps: int, tb_folder: str | None, peak_tflops: float,
                 world_size: int, device: torch.device, start_step: int = 0):
        """start_step: the step a resumed run continues from. TensorBoard hides the events of later
        steps that an interrupted run wrote (purge_step), so every step shows once."""
        self.log_freq, self.total_steps = log_freq, total_steps
        self.peak_flops = peak_tflops * 1e12
        self.world_size, self.device = world_size, device
        self.writer = None
        if tb_folder:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(tb_folder, exist_ok=True)
            self.writer = SummaryWriter(tb_folder, purge_step=start_step + 1)
        self.data_totals: Counter = Counter()
        """This rank's data counts since the start of the run."""
        self.step_totals: Counter = Counter()
        """This rank's steps, tokens, FLOPs and seconds waited for data since the start of the run."""
        self.warned_patch_padding = False
        self._reset_window()

    def _reset_window(self):
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_tokens = 0
        self.window_flops = 0.0
        self.window_data_wait_s = 0.0
        self.window_data: Counter = Counter()
        self.window_skipped: list[str] = []

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.log_freq == 0 or step == self.total_steps

    def record_step(self, *, tokens: float, flops: float, data_stats: dict, skipped: list[str] = (),
                    data_wait_s: float = 0.0):
        """Host-side counts of one step on this rank (no device sync); ``skipped``: references of
        samples skipped by this rank's loader, the latest of which the progress line names;
        ``data_wait_s``: wall time the step spent blocked on the loader."""
        self.window_steps += 1
        self.window_tokens += tokens
        self.window_flops += flops
        self.window_data_wait_s += data_wait_s
        self.step_totals.update(steps=1, tokens=tokens, flops=flops, data_wait_s=data_wait_s)
        self.window_data.update(data_stats)
        self.data_totals.update(data_stats)
        self.window_skipped = (self.window_skipped + list(skipped))[-MAX_SKIPS_SHOWN:]

    def log(self, step: int, *, loss: float, grad_norm: float, lr: float, row_slots: int, data_totals: dict,
            skipped_steps: int = 0):
        """data_totals: counts since the start of the run, summed over data-parallel ranks;
        skipped_steps: non-finite steps whose update was dropped (train/nonfinite.py), since the start."""
        elapsed = time.perf_counter() - self.window_start
        tps = self.window_tokens / elapsed
        mfu = self.window_flops / elapsed / self.peak_flops if self.peak_flops else None
        mem = peak_memory_gib(self.device)
        eta = (self.total_steps - step) * elapsed / max(1, self.window_steps)
        pad = self.window_data.get("pad_tokens", 0) / max(1, row_slots * self.window_steps)
        # above a few percent the loader, not the GPU, sets the pace
        data_wait = self.window_data_wait_s / elapsed
        # the vision encoder computes every one of the N x L patch slots, valid or not
        patch_pad = self.window_data.get("pad_patches", 0) / max(1, self.window_data.get("patch_slots", 0))
        if patch_pad > 0.5 and not self.warned_patch_padding:
            self.warned_patch_padding = True
            logger.warning("%.0f%% of the image patches of a row (data.image_slots_per_row x patches_per_slot) "
                           "are padding that the vision encoder still computes: lower image_slots_per_row to "
                           "fit the data", 100 * patch_pad)
        # "samples/NAME" and "tokens/NAME": per-source counts of a mixture
        per_source = {k: v for k, v in data_totals.items() if "/" in k}
        skipped = {k: v for k, v in data_totals.items()
                   if k not in SIZE_STATS and k not in per_source}
        parts = [f"step {step:>5}/{self.total_steps}", f"loss {loss:7.4f}", f"grad_norm {grad_norm:7.3f}",
                 f"lr {lr:.2e}", f"tok/s {tps:,.0f}", "mfu " + (f"{100 * mfu:.1f}%" if mfu else "-"),
                 f"mem {mem:.2f}GiB", f"pad {100 * pad:.1f}%", f"img pad {100 * patch_pad:.0f}%",
                 f"data wait {100 * data_wait:.1f}%",
                 f"skipped {sum(skipped.values())}" + (f" {dict(sorted(skipped.items()))}" if skipped else ""),
                 f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"]
        if skipped_steps:
            parts.insert(2, f"non-finite steps skipped {skipped_steps}")
        if per_source:
            parts.append("sources " + source_shares(per_source))
        logger.info("  ".join(parts))
        for ref in self.window_skipped:
            logger.info("  skipped since the last log line: %s", ref)
        if self.writer:
            scalars = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tps,
                       "memory_gib": mem, "pad_fraction": pad, "patch_pad_fraction": patch_pad,
                       "nonfinite_skipped_steps": skipped_steps, "data_wait_fraction": data_wait}
            if mfu:
                scalars["mfu"] = mfu
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            for k, v in skipped.items():
                self.writer.add_scalar(f"data/skipped_{k}", v, step)
            for k, v in per_source.items():
                self.writer.add_scalar(f"data/{k}", v, step)
            self.writer.flush()
        self._reset_window()

    def close(self):
        if self.writer:
            self.writer.close()


class LossHistory:
    """losses.json: {step: loss} of every step of the run, across resumes. A resumed run keeps the
    file's steps up to the checkpoint it continues from and adds its own; written at each
    checkpoint and at the end, so it always covers the newest checkpoint."""

    def __init__(self, path: str, start_step: int):
        self.path, self.start_step = path, start_step
        self.values: list[float] = []
        """Losses of this process's steps start_step + 1, ... read from the device so far."""

    def write(self, losses: list[torch.Tensor]):
        """``losses``: this process's per-step device losses (one device read for the new ones)."""
        new = losses[len(self.values):]
        if new:
            self.values += torch.stack(new).tolist()
        history = {step: loss for step, loss in self._read().items() if step <= self.start_step}
        history.update({self.start_step + 1 + i: loss for i, loss in enumerate(self.values)})
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({str(k): v for k, v in sorted(history.items())}, f, indent=0)
        os.replace(tmp, self.path)

    def _read(self) -> dict[int, float]:
        try:
            with open(self.path) as f:
                return {int(k): v for k, v in json.load(f).items()}
        except (FileNotFoundError, ValueError):
            return {}


def source_shares(per_source: dict) -> str:
    """``NAME samples (share of tokens)`` per mixture source, e.g. ``captions 812 (31%)``."""
    names = sorted(k.split("/", 1)[1] for k in per_source if k.startswith("samples/"))
    total_tokens = max(1, sum(per_source.get(f"tokens/{n}", 0) for n in names))
    return " ".join(f"{n} {per_source[f'samples/{n}']} ({100 * per_source.get(f'tokens/{n}', 0) / total_tokens:.0f}%)"
                    for n in names)
