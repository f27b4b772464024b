"""Job configuration: one dataclass per TOML section, a docstring under every field.

A run is configured by a TOML file plus ``--section.key value`` overrides on the command line.
Every key is checked before any model is built: an unknown key, a value of the wrong type or an
impossible value stops the run with one message naming the key and the file.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, reported before anything is built."""


@dataclass
class Job:
    dump_folder: str = "./outputs/debug_vlm"
    """Folder for checkpoints, TensorBoard events and the merged config of this run."""
    description: str = ""
    """Free text shown at start-up."""
    seed: int = 0
    """Seed for model init, data order and every random op of the run."""
    deterministic: bool = False
    """Use deterministic algorithms only (slower on GPU; CPU runs are deterministic anyway)."""


@dataclass
class Model:
    name: str = "llava"
    """Model family, a folder under titan_mm/models (e.g. llava)."""
    flavor: str = "debug"
    """Size preset of the family (see the family's FLAVORS dict)."""
    tokenizer_path: str = "assets/tokenizer"
    """Folder holding tokenizer.json and tokenizer_config.json."""
    attention_backend: Literal["auto", "sdpa", "flex", "flex_flash", "varlen"] = "auto"
    """Attention kernel of the ViT and the decoder (docs/performance.md): varlen = flash attention
    over the packed segments (CUDA; flash-attn's kernel when installed, else PyTorch's), flex =
    FlexAttention with block-sparse document / per-image masks, flex_flash = the same masks run
    by FlashAttention-4 kernels (needs flash-attn-4; faster on long documents), sdpa = dense boolean
    masks (any device). auto = flex on CUDA, sdpa on CPU."""


DatasetKind = Literal["captions", "interleaved", "chat", "text", "webdataset"]


