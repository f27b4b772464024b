"""Checkpoints with torch.distributed.checkpoint (DCP): resharding-friendly, one folder per step.

A training checkpoint holds model, optimizer, LR scheduler, step, and per-data-parallel-rank
dataloader and RNG states, so a resumed run continues bit-for-bit. Model and optimizer states are keyed by parameter
name alone (the optimizer's flattened), so they load under any other layout, pipeline stages
included: a rank holding several model parts (its pipeline stages) saves and loads each part's
names. A model-only export holds the weights alone. With the
family's HF adapter, a run can also start from an HF folder and write one at its last step.
"""

import errno
import logging
import os
import pickle
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from titan_mm.config import Checkpoint as CheckpointConfig
from titan_mm.config import ConfigError
from titan_mm.hf.export import InferenceFiles, write_inference_files
from titan_mm.hf.io import load_hf_weights, save_hf_weights
from titan_mm.hf.peft import save_peft_adapter
from titan_mm.models.lora import adapter_scalings, is_adapter_key
from titan_mm.train.manifest import ChecksummingWriter, commit, fsync_folder, saved_steps, step_folder

logger = logging.getLogger(__name__)

DRILL_ENOSPC_STEP = "TITAN_MM_DRILL_ENOSPC_STEP"
"""Drill hook (scripts/fault_drill.py, tests): the save of this step fails with ENOSPC, as on a full disk."""


DCP_ERRORS = (Exception, CheckpointException)
"""What a failed DCP save or load raises (its CheckpointException derives from BaseException)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded (exit code 4); the message names the step and the fix."""


def checkpoint_folder(cfg: CheckpointConfig, dump_folder: str) -> str:
    return os.path.join(dump_folder, cfg.folder)


class ModelState(Stateful):
    """The weights of a model, or of this rank's model parts (pipeline stages), by parameter name;
    with ``include``, only the names it accepts (e.g. LoRA adapters alone)."""

    def __init__(self, model: torch.nn.Module | list[torch.nn.Module], include: Callable[[str], bool] | None = None):
        self.parts = model if isinstance(model, list) else [model]
        self.include = include

    def state_dict(self):
        return {k: v for part in self.parts for k, v in get_model_state_dict(part).items()
                if self.include is None or self.include(k)}

    def load_state_dict(self, state_dict):
        # each part takes its own names from the merged dict
        strict = len(self.parts) == 1 and self.include is None
        for part in self.parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=strict))


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class OptimizerState(Stateful):
    """One optimizer per model part; flattened state ("state.<param name>.<state key>", e.g. AdamW's
    exp_avg or Muon's momentum_buffer, and "param_groups.<param name>.lr"), so no entry depends on
    which optimizer it is or on how parameters are grouped or placed. Only trainable parameters have
    entries (a frozen one has no optimizer state)."""

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
            kept = [{k: g[k] for k in (*_IMPLEMENTATION, "lr") if k in g} for g in opt.param_groups]
            set_optimizer_state_dict(part, opt, state_dict, options=_FLAT)
            for group, before in zip(opt.param_groups, kept):
                # the saved values, in this run's form: its own kernels (fused, capturable...), and an
                # lr tensor stays the same tensor (a captured CUDA graph reads it)
                group.update({k: before[k] for k in _IMPLEMENTATION if k in before})
                if isinstance(before["lr"], torch.Tensor):
                    group["lr"] = before["lr"].fill_(float(group["lr"]))
                if group.get("capturable") or group.get("fused"):  # their step counts live on the device
                    for p in group["params"]:
                        state = opt.state.get(p, {})
                        if "step" in state:
                            state["step"] = state["step"].to(p.device, torch.float32)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (every rank joins), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")
