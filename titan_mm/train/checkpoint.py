"""Checkpoints with torch.distributed.checkpoint (DCP): resharding-friendly, one folder per step.

A training checkpoint holds model, optimizer, LR scheduler, step, and per-data-parallel-rank
dataloader and RNG states, so a resumed run continues bit-for-bit. Model and optimizer states are keyed by parameter
name alone (the optimizer's flattened), so they load under any other layout, pipeline stages
included: a rank holding several model parts (its pipeline stages) saves and loads each part's
names. A model-only export holds the weights alone. With the
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
    """The weights of a model, or of this rank's model parts (pipeline stages), by parameter name."""

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module]):
        self.parts = model if isinstance(model, list) else [model]

    def state_dict(self):
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state_dict):
        # each part takes its own names from the merged dict
        strict = len(self.parts) == 1
        for part in self.parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=strict))


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class OptimizerState(Stateful):
    """One optimizer per model part; flattened state ("state.<param name>.exp_avg", "param_groups.<param
    name>.lr"), so no entry depends on how parameters are grouped or placed."""

    def __init__(self, model_parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.model_parts, self.optimizers = model_parts, optimizers

    # flattened: moments and hyperparameters keyed by parameter name, not by param-group index; the
    # groups differ between layouts (one per DTensor mesh: FSDP alone has one mesh, FSDP x TP two)
    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self):
        # hyperparameters as numbers: a CUDA-graphed step keeps its lr in a device tensor
        return {k: v.item() if k.startswith("param_groups.") and isinstance(v, torch.Tensor) else v
                for part, opt in zip(self.model_parts, self.optimizers)
                for k, v in get_optimizer_state_dict(part, opt, options=_FLAT).items()}

    def load_state_dict(self, state_dict):
        for part, opt in zip(self.model_parts, self.optimizers):
            kept = [{k: g[k] for k in (*_IMPLEMENTATION, "lr")} for g in opt.param_groups]
            set_optimizer_state_dict(part, opt, state_dict, options=_FLAT)
            for group, before in zip(opt.param_groups, kept):
                # the saved values, in this run's form: its own kernels (fused, capturable...), and an
                # lr tensor stays the same tensor (a captured CUDA graph reads it)
                group.update({k: before[k] for k in _IMPLEMENTATION})
                if isinstance(before["lr"], torch.Tensor):
                    group["lr"] = before["lr"].fill_(float(group["lr"]))
                if group["capturable"] or group["fused"]:  # their step counts live on the device
                    for p in group["params"]:
                        state = opt.state.get(p, {})
                        if "step" in state:
                            state["step"] = state["step"].to(p.device, torch.float32)


_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")
"""Optimizer settings of the running job, not of the job that saved the checkpoint."""


class LRSchedulerState(Stateful):
    """The step count alone of the model parts' LR schedulers, which step together. Every param group
    follows one schedule from one peak lr, and the number of groups depends on the layout (one per
    DTensor mesh), so LambdaLR's per-group lists would not load under another layout."""

    def __init__(self, lr_schedulers: list):
        self.lr_schedulers = lr_schedulers

    def state_dict(self):
        return {"last_epoch": self.lr_schedulers[0].last_epoch}

    def load_state_dict(self, state_dict):
        step = state_dict["last_epoch"]
        for s in self.lr_schedulers:
            # the groups' current lr comes back with the optimizer state
            s.load_state_dict({**s.state_dict(), "last_epoch": step, "_step_count": step + 1,
                               "_last_lr": [base * fn(step) for base, fn in zip(s.base_lrs, s.lr_lambdas)]})


class RankLocalState(Stateful):
    """State of one data-parallel rank (dataloader position, RNG) stored under a rank-specific key."""

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
    def __init__(self, cfg: CheckpointConfig, dump_folder: str, *, model_parts: list[torch.nn.Module],
                 optimizers: list, lr_schedulers: list, data_states: dict[str, Stateful],
                 train_state: Stateful, rank: int, dp_rank: int, hf_adapter=None, model_args=None):
        """model_parts: the whole model, or this rank's pipeline stages; one optimizer and LR
        scheduler per part. data_states: this rank's data position by checkpoint key
        (titan_mm/data/dataloader.py:data_states).

        Dataloader and RNG states are keyed by data-parallel rank: the ranks that read the same data
        (tensor- and pipeline-parallel peers) hold the same loader state and one copy is kept, so a
        run resumes under another tp or pp degree as long as the data-parallel degree is unchanged.
        Their RNG states are taken to be interchangeable (training draws no random numbers after
        initialisation)."""
        self.cfg = cfg
        self.folder = os.path.join(dump_folder, cfg.folder)
        self.rank = rank
        self.model_parts = model_parts
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
            "model": ModelState(model_parts),
            "optimizer": OptimizerState(model_parts, optimizers),
            "lr_scheduler": LRSchedulerState(lr_schedulers),
            "train_state": train_state,
            f"rng_dp{dp_rank}": RankLocalState(rng_state, set_rng_state),
        }
        self.states.update(data_states)

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
        dcp.save({"model": ModelState(self.model_parts)}, checkpoint_id=path)
        logger.info("exported model weights to %s", path)

    def export_hf(self, path: str):
        """Full weights as an HF folder (every rank joins the gather; rank 0 writes)."""
        start = time.perf_counter()
        dtype = torch.bfloat16 if self.cfg.export_hf_dtype == "bf16" else torch.float32
        (model,) = self.model_parts  # pipeline parallelism refuses HF export up front
        save_hf_weights(model, self.hf_adapter, self.model_args, path, dtype=dtype)
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
            dcp.load({"model": ModelState(self.model_parts)}, checkpoint_id=self.cfg.initial_load_path)
            logger.info("loaded initial weights from %s", self.cfg.initial_load_path)
        elif self.cfg.initial_load_hf_path:
            (model,) = self.model_parts  # pipeline parallelism refuses HF loading up front
            load_hf_weights(model, self.hf_adapter, self.cfg.initial_load_hf_path)
            logger.info("loaded initial weights from HF folder %s", self.cfg.initial_load_hf_path)

    def _purge_old(self):
        if self.cfg.keep_latest_k <= 0 or self.rank != 0:
            return
        for step in self.saved_steps()[:-self.cfg.keep_latest_k]:
            shutil.rmtree(self.step_folder(step), ignore_errors=True)