@dataclass
class Data:
    dataset: DatasetKind = "captions"
    """Kind of samples in ``path`` (docs/data.md): captions = image-caption pairs; interleaved = text
    and images in order ("content" parts, or OBELICS' "texts"/"images" columns); chat = OpenAI-style
    "messages", only assistant turns trained on; text = plain text, cut into seq_len chunks; all read
    from .jsonl, .json (an array), .parquet or (text only) .txt files, the format taken from the
    extension. webdataset = image-caption pairs in .tar shards (members KEY.jpg/png/jpeg/webp and
    KEY.txt or KEY.json with a "caption" or "txt" field)."""
    chat_format: Literal["plain", "chatml", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llama3"] = "plain"
    """dataset = "chat": how conversations are written out (titan_mm/data/chat.py). plain = ChatML
    with the bundled debug tokenizer's <|bos|> and <|eos|>; chatml and qwen3_vl = <|im_start|>role
    ... <|im_end|>; qwen2_vl and qwen2_5_vl = the same plus the default system prompt "You are a
    helpful assistant."; llama3 = Llama 3 headers and <|eot_id|>."""
    video_fps: float = 2.0
    """Video files (chat and interleaved): frames sampled per second of video (uniformly)."""
    video_max_frames: int = 16
    """Video files: at most this many sampled frames per video (at least 2, padded to an even count)."""
    path: str = "assets/sample_data/captions_train.jsonl"
    """Data file, or a glob of them (several: comma-separated), ending in .jsonl, .json, .parquet,
    .txt or (webdataset) .tar; media paths inside are relative to the file's folder. Files are
    streamed, never loaded whole."""
    mixture_paths: list[str] = field(default_factory=list)
    """A weighted mixture of sources instead of ``path``: one path (or shard glob) per source. Each
    sample comes from source i with probability mixture_weights[i] / sum(mixture_weights)."""
    mixture_weights: list[float] = field(default_factory=list)
    """Mixture: one weight > 0 per entry of mixture_paths (need not sum to 1)."""
    mixture_kinds: list[DatasetKind] = field(default_factory=list)
    """Mixture: the ``dataset`` kind of each entry of mixture_paths; empty = all are ``dataset``."""
    image_slots_per_row: int = 8
    """N: patch slots per packed row of seq_len tokens; pixel_values is [batch*N, L, D]. A slot
    holds the patches of as many images (and video frames) as fit, so N does not limit the images
    of a row: a row takes documents while its tokens fit seq_len and its images fit the N x L
    patches (docs/data.md)."""
    patches_per_slot: int = 256
    """L: patches per slot (before spatial merge): the largest image (or video frame) a row can
    hold, so it bounds max_pixels from above; a multiple of the merge area."""
    min_pixels: int = 32 * 32
    """Images smaller than this are upscaled (aspect kept) before patchifying."""
    max_pixels: int = 128 * 128
    """Images larger than this are downscaled (aspect kept) before patchifying."""
    pack_open_bins: int = 16
    """Best-fit packer: how many partly filled rows are kept open for incoming documents."""
    num_workers: int | Literal["auto"] = 0
    """DataLoader worker processes per rank (0 = load in the training process). "auto" = the CPUs
    this process may run on (os.sched_getaffinity) divided by the ranks of this node
    (LOCAL_WORLD_SIZE), less one for the training process; 0 with data.num_shards. The count is
    logged at start; resume needs the same count (a checkpoint names it when they differ)."""
    num_shards: int = 0
    """Data shards independent of the layout: the data is read as this many independent streams
    (each its own share of the samples and its own packer), each data-parallel rank hosting
    num_shards / dp of them and taking one row from each in turn. Checkpoints keep one state per
    shard, so a run resumes under another data-parallel degree (e.g. FSDP(4) -> FSDP(2) x TP(2)
    with local_batch_size doubled) and continues the same global batches. Must be a multiple of the
    data-parallel degree and divide into local_batch_size x dp; needs num_workers = 0. 0 = one
    stream per data-parallel rank (checkpoints then resume only under the same dp degree)."""
    plan_samples: int = 64
    """At start, rank 0 reads this many samples (apart from the training stream) and logs the token
    and patch padding that the budgets training.seq_len, N and L give on them
    (scripts/plan_batch.py prints the full table of choices); 0 = skip."""
    shuffle: bool = True
    """Reshuffle the samples every epoch (seeded by job.seed and the epoch): the order of files
    (Parquet: row groups; webdataset: shards) and a shuffle buffer of records."""
    shuffle_buffer: int = 1000
    """Records each loader worker holds and draws from at random (streamed formats, with shuffle);
    larger mixes better and costs memory (raw records, e.g. Parquet image bytes); 1 = file order."""
    text_split: Literal["paragraph", "file"] = "paragraph"
    """dataset = "text" from .txt files: each blank-line separated paragraph is a document
    (paragraph), or each file is one (file). Either way long documents are cut into seq_len chunks."""


@dataclass
class Training:
    steps: int = 300
    """Optimizer steps to train for."""
    local_batch_size: int = 1
    """Packed rows per microbatch on each data-parallel rank."""
    seq_len: int = 512
    """Tokens per packed row (S)."""
    gradient_accumulation_steps: int = 1
    """Microbatches summed into one optimizer step."""
    max_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: auto = bf16 on GPU, fp32 on CPU (bf16 whenever param_dtype = bf16)."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the parameters, their gradients and the AdamW state. fp32: fp32 master weights, 16
    bytes a parameter with AdamW, compute in the mixed_precision dtype. bf16: everything in bf16, 8
    bytes a parameter, as HF transformers trains a model loaded in bfloat16 (and as the synthetic
    benchmark and the HF baselines run): 17 GB less for a 2B model, at the cost of updates smaller
    than bf16's resolution of a weight being lost (no fp32 master copy). Buffers (rotary tables)
    keep their dtypes; the loss is still reduced in fp32."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient norm is NaN or inf (checked on the device, read by the host at
    log steps and checkpoints; docs/reliability.md): skip = drop its update, leaving parameters and
    optimizer state bit-identical, count it, and stop after nonfinite_max_consecutive of them in a
    row; stop = end the run at the first one. A stopped run exits with code 3 naming the step, and
    nothing after the last finite step is checkpointed. skip needs the fused AdamW kernel
    (optimizer.implementation = auto or fused), which takes the flag on the device."""
    nonfinite_max_consecutive: int = 5
    """nonfinite = "skip": stop the run after this many non-finite steps in a row."""
    freeze: list[str] = field(default_factory=list)
    """Module groups that do not train, e.g. ["vision", "decoder"] to align a projector: no
    gradients, no optimizer state (FSDP keeps no gradient buffers for them), weights unchanged.
    Module groups: vision, projector, decoder (llama: decoder)."""


@dataclass
class Optimizer:
    name: Literal["adamw", "muon"] = "adamw"
    """adamw = AdamW for every parameter; muon = Muon (Newton-Schulz orthogonalised Nesterov
    momentum, scaled by Moonlight's 0.2 sqrt(max(m, n)) so that lr and weight_decay carry over from
    AdamW) for the weight matrices of the vision and decoder blocks, AdamW with the settings below
    for everything else (docs/optimizers.md)."""
    lr: float = 1e-3
    """Peak learning rate."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Learning rate of a module group as a multiple of lr, e.g. {vision = 0.1} (command line:
    vision=0.1,projector=2). Module groups: vision, projector, decoder (llama: decoder); groups not
    named train at lr."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms, biases or embeddings)."""
    implementation: Literal["auto", "for-loop", "foreach", "fused"] = "auto"
    """AdamW kernel: auto = fused (GPU and CPU alike: its found_inf input is how training.nonfinite =
    "skip" drops a step without a host sync)."""
    muon_momentum: float = 0.95
    """Muon: momentum of the matrices' gradients (Nesterov if muon_nesterov)."""
    muon_nesterov: bool = True
    """Muon: orthogonalise grad + momentum * (buffer - grad) rather than the buffer."""
    muon_ns_steps: int = 5
    """Muon: quintic Newton-Schulz iterations."""
    muon_ns_dtype: Literal["bf16", "fp32"] = "bf16"
    """Muon: dtype of the Newton-Schulz iteration (fp32: for exact comparisons, e.g. layout parity tests)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 20
    """Linear warmup from ~0 to the peak learning rate over this many steps."""
    decay_type: Literal["cosine", "linear", "wsd"] = "cosine"
    """Shape after warmup; wsd = constant, then a linear decay over the last decay_ratio of steps."""
    decay_ratio: float = 0.2
    """wsd only: fraction of training steps spent decaying."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""


