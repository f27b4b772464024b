"""Which checkpoint a run continues from, decided before the model is built.

``plan_resume`` applies ``checkpoint.resume`` and ``load_step`` to the dump folder: it verifies the
candidate checkpoints against their manifests (train/manifest.py; each rank checks a share of the
files), reports a damaged one by step, file and problem and falls back to the one before it, and
refuses, with one message naming the fix, a checkpoint that this config cannot continue: another
model, another data-parallel layout without data.num_shards, another starting point, or more steps
done than training.steps.
"""

import logging
import os
import shutil

import torch.distributed as dist

from titan_mm.config import Checkpoint as CheckpointConfig
from titan_mm.config import ConfigError, JobConfig
from titan_mm.train.checkpoint import CheckpointError
from titan_mm.train.manifest import DamagedCheckpoint, read_manifest, saved_steps, step_folder, verify_files

logger = logging.getLogger(__name__)


class TrainingComplete(Exception):
    """The dump folder's checkpoint has trained every step of training.steps: nothing to do (exit 0)."""


def job_fingerprint(cfg: JobConfig, dp_degree: int) -> dict:
    """What a checkpoint records of the run that wrote it, to refuse a config that cannot continue it."""
    start = cfg.checkpoint.initial_load_path or cfg.checkpoint.initial_load_hf_path
    return {"model": f"{cfg.model.name}/{cfg.model.flavor}", "data_parallel_degree": dp_degree,
            "num_shards": cfg.data.num_shards, "initial_load": os.path.realpath(start) if start else ""}


def plan_resume(cfg: CheckpointConfig, folder: str, job: dict, total_steps: int, *, rank: int,
                world_size: int, group=None) -> int | None:
    """The checkpoint step to load, or None to start from the initial weights. Raises ConfigError for
    a config that cannot use the folder, CheckpointError when no checkpoint can be used,
    TrainingComplete when there is nothing left to train."""
    if not cfg.enable:
        return None
    steps = saved_steps(folder)
    if cfg.resume == "never" and steps:
        raise ConfigError(f"checkpoint.resume = \"never\" but {folder} already holds checkpoints {steps}; "
                          f"choose a fresh job.dump_folder to start a new run (or delete the old one)")
    if rank == 0:
        remove_partial_saves(folder)
    step = choose_checkpoint(cfg, folder, steps, rank=rank, world_size=world_size, group=group)
    if step is None:
        if cfg.resume == "require":
            raise ConfigError(f"checkpoint.resume = \"require\" but {folder} holds no checkpoint to resume; "
                              f"check job.dump_folder, or set checkpoint.resume = \"auto\" to start a new run")
        return None
    where = f"checkpoint step-{step} in {folder}"
    check_same_job(read_manifest(step_folder(folder, step))["job"], job, where)
    if step > total_steps:
        raise ConfigError(f"training.steps = {total_steps} but {where} has already trained {step} steps; "
                          f"raise training.steps above {step} to train on, or choose a fresh job.dump_folder "
                          f"to start a new run")
    if step == total_steps:
        raise TrainingComplete(f"{where} has already trained all training.steps = {total_steps} steps; "
                               f"nothing to do (raise training.steps to train on)")
    later = [s for s in saved_steps(folder) if s > step] if rank == 0 else []  # damaged ones are gone
    for s in later:
        move_aside(step_folder(folder, s), "superseded")
    if later:
        logger.warning("resuming from step-%d: the later checkpoints %s continue another run and were renamed "
                       "step-N.superseded", step, later)
    return step


