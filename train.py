"""titan_mm training entry point: one Trainer, read top to bottom.

build on meta -> parallelize -> materialise and init -> optimizer, LR scheduler, dataloader,
checkpointer -> loop. Launch with run_train.sh (torchrun) or plain ``python train.py`` on one device.
"""

import contextlib
import dataclasses
import json
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titan_mm.config import ConfigError, JobConfig, parse_args, to_toml
from titan_mm.data.batch import BatchShape
from titan_mm.data.dataloader import build_dataloader
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.models import ModelSpec, get_model_spec
from titan_mm.models.attention import resolve_backend
from titan_mm.parallel.common import group_by_mesh
from titan_mm.parallel.parallel_dims import ParallelDims, ParallelismError
from titan_mm.parallel.sequence import SequenceParallel, check_sequence_parallel, shard_batch
from titan_mm.train.checkpoint import CheckpointManager
from titan_mm.train.loss import loss_parallel_context, loss_sum
from titan_mm.train.lr_scheduler import build_lr_scheduler
from titan_mm.train.metrics import MetricsLogger, device_peak_tflops
from titan_mm.train.optimizer import build_optimizer

logger = logging.getLogger("titan_mm")

MODEL_INPUTS = ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw",
                "image_token_index", "document_lengths", "frame_lengths")