@dataclass
class Checkpoint:
    enable: bool = True
    """Save distributed checkpoints (torch.distributed.checkpoint) under dump_folder/folder."""
    folder: str = "checkpoint"
    """Subfolder of job.dump_folder holding step-N checkpoint folders."""
    interval: int = 100
    """Save every this many steps; the last step is always saved."""
    keep_latest_k: int = 3
    """Delete older checkpoints, keeping this many (0 keeps all)."""
    resume: Literal["auto", "never", "require"] = "auto"
    """auto = continue from the newest good checkpoint of the dump folder if it has one, else start
    from the initial weights; require = the same, but a folder without a checkpoint is an error (a
    requeued job must not start over); never = start from the initial weights, and a folder that
    already holds checkpoints is an error (pick a fresh job.dump_folder). Either way a checkpoint
    this config cannot continue (another model, data-parallel layout or starting point, or more
    steps done than training.steps) is refused before the model is built (docs/reliability.md)."""
    load_step: int = -1
    """Resume from this step (a damaged one is an error); -1 = the newest good checkpoint (a damaged
    newest one is reported and the one before it used). Checkpoints after load_step belong to the
    abandoned continuation: they are renamed step-N.superseded."""
    async_save: bool = True
    """Write checkpoints in a background thread: the step waits only while this rank's state is
    copied to host memory (which keeps a second copy of it), not for the disk. The last step and a
    preemption save wait for the write to finish."""
    initial_load_path: str = ""
    """Start from these weights (a DCP folder with model weights only) when there is nothing to
    resume. A checkpoint in the dump folder from a run that started elsewhere is refused."""
    initial_load_hf_path: str = ""
    """Start from this HF folder (safetensors + config.json of the family's HF architecture) when there
    is nothing to resume, like initial_load_path; each rank reads only its own shards."""
    export_hf_path: str = ""
    """At the last step, also write the weights as an HF folder (sharded safetensors, index,
    config.json) here; empty = no HF export."""
    export_hf_dtype: Literal["fp32", "bf16"] = "bf16"
    """Dtype of the weights written to export_hf_path."""
    export_model_only: bool = True
    """At the last step, also write model weights alone (fp32) to checkpoint/model-step-N."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Print a progress line every this many steps (and at step 1)."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files to job.dump_folder/tb."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 = known GPU table (no MFU on CPU)."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """HSDP: replicas of the FSDP-sharded model (gradients all-reduced across them)."""
    data_parallel_shard_degree: int = -1
    """FSDP2 shard degree; -1 = the ranks left over by the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor parallelism with sequence parallelism inside the transformer blocks (ViT and decoder):
    ranks of a tp group see the same data and split heads, MLP units and the sequence. Must divide
    the head counts, the MLP widths, the vocabulary size, training.seq_len and
    data.patches_per_slot."""
    enable_loss_parallel: bool = True
    """With tensor_parallel_degree > 1: the output head leaves each tp rank the logits of its slice of
    the vocabulary and cross-entropy runs on those slices (torch's loss_parallel), so the full
    [batch, seq_len, vocab] logits never exist on one rank. false = gather the logits first (same
    losses, more memory and communication)."""
    context_parallel_degree: int = 1
    """Context parallelism for the decoder: each row is cut into 2 x cp chunks, rank r of the group
    keeps chunks r and 2cp-1-r (balanced causal work); attention all-gathers keys and values.
    training.seq_len must divide by 2 x cp. The ViT's image slots are split over the group."""
    ulysses_degree: int = 1
    """Ulysses sequence parallelism for the decoder: each row is cut into u contiguous chunks;
    attention swaps the sequence split for a head split (all-to-all). Query heads per tp rank must
    divide by u; KV heads per tp rank must divide by u or divide u (then each is repeated). The
    ViT's image slots are split over the group. One of context_parallel_degree and ulysses_degree
    may be > 1."""
    pipeline_parallel_degree: int = 1
    """Pipeline parallelism: the decoder layers are cut into stages held by this many ranks (the
    vision encoder, projector and token embeddings go with the first stage, the final norm and output
    head with the last). Needs a flavor without tied embeddings. Composes with every other degree;
    under context_parallel_degree or ulysses_degree each stage sees its rank's share of every row."""
    pipeline_parallel_schedule: Literal["1F1B", "GPipe", "Interleaved1F1B"] = "1F1B"
    """Order of microbatch forwards and backwards (torch.distributed.pipelining): 1F1B and GPipe hold
    one stage per rank (GPipe keeps every microbatch's activations; 1F1B at most pp of them);
    Interleaved1F1B holds pipeline_parallel_stages_per_rank >= 2 stages per rank (a smaller bubble)."""
    pipeline_parallel_microbatches: int = -1
    """Microbatches each local batch (training.local_batch_size rows) is cut into for the pipeline; must
    divide local_batch_size; -1 = local_batch_size (one row each). 1F1B needs at least
    pipeline_parallel_degree of them, Interleaved1F1B a multiple of it."""
    pipeline_parallel_stages_per_rank: int = 1
    """Stages each pipeline rank holds: 1 for 1F1B and GPipe, >= 2 for Interleaved1F1B (stage s goes
    to rank s mod pipeline_parallel_degree)."""
    pipeline_parallel_split_points: list[int] = field(default_factory=list)
    """Decoder layer indices that start a new stage (one fewer than the stages), e.g. [3] puts layers
    0-2 on stage 0; empty = split evenly, earlier stages taking fewer layers when it is uneven (the
    first stage also runs the vision encoder)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block of the encoder and the decoder."""
    cuda_graph: bool = False
    """Capture the whole training step (forward, backward, clipping, optimizer) as one CUDA graph
    after two warm-up steps and replay it: no per-kernel launch cost. One GPU, no parallelism, and
    an attention backend with fixed shapes (not varlen); see docs/performance.md."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    """Activation checkpointing of the transformer blocks (ViT and decoder): none = keep every
    activation for backward; full = keep only each block's input and recompute the block in
    backward; selective = as selective_ac_option says."""
    selective_ac_option: str = "2"
    """mode = "selective": an integer k = full checkpointing of every k-th block (blocks k, 2k, ...
    of the ViT and of the decoder; the others keep their activations); "op" = per-op selective
    checkpointing of every block: the outputs of matmuls (all but every second one), attention and
    tensor-parallel reduce-scatters are kept, cheap ops (norms, activations, rotary, casts) are
    recomputed."""


@dataclass
class Objective:
    name: Literal["causal_lm", "mdlm"] = "causal_lm"
    """What the model learns to predict from its final hidden states (titan_mm/objectives,
    docs/objectives.md): causal_lm = the next token of every label-bearing token, with causal
    attention; mdlm = masked diffusion (Sahoo et al. 2024, LLaDA): a random fraction t of each
    document's trainable tokens is replaced by the mask token and predicted with attention
    bidirectional within the document, the loss weighted by 1 / t."""
    mdlm_eps: float = 1e-3
    """mdlm: t is drawn from U(mdlm_eps, 1) per document, so no document has a loss weight above
    1 / mdlm_eps."""
    mdlm_antithetic: bool = False
    """mdlm: draw the t of a microbatch's documents evenly spread over (mdlm_eps, 1) (one uniform
    offset, stratified), which lowers the variance of the loss."""
    mdlm_shift: bool = False
    """mdlm: predict each masked token from the hidden state of the position before it (token i
    from position i - 1), as an autoregressive model does, instead of from its own position. This
    is how Dream and Tiny-A2D turn an autoregressive checkpoint (e.g. an HF Qwen3) into a masked
    diffusion model by fine-tuning: the output head keeps its meaning. The sampler reads the same
    positions."""
    mask_token: str = "<|mask|>"
    """mdlm: the tokenizer's mask token; when the tokenizer lacks it, it is added after the last
    id and the embedding (and output head) grow to hold it."""


@dataclass
class Lora:
    enabled: bool = False
    """Train low-rank adapters instead of the model (docs/lora.md): every Linear layer named by
    target_modules gets y = x W^T + b + (alpha / rank) * B A dropout(x), with A kaiming-uniform and
    B zero (the model starts as the base model); every other parameter is frozen."""
    rank: int = 8
    """Rank r of each adapter (A is r x in_features, B is out_features x r)."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base layer sees the undropped input)."""
    target_modules: list[str] = field(default_factory=lambda: ["decoder.layers.*.attention.w[qkvo]",
                                                               "decoder.layers.*.feed_forward.w[123]"])
    """fnmatch patterns on module names (``*`` also crosses dots): the Linear layers that get
    adapters, e.g. "decoder.layers.*.attention.wq" or "vision.layers.*.attn.*". A pattern that
    matches no Linear layer is an error."""
    modules_to_save: list[str] = field(default_factory=list)
    """fnmatch patterns on module names (``*`` also crosses dots): modules trained in full beside the
    adapters, e.g. "projector" (LLaVA's recipes) or "decoder.output" (PEFT's modules_to_save). A
    pattern that matches no module, or a module that holds a target_modules layer, is an error.
    training.freeze still freezes them (it applies after LoRA)."""
    save_adapters_only: bool = False
    """Training checkpoints hold only the adapters and modules_to_save (and their optimizer state),
    not the frozen base weights; a resume reads the base weights from checkpoint.initial_load_path /
    initial_load_hf_path (or, without one, re-initialises them from job.seed) and the trained
    weights from the checkpoint."""
    export_peft_path: str = ""
    """At the last step, also write the adapters and modules_to_save as a PEFT folder
    (adapter_config.json + adapter_model.safetensors, HF module names) here, for
    PeftModel.from_pretrained on the HF base model; empty = none. checkpoint.export_hf_path writes
    the adapters merged into the weights."""


