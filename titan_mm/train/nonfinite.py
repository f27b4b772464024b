"""Non-finite steps (``training.nonfinite``): a step whose loss or gradient norm is NaN or inf
never reaches the parameters, the optimizer state or a checkpoint.

The check runs on the device, inside the step (and so inside a captured CUDA graph): a flag goes to
the fused AdamW kernel as its ``found_inf`` input, with which the kernel leaves parameters, moments
and step count exactly as they were. Counters stay on the device too; the host reads them where it
syncs anyway, at log steps and before checkpoints (``poll``), and ends the run there. From the step
that ends the run on, every update is dropped, so the model the run stops with is the one after its
last finite step.

Drill hook (scripts/fault_drill.py, tests): ``TITAN_MM_DRILL_NAN_STEPS=k`` (or ``a-b``, or ``a-``
for every step from a on) turns the gradients of those steps into NaN.
"""

import logging
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titan_mm.config import Training as TrainingConfig

logger = logging.getLogger(__name__)

DRILL_NAN_STEPS = "TITAN_MM_DRILL_NAN_STEPS"


class NonFiniteError(RuntimeError):
    """The run stopped on non-finite values (exit code 3)."""


class NonFiniteGuard:
    def __init__(self, cfg: TrainingConfig, optimizers: list[torch.optim.Optimizer], device: torch.device):
        self.policy = cfg.nonfinite
        # "stop" ends the run at the first non-finite step
        self.limit = cfg.nonfinite_max_consecutive if cfg.nonfinite == "skip" else 1
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.step_t, self.skipped_t, self.in_a_row_t, self.stop_step_t = (zero.clone() for _ in range(4))
        self.found_inf = torch.zeros((), device=device)
        """1.0 = drop this step's update: read by the fused AdamW kernel."""
        # without the fused kernel ("stop" only) the update is applied, and the run ends at the next poll
        self.drops_updates = all(g["fused"] for opt in optimizers for g in opt.param_groups)
        if self.drops_updates:
            for opt in optimizers:
                opt.found_inf = self.found_inf
        self.drill_steps = parse_drill_steps(os.environ.get(DRILL_NAN_STEPS, ""))
        self.skipped = 0
        """Steps skipped since the start of the run (host copy, as of the last poll)."""

    def start_at(self, step: int, skipped: int):
        """Continue the counts of a resumed run."""
        self.step_t.fill_(step)
        self.skipped_t.fill_(skipped)
        self.skipped = skipped

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor):
        """Device-side, before the optimizer step: flag the update for dropping when ``loss`` or
        ``grad_norm`` (both the same on every rank) is not finite, or when the run has to stop."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.step_t += 1
        self.skipped_t += bad
        self.in_a_row_t.copy_(torch.where(bad, self.in_a_row_t + 1, 0))
        reached = (self.stop_step_t == 0) & (self.in_a_row_t >= self.limit)
        self.stop_step_t.copy_(torch.where(reached, self.step_t, self.stop_step_t))
        self.found_inf.copy_(bad | (self.stop_step_t > 0))

    def poison_drill_gradients(self, params: list[torch.Tensor]):
        """The drill hook: NaN gradients at the steps named by TITAN_MM_DRILL_NAN_STEPS."""
        if self.drill_steps is None:
            return
        first, last = self.drill_steps
        step = self.step_t + 1  # check() counts this step after the gradients exist
        hit = (step >= first) & (step <= last)
        grad = next(p.grad for p in params if p.grad is not None)
        grad.mul_(torch.where(hit, float("nan"), 1.0).to(grad.dtype))

    def poll(self) -> int:
        """Host side (one device read): raise NonFiniteError if the run must stop; else return the
        steps skipped so far."""
        self.skipped, stop_step = torch.stack([self.skipped_t, self.stop_step_t]).tolist()
        if stop_step:
            raise NonFiniteError(self.stop_message(stop_step))
        return self.skipped

    def stop_message(self, stop_step: int) -> str:
        kept = "were dropped" if self.drops_updates else "were applied (optimizer.implementation is not fused)"
        if self.policy == "stop":
            what = f"step {stop_step} had a non-finite loss or gradient norm (training.nonfinite = \"stop\")"
        else:
            what = (f"steps {stop_step - self.limit + 1}-{stop_step} all had a non-finite loss or gradient "
                    f"norm (training.nonfinite_max_consecutive = {self.limit})")
        return (f"{what}; their updates {kept} and nothing from them was checkpointed. Resume from the "
                f"latest checkpoint with a lower optimizer.lr or training.max_norm, or check the data of "
                f"those steps")


def parse_drill_steps(spec: str) -> tuple[int, int] | None:
    """"k", "a-b" or "a-" -> (first, last) steps; "" -> None."""
    if not spec:
        return None
    first, dash, last = spec.partition("-")
    if not dash:
        return int(first), int(first)
    return int(first), int(last) if last else 2**62


def parameters_are_finite(model_parts: list[torch.nn.Module]) -> bool:
    """Whether every parameter of every rank is finite (one collective; for checkpoint time)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for part in model_parts for p in part.parameters()]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float()  # every rank holds parameters
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())