class TrainState:
    """The step counter, checkpointed with the rest."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed()
        setup_logging(self.rank)
        if self.rank == 0:
            os.makedirs(cfg.job.dump_folder, exist_ok=True)
            with open(os.path.join(cfg.job.dump_folder, "config.toml"), "w") as f:
                f.write(to_toml(cfg))
        set_determinism(cfg.job.seed, cfg.job.deterministic)

        spec = get_model_spec(cfg.model.name)
        if cfg.model.flavor not in spec.flavors:
            raise ConfigError(f"model.flavor={cfg.model.flavor!r} is not a flavor of {spec.name}; "
                              f"choose one of {sorted(spec.flavors)}")
        self.model_args = spec.flavors[cfg.model.flavor]
        self.training_flops = spec.training_flops
        self.tokenizer = Tokenizer(cfg.model.tokenizer_path, spec.special_tokens)
        vocab = self.model_args.decoder.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ConfigError(f"tokenizer {cfg.model.tokenizer_path} has {self.tokenizer.vocab_size} "
                              f"tokens but {spec.name}/{cfg.model.flavor} embeds only {vocab}")

        p = cfg.parallelism
        self.parallel_dims = ParallelDims(
            dp_replicate=p.data_parallel_replicate_degree, dp_shard=p.data_parallel_shard_degree,
            cp=p.context_parallel_degree, tp=p.tensor_parallel_degree, pp=1, ulysses=p.ulysses_degree,
            world_size=self.world_size, enable_loss_parallel=p.enable_loss_parallel)
        check_tensor_parallel(self.parallel_dims, spec, self.model_args, cfg)
        backend = resolve_backend(cfg.model.attention_backend, self.device.type)
        check_sequence_parallel(self.parallel_dims, self.model_args.decoder, cfg.training.seq_len,
                                cfg.training.local_batch_size * cfg.data.max_images_per_row, backend)
        self.model_args = with_attention_backend(self.model_args, backend)
        mesh = self.parallel_dims.build_mesh(self.device.type)
        dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        # ranks that see different tokens: the loss and its token count are summed over them
        self.loss_group = mesh["loss"].get_group() if mesh is not None else None
        self.dp_group = mesh["dp"].get_group() if mesh is not None else None
        # ranks of a CP / Ulysses group read the same rows and keep their share of each
        self.sequence_parallel = None
        if self.parallel_dims.cp_enabled or self.parallel_dims.ulysses_enabled:
            mode = "cp" if self.parallel_dims.cp_enabled else "ulysses"
            self.sequence_parallel = SequenceParallel(mode, mesh[mode])

        with torch.device("meta"):
            model = spec.model_cls(self.model_args)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info("model %s/%s: %.2fM parameters", spec.name, cfg.model.flavor, n_params / 1e6)

        self.compute_dtype = resolve_dtype(cfg.training.mixed_precision, self.device)
        model = spec.parallelize(model, self.parallel_dims, mesh, cfg.compile, cfg.activation_checkpoint,
                                 self.compute_dtype)
        model.to_empty(device=self.device)
        torch.manual_seed(cfg.job.seed)
        model.init_weights()
        model.train()
        self.model = model

        self.optimizer = build_optimizer(cfg.optimizer, model, self.device.type)
        self.lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, self.optimizer, cfg.training.steps)
        self.dataloader = build_dataloader(
            cfg.data, self.tokenizer, self.model_args.vision_input, seq_len=cfg.training.seq_len,
            batch_size=cfg.training.local_batch_size, dp_rank=dp_rank,
            dp_world=self.parallel_dims.dp_degree, seed=cfg.job.seed)
        self.train_state = TrainState()
        self.losses: list[torch.Tensor] = []
        """Global loss of each step trained by this process (device tensors, read them at the end)."""
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, cfg.job.dump_folder, model=model, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, dataloader=self.dataloader, train_state=self.train_state,
            rank=self.rank, dp_rank=dp_rank, hf_adapter=spec.hf_adapter, model_args=self.model_args)
        self.checkpointer.load()
        self.metrics = MetricsLogger(
            log_freq=cfg.metrics.log_freq, total_steps=cfg.training.steps,
            tb_folder=os.path.join(cfg.job.dump_folder, "tb") if cfg.metrics.enable_tensorboard and self.rank == 0 else None,
            peak_tflops=device_peak_tflops(cfg.metrics.peak_tflops), world_size=self.world_size,
            device=self.device)
        # only a standalone model gets autocast; FSDP casts parameters itself
        self.autocast = (torch.autocast(self.device.type, dtype=self.compute_dtype)
                         if self.compute_dtype != torch.float32 and not self.parallel_dims.fsdp_enabled
                         else contextlib.nullcontext())

    def train(self):
        cfg = self.cfg.training
        logger.info("training %d steps from step %d: %d x %d tokens per microbatch, %d microbatches, "
                    "%d data-parallel ranks, %s compute", cfg.steps, self.train_state.step,
                    cfg.local_batch_size, cfg.seq_len, cfg.gradient_accumulation_steps,
                    self.parallel_dims.dp_degree, str(self.compute_dtype).removeprefix("torch."))
        data_iter = iter(self.dataloader)
        while self.train_state.step < cfg.steps:
            self.train_state.step += 1
            self.train_step(data_iter)
            self.checkpointer.maybe_save(self.train_state.step, last_step=self.train_state.step == cfg.steps)
        self.metrics.close()
        if self.rank == 0:
            self.write_losses()

    def write_losses(self):
        """losses.json: {step: loss} of the steps this process trained (for loss comparisons)."""
        first = self.train_state.step - len(self.losses) + 1
        losses = {first + i: loss.item() for i, loss in enumerate(self.losses)}
        with open(os.path.join(self.cfg.job.dump_folder, "losses.json"), "w") as f:
            json.dump(losses, f, indent=0)

    def train_step(self, data_iter):
        cfg = self.cfg.training
        microbatches = [next(data_iter) for _ in range(cfg.gradient_accumulation_steps)]
        shapes = [BatchShape.of(mb) for mb in microbatches]
        sp_degree = 1
        if self.sequence_parallel is not None:
            sp_degree = self.sequence_parallel.degree
            microbatches = [shard_batch(mb, self.sequence_parallel) for mb in microbatches]
        # loss = sum of token losses / valid label tokens of the whole global batch
        num_labels = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in microbatches).float().to(self.device)
        if self.loss_group is not None:
            dist.all_reduce(num_labels, group=self.loss_group)
        loss = torch.zeros((), device=self.device)
        for mb in microbatches:
            loss += self.forward_backward(mb, num_labels)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        step = self.train_state.step
        data_stats = {}
        for mb in microbatches:
            for k, v in mb["stats"].items():
                data_stats[k] = data_stats.get(k, 0) + v
        # this rank's share: a sequence-parallel group splits each row's tokens and images
        flops = sum(self.training_flops(self.model_args, s) for s in shapes) / sp_degree
        self.metrics.record_step(tokens=sum(s.tokens for s in shapes) // sp_degree, flops=flops,
                                 data_stats=data_stats, skipped=[ref for mb in microbatches for ref in mb["skipped"]])
        if self.loss_group is not None:
            dist.all_reduce(loss, group=self.loss_group)  # a collective, not a host sync
        self.losses.append(loss)
        if self.metrics.should_log(step):
            data_totals = self.metrics.data_totals
            if self.dp_group is not None:
                data_totals = sum_across_ranks(data_totals, self.dp_group)
            self.metrics.log(step, loss=loss.item(), grad_norm=grad_norm.item(), data_totals=data_totals,
                             lr=self.lr_scheduler.get_last_lr()[0],
                             row_slots=cfg.seq_len * cfg.local_batch_size * cfg.gradient_accumulation_steps)

    def forward_backward(self, mb: dict, num_labels: torch.Tensor) -> torch.Tensor:
        inputs = {k: mb[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS}
        labels = mb["labels"].to(self.device, non_blocking=True)
        # loss parallelism: the loss and its backward on vocabulary-sharded logits (train/loss.py)
        with loss_parallel_context(self.parallel_dims.loss_parallel_enabled):
            if self.parallel_dims.tp_enabled:
                with self.autocast:
                    logits = self.model(**inputs)
                loss = loss_sum(logits, labels) / num_labels
            else:
                # output head + cross-entropy fused in chunks inside the model (models/loss.py)
                with self.autocast:
                    loss = self.model(**inputs, labels=labels) / num_labels
            loss.backward()
        return loss.detach()


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


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (across every shard), clipped to max_norm if > 0.

    foreach kernels take one kind of tensor: gradients are grouped by DTensor mesh (plain tensors
    apart), each group's norm is made whole with full_tensor(), and the group norms combined.
    """
    params = [p for p in parameters if p.grad is not None]
    norms = []
    for group in group_by_mesh(params):
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
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


def setup_logging(rank: int):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)


def set_determinism(seed: int, deterministic: bool):
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


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
        trainer = Trainer(cfg)
    except (ConfigError, ParallelismError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