@dataclass
class Eval:
    tasks: list[str] = field(default_factory=list)
    """Evaluation tasks as KIND:PATH (docs/evaluation.md), KIND one of loss, multiple_choice,
    open_vqa; PATH a .jsonl or .parquet file, e.g.
    multiple_choice:assets/eval_tasks/mc_shapes.jsonl."""
    interval: int = 0
    """During training: run eval.tasks every this many steps and at the last step, results in
    TensorBoard (eval/TASK/METRIC) and dump_folder/eval/step-N.json; 0 = never."""
    max_samples: int = 0
    """Score the first this many samples of each task (0 = all)."""
    max_new_tokens: int = 16
    """Tokens generated at most per answer (greedy) for multiple_choice and open_vqa."""
    batch_size: int = 8
    """Prompts generated together."""
    out: str = ""
    """scripts/evaluate.py: write the results JSON here (default: dump_folder/eval/results.json)."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    parallelism: Parallelism = field(default_factory=Parallelism)
    compile: Compile = field(default_factory=Compile)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    objective: Objective = field(default_factory=Objective)
    lora: Lora = field(default_factory=Lora)
    eval: Eval = field(default_factory=Eval)


# --- value checks that need more than a type ------------------------------------------------------

_POSITIVE = {
    "data.image_slots_per_row", "data.patches_per_slot", "data.min_pixels", "data.max_pixels",
    "data.pack_open_bins", "data.shuffle_buffer", "data.video_fps", "data.video_max_frames", "training.steps", "training.local_batch_size", "training.seq_len",
    "training.gradient_accumulation_steps", "training.nonfinite_max_consecutive", "optimizer.lr",
    "optimizer.lr_multipliers", "optimizer.muon_ns_steps",
    "checkpoint.interval", "eval.max_new_tokens", "eval.batch_size",
    "metrics.log_freq", "parallelism.tensor_parallel_degree", "parallelism.pipeline_parallel_degree",
    "parallelism.pipeline_parallel_stages_per_rank", "lora.rank",
}
_NON_NEGATIVE = {
    "data.num_workers", "data.plan_samples", "training.max_norm", "optimizer.weight_decay", "optimizer.eps",
    "lr_scheduler.warmup_steps", "checkpoint.keep_latest_k", "metrics.peak_tflops",
    "eval.interval", "eval.max_samples",
}
_UNIT_INTERVAL = {"lora.dropout", "lr_scheduler.decay_ratio", "lr_scheduler.min_lr_ratio", "optimizer.beta1",
                  "optimizer.beta2", "optimizer.muon_momentum"}


def _check_values(cfg: JobConfig) -> list[str]:
    errors = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key = f"{section.name}.{f.name}"
            value = getattr(getattr(cfg, section.name), f.name)
            numbers = f.type in ("float", "list[float]", "dict[str, float]")
            if numbers and not all(map(math.isfinite, _as_list(value))):
                errors.append(f"{key} = {value!r} must be a finite number")
                continue
            if key in _POSITIVE and not all(v > 0 for v in _as_list(value)):
                errors.append(f"{key} = {value!r} must be > 0")
            if key in _NON_NEGATIVE and not (value == "auto" or value >= 0):
                errors.append(f"{key} = {value!r} must be >= 0")
            if key in _UNIT_INTERVAL and not 0 <= value <= 1:
                errors.append(f"{key} = {value!r} must be in [0, 1]")
    if cfg.training.nonfinite == "skip" and cfg.optimizer.implementation in ("foreach", "for-loop"):
        errors.append(f"training.nonfinite = \"skip\" drops a step inside the fused AdamW kernel, but "
                      f"optimizer.implementation = {cfg.optimizer.implementation!r}; set it to \"fused\" or "
                      f"\"auto\", or set training.nonfinite = \"stop\"")
    if cfg.optimizer.name == "muon" and cfg.compile.cuda_graph:
        errors.append("optimizer.name = \"muon\" exchanges matrices between ranks and is not captured in a CUDA "
                      "graph; set compile.cuda_graph = false or optimizer.name = \"adamw\"")
    if cfg.training.param_dtype == "bf16" and cfg.training.mixed_precision == "fp32":
        errors.append("training.param_dtype = \"bf16\" computes in bf16, but training.mixed_precision = "
                      "\"fp32\"; set mixed_precision to \"auto\" or \"bf16\", or param_dtype to \"fp32\"")
    if not 0 < cfg.objective.mdlm_eps < 1:
        errors.append(f"objective.mdlm_eps = {cfg.objective.mdlm_eps!r} must be in (0, 1)")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        errors.append(f"data.min_pixels = {cfg.data.min_pixels} exceeds data.max_pixels = "
                      f"{cfg.data.max_pixels}; lower min_pixels or raise max_pixels")
    errors += _check_mixture(cfg.data)
    errors += _check_data_files(cfg.data)
    lora = cfg.lora
    if not lora.enabled and (lora.modules_to_save or lora.save_adapters_only or lora.export_peft_path):
        errors.append("lora.modules_to_save / save_adapters_only / export_peft_path are set but lora.enabled = false; "
                      "enable LoRA or unset them")
    errors += _check_eval_tasks(cfg.eval)
    if cfg.checkpoint.initial_load_path and cfg.checkpoint.initial_load_hf_path:
        errors.append("checkpoint.initial_load_path and checkpoint.initial_load_hf_path are both set; "
                      "keep one")
    if cfg.parallelism.data_parallel_shard_degree == 0 or cfg.parallelism.data_parallel_shard_degree < -1:
        errors.append("parallelism.data_parallel_shard_degree must be -1 (all ranks) or >= 1")
    if cfg.parallelism.data_parallel_replicate_degree < 1:
        errors.append("parallelism.data_parallel_replicate_degree must be >= 1")
    option = cfg.activation_checkpoint.selective_ac_option
    if option != "op" and not (option.isdigit() and int(option) >= 1):
        errors.append(f"activation_checkpoint.selective_ac_option = {option!r} must be \"op\" or an "
                      f"integer >= 1 (checkpoint every k-th block)")
    if cfg.parallelism.pipeline_parallel_microbatches == 0 or cfg.parallelism.pipeline_parallel_microbatches < -1:
        errors.append("parallelism.pipeline_parallel_microbatches must be -1 (one per row) or >= 1")
    return errors


def _as_list(value) -> list:
    """A list's items, a dict's values, or the value alone."""
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, list) else [value]


def _check_mixture(data: Data) -> list[str]:
    n = len(data.mixture_paths)
    errors = []
    if len(data.mixture_weights) != n:
        errors.append(f"data.mixture_weights has {len(data.mixture_weights)} entries but "
                      f"data.mixture_paths has {n}; give one weight per path")
    if data.mixture_kinds and len(data.mixture_kinds) != n:
        errors.append(f"data.mixture_kinds has {len(data.mixture_kinds)} entries but data.mixture_paths "
                      f"has {n}; give one kind per path or leave it empty")
    if any(not w > 0 for w in data.mixture_weights):
        errors.append(f"data.mixture_weights = {data.mixture_weights} must all be > 0")
    return errors


def _check_data_files(data: Data) -> list[str]:
    """Every data path's extension names a format that can hold its kind of samples."""
    from titan_mm.data.formats import record_format

    kinds = data.mixture_kinds or [data.dataset] * len(data.mixture_paths)
    sources = list(zip(data.mixture_paths, kinds)) if data.mixture_paths else [(data.path, data.dataset)]
    errors = []
    for paths, kind in sources:
        for path in (p.strip() for p in paths.split(",")):
            try:
                if path:
                    record_format(path, kind)
            except ConfigError as e:
                errors.append(str(e))
    return errors