def choose_checkpoint(cfg: CheckpointConfig, folder: str, steps: list[int], *, rank: int, world_size: int,
                      group) -> int | None:
    """load_step, or the newest checkpoint that matches its manifest; damaged ones are reported and
    renamed step-N.damaged."""
    if cfg.load_step >= 0 and cfg.load_step not in steps:
        raise ConfigError(f"checkpoint.load_step={cfg.load_step} not found in {folder} (saved steps: {steps}); "
                          f"set it to one of them, or to -1 for the newest")
    candidates = [cfg.load_step] if cfg.load_step >= 0 else steps[::-1]
    damaged = []
    chosen = None
    for step in candidates:
        problems = checkpoint_problems(step_folder(folder, step), step, rank=rank, world_size=world_size,
                                       group=group)
        if not problems:
            chosen = step
            break
        report = f"checkpoint step-{step} ({step_folder(folder, step)}) is damaged: {'; '.join(problems)}"
        if cfg.load_step >= 0:
            raise CheckpointError(f"{report}. Set checkpoint.load_step to another saved step ({steps}), or to -1 "
                                  f"for the newest good one")
        logger.warning("%s; falling back to the checkpoint before it", report)
        damaged.append(step)
    if rank == 0:
        for step in damaged:
            move_aside(step_folder(folder, step), "damaged")
    if chosen is None and damaged:
        raise CheckpointError(f"every checkpoint in {folder} is damaged (steps {damaged}, now renamed "
                              f"step-N.damaged); run again to start from the initial weights, or restore a "
                              f"checkpoint into {folder}")
    return chosen


def checkpoint_problems(folder: str, step: int, *, rank: int, world_size: int, group) -> list[str]:
    """What is wrong with a checkpoint folder ([] = it matches its manifest). Each rank checksums
    its share of the files."""
    try:
        manifest = read_manifest(folder)
    except DamagedCheckpoint as e:
        return [str(e)]  # every rank reads the same manifest and returns here together
    if manifest.get("step") != step:
        return [f"its manifest is that of step {manifest.get('step')}"]
    names = sorted(manifest["files"])[rank::world_size]
    problems = verify_files(folder, {n: manifest["files"][n] for n in names})
    if group is not None:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, problems, group=group)
        problems = sorted(p for rank_problems in gathered for p in rank_problems)
    return problems


def check_same_job(saved: dict, job: dict, where: str):
    """A checkpoint continues the run that wrote it: refuse a config it cannot continue."""
    if saved["model"] != job["model"]:
        raise ConfigError(f"{where} holds a {saved['model']} model and this config trains {job['model']}; "
                          f"choose a fresh job.dump_folder for the new model, or set model.name / "
                          f"model.flavor back")
    if job["initial_load"] and saved["initial_load"] != job["initial_load"]:
        origin = saved["initial_load"] or "random initialisation"
        raise ConfigError(
            f"checkpoint.initial_load_path / initial_load_hf_path = {job['initial_load']}, but {where} continues "
            f"a run that started from {origin}, and a resumed run keeps its own weights. To start a new run from "
            f"{job['initial_load']}, choose a fresh job.dump_folder; to continue this one, unset the initial "
            f"load path")
    if saved["num_shards"] != job["num_shards"]:
        raise ConfigError(f"{where} was saved with data.num_shards = {saved['num_shards']} and this config has "
                          f"{job['num_shards']}; the data position is kept per shard, so set "
                          f"data.num_shards = {saved['num_shards']} to continue this run")
    if not job["num_shards"] and saved["data_parallel_degree"] != job["data_parallel_degree"]:
        raise ConfigError(
            f"{where} was saved by {saved['data_parallel_degree']} data-parallel ranks and this run has "
            f"{job['data_parallel_degree']}; without data.num_shards each data-parallel rank keeps its own data "
            f"position, so resume with {saved['data_parallel_degree']} data-parallel ranks (model and optimizer "
            f"reshard to any layout). Runs started with data.num_shards (a multiple of both degrees) can change "
            f"the data-parallel degree when they resume")


def remove_partial_saves(folder: str):
    """step-N.partial folders are saves a crash interrupted; nothing refers to them."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if name.endswith(".partial"):
            logger.info("removing %s, a save that did not finish", os.path.join(folder, name))
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def move_aside(path: str, reason: str):
    """Rename ``path`` to PATH.REASON (PATH.REASON-2, ... if taken): kept for inspection, out of the step list."""
    target, n = f"{path}.{reason}", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.{reason}-{n}"
    os.rename(path, target)
