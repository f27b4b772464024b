"""Checkpoints with torch.distributed.checkpoint (DCP): resharding-friendly, one folder per step.

A training checkpoint holds model, optimizer, LR scheduler, step, and per-data-parallel-rank
dataloader and RNG states, so a resumed run continues bit-for-bit. Those states are keyed by the
data-parallel rank, not the global rank: the tensor-parallel ranks of one data rank read the same
batches, and a run resumed with another tp degree (same data-parallel degree) finds its states. A model-only export holds the weights alone. With the
family's HF adapter, a run can also start from an HF folder and write one at its last step.
"""

import logging
import os
import re
import shutil
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from titan_mm.config import Checkpoint as CheckpointConfig
from titan_mm.config import ConfigError
from titan_mm.hf.io import load_hf_weights, save_hf_weights

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelState(Stateful):
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict):
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    # flattened: moments and hyperparameters keyed by parameter name, not by param-group index; the
    # groups differ between layouts (one per DTensor mesh: FSDP alone has one mesh, FSDP x TP two)
    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict):
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


class LRSchedulerState(Stateful):
    """The scheduler's step count alone. Every param group follows one schedule from one peak lr,
    and the number of groups depends on the layout (one per DTensor mesh), so LambdaLR's per-group
    lists would not load under another layout."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.scheduler = scheduler

    def state_dict(self):
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state_dict):
        s, step = self.scheduler, state_dict["last_epoch"]
        # the groups' current lr comes back with the optimizer state
        s.load_state_dict({**s.state_dict(), "last_epoch": step, "_step_count": step + 1,
                           "_last_lr": [base * fn(step) for base, fn in zip(s.base_lrs, s.lr_lambdas)]})


class RankLocalState(Stateful):
    """Per-data-parallel-rank state (dataloader position, RNG) stored under a rank-specific key."""

    def __init__(self, get, set_):
        self.get, self.set = get, set_

    def state_dict(self):
        return self.get()

    def load_state_dict(self, state_dict):
        self.set(state_dict)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, dump_folder: str, *, model, optimizer, lr_scheduler,
                 dataloader, train_state: Stateful, rank: int, dp_rank: int, hf_adapter=None,
                 model_args=None):
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.rank = rank
        self.model = model
        self.hf_adapter, self.model_args = hf_adapter, model_args
        if cfg.initial_load_hf_path or cfg.export_hf_path:
            if hf_adapter is None:
                raise ConfigError("this model family has no HF adapter; unset checkpoint.initial_load_hf_path "
                                  "and checkpoint.export_hf_path")
            try:
                hf_adapter.hf_config(model_args)  # a flavor without an HF layout fails here, not at the end
            except ValueError as e:
                raise ConfigError(f"checkpoint.initial_load_hf_path / export_hf_path: {e}") from None
        self.states = {
            "model": ModelState(model),
            "optimizer": OptimizerState(model, optimizer),
            "lr_scheduler": LRSchedulerState(lr_scheduler),
            "train_state": train_state,
            f"dataloader_dp{dp_rank}": RankLocalState(dataloader.state_dict, dataloader.load_state_dict),
            f"rng_dp{dp_rank}": RankLocalState(rng_state, set_rng_state),
        }

    def step_folder(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def saved_steps(self) -> list[int]:
        if not os.path.isdir(self.folder):
            return []
        steps = [int(m.group(1)) for d in os.listdir(self.folder) if (m := _STEP_DIR.match(d))
                 and os.path.isfile(os.path.join(self.folder, d, ".metadata"))]
        return sorted(steps)

    def maybe_save(self, step: int, last_step: bool):
        if self.cfg.enable and (last_step or step % self.cfg.interval == 0):
            self.save(step, last_step)
        if last_step and self.cfg.export_hf_path:
            self.export_hf(self.cfg.export_hf_path)

    def save(self, step: int, last_step: bool):
        start = time.perf_counter()
        dcp.save(self.states, checkpoint_id=self.step_folder(step))
        logger.info("saved checkpoint step-%d in %.1fs", step, time.perf_counter() - start)
        if last_step and self.cfg.export_model_only:
            self.export_model(os.path.join(self.folder, f"model-step-{step}"))
        self._purge_old()

    def export_model(self, path: str):
        """Model weights alone (full fp32 tensors), loadable by initial_load_path or conversion."""
        dcp.save({"model": ModelState(self.model)}, checkpoint_id=path)
        logger.info("exported model weights to %s", path)

    def export_hf(self, path: str):
        """Full weights as an HF folder (every rank joins the gather; rank 0 writes)."""
        start = time.perf_counter()
        dtype = torch.bfloat16 if self.cfg.export_hf_dtype == "bf16" else torch.float32
        save_hf_weights(self.model, self.hf_adapter, self.model_args, path, dtype=dtype)
        logger.info("exported HF weights to %s in %.1fs", path, time.perf_counter() - start)

    def load(self) -> int:
        """Resume from load_step or the latest checkpoint; else the initial weights. Returns the step."""
        if not self.cfg.enable:
            self.load_initial_weights()
            return 0
        steps = self.saved_steps()
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise FileNotFoundError(f"checkpoint.load_step={self.cfg.load_step} not found in "
                                        f"{self.folder} (saved steps: {steps})")
            step = self.cfg.load_step
        elif steps:
            step = steps[-1]
        else:
            self.load_initial_weights()
            return 0
        dcp.load(self.states, checkpoint_id=self.step_folder(step))
        logger.info("resumed from checkpoint step-%d", step)
        return step

    def load_initial_weights(self):
        """initial_load_path (DCP, model only) or initial_load_hf_path (HF folder), if set."""
        if self.cfg.initial_load_path:
            dcp.load({"model": ModelState(self.model)}, checkpoint_id=self.cfg.initial_load_path)
            logger.info("loaded initial weights from %s", self.cfg.initial_load_path)
        elif self.cfg.initial_load_hf_path:
            load_hf_weights(self.model, self.hf_adapter, self.cfg.initial_load_hf_path)
            logger.info("loaded initial weights from HF folder %s", self.cfg.initial_load_hf_path)

    def _purge_old(self):
        if self.cfg.keep_latest_k <= 0 or self.rank != 0:
            return
        for step in self.saved_steps()[:-self.cfg.keep_latest_k]:
            shutil.rmtree(self.step_folder(step), ignore_errors=True)