def _check_eval_tasks(cfg: Eval) -> list[str]:
    """Every eval task is KIND:PATH of an existing .jsonl or .parquet file."""
    from titan_mm.eval.tasks import parse_task

    errors = []
    for spec in cfg.tasks:
        try:
            parse_task(spec)
        except ConfigError as e:
            errors.append(str(e))
    if cfg.interval and not cfg.tasks:
        errors.append(f"eval.interval = {cfg.interval} but eval.tasks is empty; name the tasks to run")
    return errors


# --- parsing --------------------------------------------------------------------------------------

RENAMED_KEYS = {
    "data.max_images_per_row": ("data.image_slots_per_row", "N patch slots a row; several images "
                                "share a slot, so it no longer limits the images of a row"),
    "data.max_patches_per_image": ("data.patches_per_slot", "L patches a slot, the largest image"),
}
"""Keys of earlier versions: old key -> (new key, what it holds now)."""

def _convert(value, tp, key: str):
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, typing.get_args(tp), key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {list(choices)}")
        return value
    if origin is dict:
        return _convert_dict(value, typing.get_args(tp), key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return [_convert(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        try:
            if isinstance(value, str):
                return int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _convert_dict(value, types_: tuple, key: str) -> dict:
    """A TOML table, or "a=1,b=2" from the command line."""
    key_tp, value_tp = types_
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item]
        if any(not eq for _, eq, _ in pairs):
            raise ConfigError(f"{key} expects name=value pairs separated by commas, got {value!r}")
        value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} expects a table such as {{name = value}}, got {value!r}")
    return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}


