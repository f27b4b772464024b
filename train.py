"""titan_mm training entry point: one Trainer, read top to bottom.

build on meta -> [cut into pipeline stages] -> parallelize -> materialise and init -> optimizer, LR
scheduler, dataloader, checkpointer -> loop. Launch with run_train.sh (torchrun) or plain
``python train.py`` on one device.
"""

import contextlib
import dataclasses
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titan_mm.config import ConfigError, JobConfig, parse_args, to_toml
from titan_mm.config import Training as TrainingConfig
from titan_mm.data.batch import BatchShape
from titan_mm.data.dataloader import build_dataloader, data_states
from titan_mm.data.documents import DataError
from titan_mm.data.plan import log_expected_padding
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.eval.harness import TrainingEvaluation
from titan_mm.hf.convert import args_for_hf_folder
from titan_mm.hf.export import InferenceFiles
from titan_mm.models import ModelSpec, get_model_spec
from titan_mm.models.attention import resolve_backend
from titan_mm.models.lora import apply_lora, init_adapters, trained_under_lora
from titan_mm.objectives import args_for_objective, build_objective
from titan_mm.objectives.base import normalise_targets
from titan_mm.parallel.common import group_by_mesh
from titan_mm.parallel.parallel_dims import ParallelDims, ParallelismError
from titan_mm.parallel.pipeline import (build_pipeline_schedule, check_pipeline, microbatch_image_token_index,
                                        pipeline_microbatches, split_stage, stage_indices)
from titan_mm.parallel.sequence import check_sequence_parallel, sequence_parallel_group, shard_batch
from titan_mm.train.checkpoint import CheckpointError, CheckpointManager, checkpoint_folder
from titan_mm.train.cuda_graph import StepGraph
from titan_mm.train.lr_scheduler import build_lr_scheduler
from titan_mm.train.metrics import LossHistory, MetricsLogger, device_peak_tflops
from titan_mm.train.nonfinite import NonFiniteError, NonFiniteGuard, parameters_are_finite
from titan_mm.train.optimizer import build_optimizer
from titan_mm.train.param_groups import check_module_groups, freeze_module_groups
from titan_mm.train.prefetch import DevicePrefetcher
from titan_mm.train.preemption import PreemptionHandler
from titan_mm.train.resume import TrainingComplete, job_fingerprint, plan_resume

logger = logging.getLogger("titan_mm")

MODEL_INPUTS = ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw",
                "image_token_index", "document_lengths", "frame_lengths")
LENGTHS = ("document_lengths", "frame_lengths")
"""Inputs of the varlen attention backend only (their shapes change from batch to batch)."""


EXIT_CODES = {"done": 0, "config": 2, "nonfinite": 3, "checkpoint": 4}
"""Exit codes of train.py (docs/reliability.md); "done" includes a preempted run that saved its checkpoint."""