"""Optimizer settings of the running job, not of the job that saved the checkpoint (those a group
has: AdamW's and Muon's differ)."""


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
    """State of one data-parallel rank (dataloader position, RNG) stored under a rank-specific key,
    as one pickled blob: its structure (open packer rows, buffered records, skip counts) changes
    from save to save, and an async save copies the state into the same host buffers every time."""

    def __init__(self, get, set_):
        self.get, self.set = get, set_

    def state_dict(self):
        return {"state": pickle.dumps(self.get())}

    def load_state_dict(self, state_dict):
        self.set(pickle.loads(state_dict["state"]))


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
                 train_state: Stateful, rank: int, dp_rank: int, job: dict, group=None, hf_adapter=None,
                 model_args=None, saved_model_keys: Callable[[str], bool] | None = None, peft_export_path: str = "",
                 peft_modules_to_save: list[str] | None = None, inference_files: InferenceFiles | None = None):
        """model_parts: the whole model, or this rank's pipeline stages; one optimizer and LR
        scheduler per part. data_states: this rank's data position by checkpoint key
        (titan_mm/data/dataloader.py:data_states). job: what the manifest records of the run
        (train/resume.py); group: a gloo group of every rank for DCP's collectives (None: a single
        process). inference_files: what an HF export writes beside the weights (tokenizer, chat
        template, generation and processor configs; titan_mm/hf/export.py).

        Dataloader and RNG states are keyed by data-parallel rank: the ranks that read the same data
        (tensor- and pipeline-parallel peers) hold the same loader state and one copy is kept, so a
        run resumes under another tp or pp degree as long as the data-parallel degree is unchanged.
        Their RNG states are taken to be interchangeable (training draws no random numbers after
        initialisation). saved_model_keys: which weights training checkpoints hold (None = all;
        LoRA's save_adapters_only: the adapters and modules_to_save, the rest coming from the initial
        weights on resume). peft_export_path: where export_peft writes a LoRA model's adapters
        (lora.export_peft_path), with the modules ``peft_modules_to_save`` (lora.modules_to_save)."""
        self.cfg = cfg
        self.folder = checkpoint_folder(cfg, dump_folder)
        self.rank, self.job, self.group = rank, job, group
        # one writer for every save: with async saves it keeps the host copy of the state between them
        # (pinned, which needs a GPU)
        self.writer = ChecksummingWriter(self.folder,
                                         cache_staged_state_dict=cfg.async_save and torch.cuda.is_available())
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if cfg.async_save else None
        self.pending: tuple[int, Future] | None = None
        """(step, the save in flight): its write and, on rank 0, its commit."""
        self.drill_enospc_step = int(os.environ.get(DRILL_ENOSPC_STEP, "0"))
        self.model_parts = model_parts
        self.hf_adapter, self.model_args, self.inference_files = hf_adapter, model_args, inference_files
        self.peft_export_path, self.peft_modules_to_save = peft_export_path, peft_modules_to_save or []
        if cfg.initial_load_hf_path or cfg.export_hf_path or peft_export_path:
            if hf_adapter is None:
                raise ConfigError("this model family has no HF adapter; unset checkpoint.initial_load_hf_path, "
                                  "checkpoint.export_hf_path and lora.export_peft_path")
            try:
                hf_adapter.hf_config(model_args)  # a flavor without an HF layout fails here, not at the end
            except ValueError as e:
                raise ConfigError(f"checkpoint.initial_load_hf_path / export_hf_path: {e}") from None
        self.states = {
            "model": ModelState(model_parts, include=saved_model_keys),
            "optimizer": OptimizerState(model_parts, optimizers),
            "lr_scheduler": LRSchedulerState(lr_schedulers),
            "train_state": train_state,
            f"rng_dp{dp_rank}": RankLocalState(rng_state, set_rng_state),
        }
        self.states.update({key: RankLocalState(state.state_dict, state.load_state_dict)
                            for key, state in data_states.items()})

    def due(self, step: int, last_step: bool) -> bool:
        return self.cfg.enable and (last_step or step % self.cfg.interval == 0)

    def save(self, step: int, *, wait: bool, last_step: bool = False):
        """Write checkpoint step-N: to step-N.partial, renamed step-N with its manifest once every
        rank's files are written. Async (checkpoint.async_save): the step waits for the copy to host
        memory only, unless ``wait``. One save is in flight at a time."""
        self.wait()
        partial = step_folder(self.folder, step) + ".partial"
        self.writer.fail_with_enospc = step == self.drill_enospc_step
        start = time.perf_counter()
        try:
            if self.executor is None:
                dcp.save(self.states, checkpoint_id=partial, storage_writer=self.writer, process_group=self.group)
                written = Future()
                written.set_result(None)
            else:
                written = dcp.async_save(self.states, checkpoint_id=partial, storage_writer=self.writer,
                                         process_group=self.group)
        except DCP_ERRORS as e:
            raise self.save_error(step, e) from e
        stall = time.perf_counter() - start
        run = _run_now if self.executor is None else self.executor.submit
        self.pending = (step, run(self._commit_when_written, written, step, start))
        logger.info("checkpoint step-%d: the step waited %.2fs%s", step, stall,
                    " (copy to host memory; written in the background)" if self.executor else "")
        if wait:
            self.wait()
        if last_step and self.cfg.export_model_only:
            self.export_model(os.path.join(self.folder, f"model-step-{step}"))

    def _commit_when_written(self, written: Future, step: int, start: float):
        written.result()
        if self.rank == 0:
            commit(step_folder(self.folder, step) + ".partial", step_folder(self.folder, step), step, self.job)
            self._purge_old()
        logger.info("saved checkpoint step-%d in %.1fs", step, time.perf_counter() - start)

    def wait(self):
        """Finish the save in flight (its write and commit); a failure raises CheckpointError."""
        if self.pending is None:
            return
        (step, future), self.pending = self.pending, None
        try:
            future.result()
        except DCP_ERRORS as e:
            raise self.save_error(step, e) from e

    def poll(self):
        """Report a failed background save as soon as it is known (no waiting)."""
        if self.pending is not None and self.pending[1].done():
            self.wait()

    def save_error(self, step: int, error: Exception) -> CheckpointError:
        partial = step_folder(self.folder, step) + ".partial"
        full = _mentions_no_space(error) or _no_space_left(self.folder)
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees what the failed save took
        steps = saved_steps(self.folder)
        kept = (f"the newest good checkpoint, step-{steps[-1]}, is intact" if steps
                else "there is no earlier checkpoint")
        if full:
            free = shutil.disk_usage(self.folder).free / 2**20
            return CheckpointError(
                f"disk full: checkpoint step-{step} does not fit in {self.folder} ({free:.0f} MiB free "
                f"now that the partial write is removed); {kept}. Free space (or lower "
                f"checkpoint.keep_latest_k, or move job.dump_folder), then run again to resume")
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return CheckpointError(f"checkpoint step-{step} could not be written to {self.folder}: {last_line}; {kept}")

    def export_model(self, path: str):
        """Model weights alone (full fp32 tensors), loadable by initial_load_path or conversion;
        written next to ``path`` and renamed into place once complete."""
        partial = path + ".partial"
        dcp.save({"model": ModelState(self.model_parts)}, checkpoint_id=partial, process_group=self.group)
        if self.rank == 0:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(partial, path)
            fsync_folder(self.folder)
        logger.info("exported model weights to %s", path)

    def export_hf(self, path: str):
        """Full weights as an HF folder (every rank joins the gather; rank 0 writes)."""
        start = time.perf_counter()
        dtype = torch.bfloat16 if self.cfg.export_hf_dtype == "bf16" else torch.float32
        (model,) = self.model_parts  # pipeline parallelism refuses HF export up front
        save_hf_weights(model, self.hf_adapter, self.model_args, path, dtype=dtype)
        if self.inference_files is not None and self.rank == 0:
            write_inference_files(path, self.hf_adapter, self.model_args, self.inference_files)
        logger.info("exported HF weights to %s in %.1fs", path, time.perf_counter() - start)

    def export_peft(self):
        """The LoRA adapters and modules_to_save as a PEFT folder (every rank joins the gather; rank 0
        writes)."""
        (model,) = self.model_parts  # pipeline parallelism refuses the export up front
        save_peft_adapter(model, self.hf_adapter, self.peft_export_path, self.peft_modules_to_save)
        logger.info("exported LoRA adapters as a PEFT folder to %s", self.peft_export_path)

    def load(self, step: int | None):
        """Load checkpoint ``step`` (chosen and verified by train/resume.py), or the initial weights."""
        if step is None or self.states["model"].include is not None:
            # a checkpoint of some weights only (LoRA's trained ones) goes over the initial ones
            self.load_initial_weights()
        if step is None:
            return
        folder = step_folder(self.folder, step)
        try:
            dcp.load(self.states, checkpoint_id=folder, process_group=self.group)
        except DCP_ERRORS as e:
            last_line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint step-{step} ({folder}) matches its checksums but does not load into this job: "
                f"{last_line}. Set checkpoint.load_step to another saved step, or use a fresh "
                f"job.dump_folder if the model changed") from e
        logger.info("resumed from checkpoint step-%d", step)

    def load_initial_weights(self):
        """initial_load_path (DCP, model only) or initial_load_hf_path (HF folder), if set."""
        if self.cfg.initial_load_path:
            self.load_initial_dcp(self.cfg.initial_load_path)
            logger.info("loaded initial weights from %s", self.cfg.initial_load_path)
        elif self.cfg.initial_load_hf_path:
            (model,) = self.model_parts  # pipeline parallelism refuses HF loading up front
            load_hf_weights(model, self.hf_adapter, self.cfg.initial_load_hf_path)
            logger.info("loaded initial weights from HF folder %s", self.cfg.initial_load_hf_path)

    def load_initial_dcp(self, path: str):
        """Model weights from a DCP folder. A tensor stored with fewer rows than the model's (a
        vocabulary that an objective grew, e.g. MDLM's mask token added to an autoregressive
        checkpoint's embedding and output head) fills the model's first rows; the new rows keep
        their initialisation. Any other shape difference fails as DCP does."""
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        # a base model's weights for a LoRA model: its adapters too if the folder holds them
        lora = any(adapter_scalings(part) for part in self.model_parts)
        model = ModelState(self.model_parts,
                           include=(lambda k: not is_adapter_key(k) or f"model.{k}" in stored) if lora else None)
        state = model.state_dict()
        grown = {}
        for name, tensor in state.items():
            size = getattr(stored.get(f"model.{name}"), "size", None)
            if size is not None and len(size) == tensor.dim() and size[0] < tensor.shape[0] \
                    and tuple(size[1:]) == tuple(tensor.shape[1:]):
                grown[name] = torch.empty(tuple(size), dtype=tensor.dtype)
        dcp.load({"model": {**state, **grown}}, checkpoint_id=path, process_group=self.group)
        if not grown:
            model.load_state_dict(state)
            return
        full = {}
        for name, rows in grown.items():
            logger.warning("%s: %d rows in %s, %d in the model; the new rows keep their initialisation",
                           name, rows.shape[0], path, state[name].shape[0])
            full[name] = _full(state.pop(name)).to("cpu", copy=True)
            full[name][:rows.shape[0]] = rows
        for part in self.model_parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))
            set_model_state_dict(part, full, options=StateDictOptions(full_state_dict=True, strict=False))

    def close(self):
        """Finish the save in flight, if any (on every exit path: the newest checkpoint is committed)."""
        try:
            self.wait()
        finally:
            if self.executor is not None:
                self.executor.shutdown()

    def _purge_old(self):
        """keep_latest_k, counted among committed checkpoints only: the newest is never removed."""
        if self.cfg.keep_latest_k <= 0:
            return
        for step in saved_steps(self.folder)[:-self.cfg.keep_latest_k]:
            shutil.rmtree(step_folder(self.folder, step), ignore_errors=True)


def _run_now(fn, *args) -> Future:
    """``fn(*args)`` run here, its result or exception in a finished Future (as the executor's)."""
    future = Future()
    try:
        future.set_result(fn(*args))
    except DCP_ERRORS as e:
        future.set_exception(e)
    return future


def _mentions_no_space(error: BaseException) -> bool:
    """Whether the error (DCP's CheckpointException holds each rank's traceback text) says so."""
    text = str(error)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]"))


def _no_space_left(folder: str) -> bool:
    """Whether a small write into ``folder`` fails for lack of space (torch.save's writer reports a
    full disk only as "unexpected pos ..."; this asks the file system)."""
    probe = os.path.join(folder, ".space_probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 2**20)
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        if os.path.exists(probe):
            os.remove(probe)