def _convert_union(value, options: tuple, key: str):
    """``value`` as the first of ``options`` that takes it (e.g. int | Literal["auto"])."""
    for tp in options:
        try:
            return _convert(value, tp, key)
        except ConfigError:
            pass
    names = [" or ".join(map(repr, typing.get_args(tp))) if typing.get_origin(tp) is Literal else tp.__name__
             for tp in options]
    raise ConfigError(f"{key} expects {' or '.join(names)}, got {value!r}")


def _set(cfg: JobConfig, key: str, value, source: str) -> None:
    section_name, _, field_name = key.partition(".")
    hints = typing.get_type_hints(JobConfig)
    if section_name not in hints or not field_name:
        raise ConfigError(f"unknown config section {section_name!r} in {key!r} ({source}); "
                          f"sections are {sorted(hints)}")
    if key in RENAMED_KEYS:
        new_key, meaning = RENAMED_KEYS[key]
        raise ConfigError(f"{key} ({source}) is now {new_key} ({meaning}); rename it")
    section = getattr(cfg, section_name)
    field_types = typing.get_type_hints(type(section))
    if field_name not in field_types:
        raise ConfigError(f"unknown config key {key!r} ({source}); [{section_name}] has "
                          f"{sorted(field_types)}")
    try:
        setattr(section, field_name, _convert(value, field_types[field_name], key))
    except ConfigError as e:
        raise ConfigError(f"{e} ({source})") from None