class TrainState:
    """The step counter and the count of skipped non-finite steps, checkpointed with the rest."""

    def __init__(self):
        self.step = 0
        self.nonfinite_skips = 0

    def state_dict(self):
        return {"step": self.step, "nonfinite_skips": self.nonfinite_skips}

    def load_state_dict(self, state):
        self.step, self.nonfinite_skips = state["step"], state["nonfinite_skips"]


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed()
        setup_logging(self.rank, cfg.job.dump_folder)
        set_determinism(cfg.job.seed, cfg.job.deterministic)

        spec = get_model_spec(cfg.model.name)
        if cfg.model.flavor not in spec.flavors:
            raise ConfigError(f"model.flavor={cfg.model.flavor!r} is not a flavor of {spec.name}; "
                              f"choose one of {sorted(spec.flavors)}")
        self.model_args = spec.flavors[cfg.model.flavor]
        check_module_groups(cfg.training.freeze, spec.param_policy, "training.freeze")
        check_module_groups(list(cfg.optimizer.lr_multipliers), spec.param_policy, "optimizer.lr_multipliers")
        if cfg.checkpoint.initial_load_hf_path and spec.hf_adapter is not None:
            self.model_args = hf_folder_args(spec, cfg)
        self.training_flops = spec.training_flops
        self.tokenizer = Tokenizer(cfg.model.tokenizer_path, spec.special_tokens)

        p = cfg.parallelism
        self.parallel_dims = ParallelDims(
            dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
            cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=p.pipeline_parallel_degree,
            ulysses=p.ulysses_degree, world_size=self.world_size, enable_loss_parallel=p.enable_loss_parallel)
        # the objective decides the decoder's attention and may add a token (MDLM's mask)
        self.objective = build_objective(cfg.objective, self.tokenizer, vocab_parallel=self.parallel_dims.tp_enabled,
                                         loss_parallel=self.parallel_dims.loss_parallel_enabled)
        self.model_args = args_for_objective(self.model_args, self.objective, self.tokenizer)
        vocab = self.model_args.decoder.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ConfigError(f"tokenizer {cfg.model.tokenizer_path} has {self.tokenizer.vocab_size} "
                              f"tokens but {spec.name}/{cfg.model.flavor} embeds only {vocab}")
        check_tensor_parallel(self.parallel_dims, spec, self.model_args, cfg)
        rows_per_forward = cfg.training.local_batch_size
        if self.parallel_dims.pp_enabled:
            self.pp_stage_layers = check_pipeline_job(cfg, spec, self.model_args)
            # the first stage encodes the images of one pipeline microbatch at a time
            rows_per_forward //= pipeline_microbatches(p, cfg.training.local_batch_size)
        backend = resolve_backend(cfg.model.attention_backend, self.device.type)
        check_sequence_parallel(self.parallel_dims, self.model_args.decoder, cfg.training.seq_len,
                                rows_per_forward * cfg.data.image_slots_per_row, backend)
        self.model_args = with_attention_backend(self.model_args, backend)
        self.model_inputs = tuple(k for k in MODEL_INPUTS if backend == "varlen" or k not in LENGTHS)
        check_cuda_graph(cfg, self.device, self.world_size, backend)
        if cfg.eval.interval and self.parallel_dims.ranks_per_batch > 1:
            raise ConfigError("eval.interval evaluates the whole model on each data-parallel rank, which tensor, "
                              "context, Ulysses and pipeline parallelism split; set eval.interval = 0 and "
                              "evaluate the checkpoints with scripts/evaluate.py")
        mesh = self.parallel_dims.build_mesh(self.device.type)
        self.dp_rank = dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        # ranks that see different tokens: the loss and its token count are summed over them
        self.loss_group = mesh["loss"].get_group() if mesh is not None else None
        self.dp_group = mesh["dp"].get_group() if mesh is not None else None
        # ranks of a CP / Ulysses group read the same rows and keep their share of each
        self.sequence_parallel = sequence_parallel_group(mesh, self.parallel_dims)
        self.pp_group = mesh["pp"].get_group() if self.parallel_dims.pp_enabled else None
        # which checkpoint to continue from, refused before the model is built if this config cannot
        self.checkpoint_group = gloo_group()  # DCP's collectives, from its background thread too
        self.job = job_fingerprint(cfg, self.parallel_dims.dp_degree)
        self.resume_step = plan_resume(
            cfg.checkpoint, checkpoint_folder(cfg.checkpoint, cfg.job.dump_folder), self.job, cfg.training.steps,
            rank=self.rank, world_size=self.world_size, group=self.checkpoint_group)
        if self.rank == 0:
            with open(os.path.join(cfg.job.dump_folder, "config.toml"), "w") as f:
                f.write(to_toml(cfg))
        # before the model: a missing data file or an impossible image budget is a config error
        # found in seconds, not after minutes of building and materialising
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, self.model_args.vision_input, seq_len=cfg.training.seq_len,
            batch_size=cfg.training.local_batch_size, dp_rank=dp_rank,
            dp_world=self.parallel_dims.dp_degree, seed=cfg.job.seed, pin_memory=self.device.type == "cuda")

        with torch.device("meta"):
            model = spec.model_cls(self.model_args)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("model %s/%s: %.2fM parameters", spec.name, cfg.model.flavor, n_params / 1e6)
        lora_saved = []  # lora.modules_to_save's modules, trained in full beside the adapters
        if cfg.lora.enabled:
            adapted, lora_saved = apply_lora(model, cfg.lora)
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info("LoRA rank %d on %d Linear layers, modules_to_save %s: %.3fM trainable parameters, "
                        "the rest frozen", cfg.lora.rank, len(adapted), lora_saved, n_trainable / 1e6)
        if cfg.training.freeze:
            # before sharding: FSDP2 then allocates no gradients for them (LoRA adapters and
            # modules_to_save included: applied after LoRA, it can freeze those too)
            frozen = freeze_module_groups(model, cfg.training.freeze, spec.param_policy)
            logger.info("frozen %s: %.2fM parameters", cfg.training.freeze, frozen / 1e6)

        self.compute_dtype = resolve_dtype(cfg.training, self.device)
        if cfg.training.param_dtype == "bf16":
            cast_parameters_(model, torch.bfloat16)  # on the meta device: before any copy or shard
        self.pp_schedule = None
        """The pipeline schedule over this rank's stages (pipeline parallelism only)."""
        if self.parallel_dims.pp_enabled:
            self.model = None  # no rank holds the whole model
            self.model_parts = self.build_pipeline(model, spec, mesh)
        else:
            self.model = self.materialise(spec.parallelize(
                model, self.parallel_dims, mesh, cfg.compile, cfg.activation_checkpoint, self.compute_dtype))
            self.model_parts = [self.model]

        # one optimizer and LR schedule per model part (pipeline stage): checkpoints name parameters
        # per part
        self.optimizers = [build_optimizer(cfg.optimizer, m, self.device, capturable=cfg.compile.cuda_graph,
                                           policy=spec.param_policy) for m in self.model_parts]
        self.lr_schedulers = [build_lr_scheduler(cfg.lr_scheduler, o, cfg.training.steps) for o in self.optimizers]
        self.nonfinite = NonFiniteGuard(cfg.training, self.optimizers, self.device)
        if self.rank == 0 and cfg.data.plan_samples:
            log_expected_padding(cfg.data, self.tokenizer, self.model_args.vision_input,
                                 seq_len=cfg.training.seq_len, seed=cfg.job.seed)
        # on a GPU the next step's batches are read and copied while the current step computes
        self.batches = DevicePrefetcher(
            self.dataloader, self.device, cfg.training.gradient_accumulation_steps, self.prepare_batch,
            data_states(self.dataloader, dp_rank), read_ahead=self.device.type == "cuda")
        self.train_state = TrainState()
        self.losses: list[torch.Tensor] = []
        """Global loss of each step trained by this process (device tensors, read at checkpoints)."""
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, cfg.job.dump_folder, model_parts=self.model_parts, optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers, data_states=self.batches.checkpoint_states(),
            train_state=self.train_state, rank=self.rank, dp_rank=dp_rank, job=self.job,
            group=self.checkpoint_group, hf_adapter=spec.hf_adapter, model_args=self.model_args,
            saved_model_keys=trained_under_lora(lora_saved) if cfg.lora.save_adapters_only else None,
            peft_export_path=cfg.lora.export_peft_path, peft_modules_to_save=lora_saved,
            inference_files=InferenceFiles(self.tokenizer, cfg.data.chat_format, cfg.data.min_pixels,
                                           cfg.data.max_pixels))
        self.checkpointer.load(self.resume_step)
        self.batches_prepared = self.train_state.step * cfg.training.gradient_accumulation_steps
        """Microbatches prepared so far (for their seeds; the steps before a resume count too)."""
        self.nonfinite.start_at(self.train_state.step, self.train_state.nonfinite_skips)
        self.loss_history = LossHistory(os.path.join(cfg.job.dump_folder, "losses.json"), self.train_state.step)
        self.metrics = MetricsLogger(
            log_freq=cfg.metrics.log_freq, total_steps=cfg.training.steps,
            tb_folder=os.path.join(cfg.job.dump_folder, "tb") if cfg.metrics.enable_tensorboard and self.rank == 0 else None,
            peak_tflops=device_peak_tflops(cfg.metrics.peak_tflops), world_size=self.world_size,
            device=self.device, start_step=self.train_state.step)
        self.preemption = PreemptionHandler(gloo_group())
        # only a standalone model gets autocast; FSDP casts parameters itself
        self.autocast = (torch.autocast(self.device.type, dtype=self.compute_dtype)
                         if self.compute_dtype != torch.float32 and not self.parallel_dims.fsdp_enabled
                         else contextlib.nullcontext())
        self.step_graph = StepGraph(self.device_step) if cfg.compile.cuda_graph else None
        self.evaluation = None if not cfg.eval.interval else TrainingEvaluation(
            cfg, self.model, self.model_args, self.tokenizer, self.objective, dp_group=self.dp_group,
            rank=self.rank, autocast=self.autocast)

    def materialise(self, model: torch.nn.Module) -> torch.nn.Module:
        """Allocate a parallelized meta model on the device and initialise it from the job seed."""
        model.to_empty(device=self.device)
        torch.manual_seed(self.cfg.job.seed)
        model.init_weights()
        init_adapters(model)
        return model.train()

    def build_pipeline(self, model: torch.nn.Module, spec: ModelSpec, mesh) -> list[torch.nn.Module]:
        """Cut the meta model into this rank's stages, parallelize and materialise each, and build
        the schedule over them (titan_mm/parallel/pipeline.py)."""
        p = self.cfg.parallelism
        n_stages = len(self.pp_stage_layers)
        indices = stage_indices(mesh["pp"].get_local_rank(), p.pipeline_parallel_degree,
                                p.pipeline_parallel_stages_per_rank)
        parts = []
        for i in indices:
            stage = split_stage(model, i, self.pp_stage_layers[i], n_stages)
            parts.append(self.materialise(spec.parallelize(
                stage, self.parallel_dims, mesh, self.cfg.compile, self.cfg.activation_checkpoint,
                self.compute_dtype)))
        logger.info("pipeline: %d stages, decoder layers %s; this rank holds stages %s",
                    n_stages, [f"{r.start}-{r.stop - 1}" for r in self.pp_stage_layers], indices)
        self.pp_has_first_stage, self.pp_has_last_stage = 0 in indices, n_stages - 1 in indices
        self.pp_schedule = build_pipeline_schedule(
            p, parts, indices, n_stages, self.cfg.training.local_batch_size, self.device, self.pp_group,
            loss_fn=lambda h_BSD, targets: self.objective.loss(h_BSD, parts[-1].decoder.head_weight(), targets))
        return parts

    def train(self):
        cfg = self.cfg.training
        logger.info("training %d steps from step %d: %d x %d tokens per microbatch, %d microbatches, "
                    "%d data-parallel ranks, %s compute", cfg.steps, self.train_state.step,
                    cfg.local_batch_size, cfg.seq_len, cfg.gradient_accumulation_steps,
                    self.parallel_dims.dp_degree, str(self.compute_dtype).removeprefix("torch."))
        self.preemption.install()
        try:
            while self.train_state.step < cfg.steps:
                self.train_state.step += 1
                self.train_step()
                if self.end_of_step():
                    break
        finally:
            # on every way out: the save in flight is committed, losses.json covers every step trained
            self.preemption.close()
            self.checkpointer.close()
            self.metrics.close()
            if self.rank == 0:
                self.loss_history.write(self.losses)

    def end_of_step(self) -> bool:
        """Checkpoint (and export) when due, or when a preemption signal asks for it; returns whether
        the run stops here."""
        step, ckpt = self.train_state.step, self.cfg.checkpoint
        last = step == self.cfg.training.steps
        preempted = self.preemption.requested()
        save = self.checkpointer.due(step, last) or (preempted and ckpt.enable)
        if save or (last and (ckpt.export_hf_path or self.cfg.lora.export_peft_path)):
            self.check_finite(step)
        if save:
            self.checkpointer.save(step, wait=last or preempted, last_step=last)
            if self.rank == 0:
                self.loss_history.write(self.losses)
        else:
            self.checkpointer.poll()
        if last and ckpt.export_hf_path:
            self.checkpointer.export_hf(ckpt.export_hf_path)
        if last and self.cfg.lora.export_peft_path:
            self.checkpointer.export_peft()
        if self.evaluation is not None and self.evaluation.due(step, last) and not preempted:
            self.evaluation.run(step, self.metrics.writer)
        if preempted:
            saved = f"saved checkpoint step-{step}" if ckpt.enable else "checkpoint.enable = false: nothing saved"
            logger.warning("preempted (%s) at step %d: %s; run the same command to resume",
                           self.preemption.signal_name or "a signal on another rank", step, saved)
        return preempted

    def check_finite(self, step: int):
        """Nothing non-finite is checkpointed: raises NonFiniteError if the run must stop."""
        self.train_state.nonfinite_skips = self.nonfinite.poll()
        if not parameters_are_finite(self.model_parts):
            raise NonFiniteError(f"step {step}: the parameters hold NaN or inf although every step's loss and "
                                 f"gradient norm were finite (an update overflowed); not checkpointed. Resume "
                                 f"from the latest checkpoint with a lower optimizer.lr")

    def prepare_batch(self, mb: dict) -> dict:
        """Host work on a loader batch before it goes to the device: its facts for throughput and
        MFU (of whole rows), the objective's inputs and targets, then this rank's share of each row
        under CP / Ulysses."""
        shape = BatchShape.of(mb)
        mb = self.objective.prepare(mb, self.next_batch_seed())
        if self.sequence_parallel is not None:
            mb = shard_batch(mb, self.sequence_parallel)
        return {**mb, "shape": shape}

    def train_step(self):
        cfg = self.cfg.training
        microbatches, data_wait_s = self.batches.next_step()
        shapes = [mb["shape"] for mb in microbatches]
        if self.step_graph is not None:
            inputs = [{k: mb[k] for k in (*self.model_inputs, "targets", "loss_tokens")} for mb in microbatches]
            # the graph's outputs are rewritten by the next replay
            loss, grad_norm = (t.clone() for t in self.step_graph(inputs))
        else:
            loss, grad_norm = self.device_step(microbatches)  # the global loss
        if self.train_state.step < cfg.steps:
            self.batches.prefetch()  # while the device works through the step just launched
        for lr_scheduler in self.lr_schedulers:
            lr_scheduler.step()

        step = self.train_state.step
        data_stats = {}
        for mb in microbatches:
            for k, v in mb["stats"].items():
                data_stats[k] = data_stats.get(k, 0) + v
        # per GPU: CP / Ulysses, TP and PP ranks share the work of one data-parallel batch
        share = self.parallel_dims.ranks_per_batch
        flops = sum(self.training_flops(self.model_args, s) for s in shapes) / share
        self.metrics.record_step(tokens=sum(s.tokens for s in shapes) / share, flops=flops,
                                 data_stats=data_stats, skipped=[ref for mb in microbatches for ref in mb["skipped"]],
                                 data_wait_s=data_wait_s)
        self.losses.append(loss)
        if self.metrics.should_log(step):
            skipped_steps = self.nonfinite.poll()  # the log line's device read; raises if the run must stop
            data_totals = self.metrics.data_totals
            if self.dp_group is not None:
                data_totals = sum_across_ranks(data_totals, self.dp_group)
            self.metrics.log(step, loss=loss.item(), grad_norm=grad_norm.item(), data_totals=data_totals,
                             lr=self.lr_schedulers[0].get_last_lr()[0], skipped_steps=skipped_steps,
                             row_slots=cfg.seq_len * cfg.local_batch_size * cfg.gradient_accumulation_steps)

    def device_step(self, microbatches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every microbatch, gradient clipping, optimizer: (global loss, grad
        norm). No host syncs: this is what ``compile.cuda_graph`` captures."""
        # loss = sum of weighted token losses / the objective's loss tokens of the whole global batch
        num_tokens = sum(mb["loss_tokens"].sum() for mb in microbatches).float().to(self.device)
        if self.loss_group is not None:
            dist.all_reduce(num_tokens, group=self.loss_group)
        loss = torch.zeros((), device=self.device)
        forward_backward = self.pipeline_forward_backward if self.pp_schedule else self.forward_backward
        for mb in microbatches:
            targets = normalise_targets(mb["targets"].to(self.device, non_blocking=True), num_tokens)
            loss += forward_backward(mb, targets)
        # collectives, not host syncs: every rank holds the global loss before the non-finite check
        if self.loss_group is not None:
            dist.all_reduce(loss, group=self.loss_group)
        if self.pp_group is not None:
            dist.all_reduce(loss, group=self.pp_group)  # only the last stage's is not zero
        params = [p for part in self.model_parts for p in part.parameters()]
        self.nonfinite.poison_drill_gradients(params)
        grad_norm = clip_grad_norm_(params, self.cfg.training.max_norm, pp_group=self.pp_group)
        # a NaN / inf loss or gradient norm drops the update below, on the device (train/nonfinite.py)
        self.nonfinite.check(loss, grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def forward_backward(self, mb: dict, targets: torch.Tensor) -> torch.Tensor:
        """One microbatch forward and backward; ``targets`` weighted for the global batch. Returns
        its share of the global loss."""
        inputs = {k: mb[k].to(self.device, non_blocking=True) for k in self.model_inputs}
        with self.objective.context():
            with self.autocast:
                h_BSD = self.model(**inputs)
                loss = self.objective.loss(h_BSD, self.model.decoder.head_weight(), targets)
            loss.backward()
        return loss.detach()

    # --- pipeline parallelism: the schedule runs forward and backward of every microbatch ---------

    def pipeline_forward_backward(self, mb: dict, targets: torch.Tensor) -> torch.Tensor:
        """One local batch (this rank's sequence shard under CP / Ulysses) through the pipeline
        schedule, cut into microbatches along the rows; returns this rank's share of the loss (the
        last stage's sum over microbatches, zero on other ranks)."""
        n_mb = pipeline_microbatches(self.cfg.parallelism, self.cfg.training.local_batch_size)
        kwargs = {k: mb[k].to(self.device, non_blocking=True)
                  for k in ("position_ids", "document_ids", "document_lengths")}
        args = ()
        if self.pp_has_first_stage:
            args = (mb["input_ids"].to(self.device, non_blocking=True),)
            media = {k: mb[k].to(self.device, non_blocking=True)
                     for k in ("pixel_values", "grid_thw", "frame_lengths")}
            merge_area = self.model_args.vision_input.spatial_merge_size ** 2
            pixels = mb["pixel_values"]
            slots_per_row = pixels.shape[0] // mb["input_ids"].shape[0] * pixels.shape[1] // merge_area
            media["image_token_index"] = microbatch_image_token_index(
                mb["image_token_index"], n_mb, slots_per_row).to(self.device, non_blocking=True)
            kwargs.update(media)
        # the last stage applies the objective to each microbatch's final hidden states
        target = targets if self.pp_has_last_stage else None
        losses = []
        with self.objective.context(), self.autocast:
            # return_outputs=False: the last stage does not concatenate the microbatches' outputs
            self.pp_schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not self.pp_has_last_stage:
            return torch.zeros((), device=self.device)
        return torch.stack(losses).sum().detach()

    def next_batch_seed(self) -> int:
        """The seed of the next microbatch prepared: a function of the step and of the
        microbatch's place in the global batch (data-parallel rank, then accumulation index), the
        same in every parallel layout and on resume."""
        accumulate = self.cfg.training.gradient_accumulation_steps
        step_index, j = divmod(self.batches_prepared, accumulate)
        self.batches_prepared += 1
        global_microbatch = self.dp_rank * accumulate + j
        return (self.cfg.job.seed * 1_000_003 + step_index) * 1_000_003 + global_microbatch


def check_pipeline_job(cfg: JobConfig, spec: ModelSpec, model_args) -> list[range]:
    """Pipeline settings that cannot work fail before anything is built; returns each stage's layers."""
    if cfg.checkpoint.initial_load_hf_path or cfg.checkpoint.export_hf_path or cfg.lora.export_peft_path:
        raise ConfigError("checkpoint.initial_load_hf_path / export_hf_path / lora.export_peft_path need the whole "
                          "model on each rank "
                          "and do not work with pipeline parallelism; convert with scripts/convert_hf_to_dcp.py "
                          "(then checkpoint.initial_load_path) or scripts/convert_dcp_to_hf.py instead")
    first_stage_layers = spec.pipeline_first_stage_layers(model_args) if spec.pipeline_first_stage_layers else 1
    return check_pipeline(cfg.parallelism, cfg.training.local_batch_size, model_args.decoder, first_stage_layers)


def hf_folder_args(spec: ModelSpec, cfg: JobConfig):
    """The flavor's args with the metadata (token ids) of checkpoint.initial_load_hf_path's
    config.json, so that an HF export writes the checkpoint's own ids; the folder must hold the
    flavor's architecture."""
    try:
        return args_for_hf_folder(spec, cfg.checkpoint.initial_load_hf_path, cfg.model.flavor)
    except ValueError as e:
        raise ConfigError(f"checkpoint.initial_load_hf_path: {e}") from None


def check_cuda_graph(cfg: JobConfig, device: torch.device, world_size: int, backend: str):
    """compile.cuda_graph needs one GPU and fixed shapes."""
    if not cfg.compile.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError("compile.cuda_graph needs a CUDA device")
    if world_size > 1:
        raise ConfigError("compile.cuda_graph runs on one GPU only: FSDP, TP, CP and PP issue collectives and "
                          "host work every step; set compile.cuda_graph = false")
    if backend == "varlen":
        raise ConfigError("compile.cuda_graph needs fixed shapes, and the varlen attention backend's segment "
                          "counts change from batch to batch; use model.attention_backend = flex, flex_flash "
                          "or sdpa")


def check_tensor_parallel(dims: ParallelDims, spec: ModelSpec, model_args, cfg: JobConfig):
    """Every size that tensor parallelism splits must divide by the tp degree (checked before any compute)."""
    if not dims.tp_enabled:
        return
    if spec.tensor_parallel_sizes is None:
        raise ParallelismError(f"model {spec.name} has no tensor parallelism; set "
                               f"parallelism.tensor_parallel_degree = 1")
    for what, size in spec.tensor_parallel_sizes(model_args, cfg).items():
        dims.check_divisible(what, size, "tp")


def with_attention_backend(model_args, backend: str):
    """The family's args with ``backend`` in every sub-model that has an attention_backend."""
    changes = {name: dataclasses.replace(sub, attention_backend=backend)
               for name, sub in vars(model_args).items()
               if dataclasses.is_dataclass(sub) and hasattr(sub, "attention_backend")}
    return dataclasses.replace(model_args, **changes)


def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> torch.Tensor:
    """Global L2 norm of all gradients (across every shard and pipeline stage), clipped to max_norm if > 0.

    foreach kernels take one kind of tensor: gradients are grouped by DTensor mesh (plain tensors
    apart), each group's norm is made whole with full_tensor(), and the group norms combined. Pipeline
    stages hold different parameters: their squared norms are summed over the pp group.
    """
    params = [p for p in parameters if p.grad is not None]
    norms = []
    for group in group_by_mesh(params):
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if pp_group is not None:
        total = total ** 2
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    if max_norm > 0:
        for group in group_by_mesh(params):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total


def sum_across_ranks(counts: dict, group) -> dict:
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(counts), group=group)
    total = {}
    for c in gathered:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def gloo_group():
    """A new CPU (gloo) group of every rank, or None in a single process (a collective call)."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun; a plain run is a single process."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def setup_logging(rank: int, dump_folder: str):
    """Rank 0 logs to the console and appends to dump_folder/train.log (every run of the folder)."""
    handlers = [logging.StreamHandler()]
    if rank == 0:
        os.makedirs(dump_folder, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(dump_folder, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)


def set_determinism(seed: int, deterministic: bool):
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype:
    """The compute dtype: bf16 parameters compute in bf16 on every device."""
    if cfg.mixed_precision == "auto":
        bf16 = device.type == "cuda" or cfg.param_dtype == "bf16"
        return torch.bfloat16 if bf16 else torch.float32
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def cast_parameters_(model: torch.nn.Module, dtype: torch.dtype):
    """Every parameter to ``dtype`` in place (tied parameters stay tied); buffers keep their dtypes."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def main(argv: list[str]) -> int:
    try:
        cfg, print_config = parse_args(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if print_config:
        print(to_toml(cfg))
        return 0
    try:
        Trainer(cfg).train()
    except TrainingComplete as e:
        logger.info("%s", e)
        return EXIT_CODES["done"]
    except (ConfigError, ParallelismError, DataError) as e:
        print(f"{'data' if isinstance(e, DataError) else 'config'} error: {e}", file=sys.stderr)
        return EXIT_CODES["config"]
    except NonFiniteError as e:
        print(f"non-finite values: {e}", file=sys.stderr)
        return EXIT_CODES["nonfinite"]
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return EXIT_CODES["checkpoint"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_CODES["done"]


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if "WORLD_SIZE" in os.environ:
        # Everything is saved and closed. Skip interpreter shutdown: there gloo's worker threads can
        # still release tensors they hold, and the process aborts ("terminate called without an
        # active exception", ~1 in 20 runs of two CPU processes on torch 2.13).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