def split_script_options(argv: list[str], defaults: dict[str, str | None]) -> tuple[dict, list[str]]:
    """A script's own ``--option value`` pairs (the keys of ``defaults``) apart from the config
    overrides that ``parse_args`` reads: (options with defaults filled in, the rest of ``argv``)."""
    opts, rest, args = dict(defaults), [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in opts:
            if not args:
                raise ConfigError(f"{arg} needs a value")
            opts[arg] = args.pop(0)
        else:
            rest.append(arg)
    return opts, rest


def parse_args(argv: list[str]) -> tuple[JobConfig, bool]:
    """Build a JobConfig from ``--job.config_file F`` and ``--section.key value`` overrides.

    Returns the config and whether ``--print-config`` was given.
    """
    cfg = JobConfig()
    print_config = False
    overrides: list[tuple[str, str]] = []
    config_file = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--print-config", "--print_config"):
            print_config = True
            continue
        if arg in ("-h", "--help"):
            print(help_text())
            sys.exit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"--{key} needs a value")
            value = args.pop(0)
        if key in ("job.config_file", "config_file"):
            config_file = value
        else:
            overrides.append((key, value))
    if config_file:
        load_toml(cfg, config_file)
    for key, value in overrides:
        _set(cfg, key, value, "command line")
    errors = _check_values(cfg)
    if errors:
        where = f" (config {config_file} and command line)" if config_file else ""
        raise ConfigError("invalid config" + where + ":\n  " + "\n  ".join(errors))
    return cfg, print_config


def load_toml(cfg: JobConfig, path: str) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
    for section_name, section in data.items():
        if not isinstance(section, dict):
            raise ConfigError(f"top-level key {section_name!r} in {path} must be a [section]")
        for field_name, value in section.items():
            _set(cfg, f"{section_name}.{field_name}", value, path)


def to_toml(cfg: JobConfig) -> str:
    """The merged config as TOML text (loads back to the same config)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, section.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def help_text() -> str:
    out = ["usage: train.py --job.config_file FILE [--section.key value ...] [--print-config]", ""]
    cfg = JobConfig()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        docs = field_docs(type(obj))
        out.append(f"[{section.name}]")
        for f in dataclasses.fields(obj):
            out.append(f"  --{section.name}.{f.name} (default {_toml_value(getattr(obj, f.name))})")
            out.append(f"      {docs.get(f.name, '')}")
    return "\n".join(out)
