"""The training dataloader: source (or weighted mixture of sources) -> best-fit packer -> batches,
as a torchdata StatefulDataLoader.

Its state (every worker's source position and open packer rows) goes into checkpoints.
"""

import logging
import os
from collections import Counter

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_mm.config import ConfigError, Data
from titan_mm.data.chat import ChatDocumentBuilder
from titan_mm.data.documents import DocumentBuilder
from titan_mm.data.image import MultiEncoderInputSpec, VisionInputSpec, build_image_processor
from titan_mm.data.packing import BestFitPacker, RowShape
from titan_mm.data.sources import MixtureSource, StreamingSource, source_name
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.data.webdataset import WebDatasetSource
from titan_mm.models.multimodal import visual_item_ids

logger = logging.getLogger(__name__)


def collate_rows(rows: list[dict], merged_per_slot: int) -> dict:
    """Stack rows into [B, S] and [B * N, L, ...]; offset image_token_index to the batch's slots
    (``merged_per_slot``: L / m^2)."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in
             ("input_ids", "labels", "position_ids", "document_ids", "image_token_index")}
    batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    batch["grid_thw"] = torch.cat([r["grid_thw"] for r in rows])
    n_slots = rows[0]["pixel_values"].shape[0]
    offsets = torch.arange(len(rows))[:, None] * n_slots * merged_per_slot
    idx = batch["image_token_index"]
    batch["image_token_index"] = torch.where(idx >= 0, idx + offsets, idx)
    # segment lengths for the varlen attention backend: documents of each row, visual items (an
    # image, a frame of a video) of each slot
    batch["document_lengths"] = run_lengths(batch["document_ids"])
    batch["frame_lengths"] = run_lengths(visual_item_ids(batch["grid_thw"]))
    batch["stats"] = dict(sum((Counter(r["stats"]) for r in rows), Counter()))
    batch["skipped"] = [ref for r in rows for ref in r["skipped"]]
    return batch


def run_lengths(ids_RS: torch.Tensor) -> torch.Tensor:
    """[R, K] int32: the lengths of the runs of equal ids along each row, zero-padded to the
    longest list (padding is a run of its own)."""
    runs = [torch.unique_consecutive(row, return_counts=True)[1] for row in ids_RS]
    return torch.nn.utils.rnn.pad_sequence(runs, batch_first=True).to(torch.int32)


class Collator:
    """Picklable collate_fn for worker processes."""

    def __init__(self, merged_per_slot: int):
        self.merged_per_slot = merged_per_slot

    def __call__(self, rows):
        return collate_rows(rows, self.merged_per_slot)


def check_image_budget(cfg: Data, spec: VisionInputSpec):
    """Fail early when the largest image cannot fit one slot of L patches."""
    if isinstance(spec, MultiEncoderInputSpec):
        if cfg.patches_per_slot % spec.tokens_per_image:
            raise ConfigError(f"data.patches_per_slot={cfg.patches_per_slot} must be a multiple of the "
                              f"{spec.tokens_per_image} image tokens of every image of this model")
        return
    patch_size, merge = spec.patch_size, spec.spatial_merge_size
    factor = patch_size * merge
    max_patches = (cfg.max_pixels // factor ** 2) * merge ** 2
    if max_patches > cfg.patches_per_slot:
        raise ConfigError(
            f"data.max_pixels={cfg.max_pixels} allows images of up to {max_patches} patches of "
            f"{patch_size}px, more than one slot holds (data.patches_per_slot={cfg.patches_per_slot}); "
            f"raise patches_per_slot to {max_patches} or lower max_pixels to "
            f"{cfg.patches_per_slot * patch_size ** 2}")
    if cfg.patches_per_slot % (merge * merge):
        raise ConfigError(f"data.patches_per_slot={cfg.patches_per_slot} must be a multiple "
                          f"of the merge area {merge * merge}")


def build_document_builder(cfg: Data, tokenizer: Tokenizer, spec: VisionInputSpec,
                           kind: str | None = None) -> DocumentBuilder:
    """The builder for samples of ``kind`` (default: data.dataset)."""
    processor = build_image_processor(spec, cfg.min_pixels, cfg.max_pixels)
    if (kind or cfg.dataset) == "chat":
        return ChatDocumentBuilder(tokenizer, processor, cfg.chat_format, spec.positions_fn,
                                   video_fps=cfg.video_fps, video_max_frames=cfg.video_max_frames)
    return DocumentBuilder(tokenizer, processor, spec.positions_fn, video_fps=cfg.video_fps,
                           video_max_frames=cfg.video_max_frames)


def build_source(cfg: Data, tokenizer: Tokenizer, spec: VisionInputSpec, *, seq_len: int, dp_rank: int,
                 dp_world: int, seed: int):
    """data.path as one source, or the weighted mixture of data.mixture_paths."""
    def one(path: str, kind: str):
        builder = build_document_builder(cfg, tokenizer, spec, kind)
        if kind == "webdataset":
            return WebDatasetSource(path, builder, dp_rank=dp_rank, dp_world=dp_world, seed=seed,
                                    shuffle=cfg.shuffle)
        return StreamingSource(path, kind, builder, max_tokens=seq_len, dp_rank=dp_rank,
                               dp_world=dp_world, seed=seed, shuffle=cfg.shuffle,
                               shuffle_buffer=cfg.shuffle_buffer, text_split=cfg.text_split)

    if not cfg.mixture_paths:
        return one(cfg.path, cfg.dataset)
    kinds = cfg.mixture_kinds or [cfg.dataset] * len(cfg.mixture_paths)
    names = [source_name(p) for p in cfg.mixture_paths]
    names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
    sources = [one(p, k) for p, k in zip(cfg.mixture_paths, kinds)]
    return MixtureSource(sources, cfg.mixture_weights, names, seed=seed, dp_rank=dp_rank)


class ShardRows(IterableDataset, Stateful):
    """Rows of several data shards in turn (one row of each, then again): a rank hosting shards
    2r and 2r+1 of 4 yields what ranks 2r and 2r+1 of a 4-rank run would, so the global batch is
    the same whatever the data-parallel degree. Each shard's packer is checkpointed on its own."""

    def __init__(self, packers: dict[int, BestFitPacker]):
        self.packers = packers

    def __iter__(self):
        streams = [iter(p) for p in self.packers.values()]
        while True:
            for stream in streams:
                yield next(stream)

    def state_dict(self) -> dict:
        return {str(shard): p.state_dict() for shard, p in self.packers.items()}

    def load_state_dict(self, state: dict):
        for shard, p in self.packers.items():
            p.load_state_dict(state[str(shard)])


def check_data_shards(cfg: Data, batch_size: int, dp_world: int) -> int:
    """Shards each data-parallel rank hosts (1 without data.num_shards); impossible settings raise."""
    if not cfg.num_shards:
        return 1
    if cfg.num_shards % dp_world:
        raise ConfigError(f"data.num_shards={cfg.num_shards} must be a multiple of the data-parallel "
                          f"degree {dp_world}")
    per_rank = cfg.num_shards // dp_world
    if batch_size % per_rank:
        raise ConfigError(f"training.local_batch_size={batch_size} must be a multiple of the "
                          f"{per_rank} data shards each rank hosts (data.num_shards / data-parallel "
                          f"degree), so every step takes the same rows from every shard")
    if cfg.num_workers != "auto" and cfg.num_workers:
        raise ConfigError("data.num_shards needs data.num_workers = 0 (shard states are checkpointed "
                          "from the training process)")
    return per_rank


def resolve_num_workers(cfg: Data, patch_dim: int) -> int:
    """data.num_workers as a count: "auto" = the CPUs this process may use, shared by the ranks
    of this node, less one for the training process (0 under data.num_shards, which loads in the
    training process), and no more than half of the available host memory can hold: each worker
    keeps up to data.pack_open_bins partly filled rows of decoded patches (an H200 host ran out of
    its 125 GiB with 15 workers of 5 x 5120-patch rows and 64 open rows)."""
    if cfg.num_workers != "auto":
        return cfg.num_workers
    if cfg.num_shards:
        return 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    by_cpus = max(0, cpus // local_ranks - 1)
    available = available_host_memory()
    if available is None or by_cpus == 0:
        return by_cpus
    by_memory = int(available / 2 / local_ranks // worker_memory_bytes(cfg, patch_dim))
    return max(1, min(by_cpus, by_memory))


def worker_memory_bytes(cfg: Data, patch_dim: int) -> int:
    """What one loader worker may hold at most: its open rows full of fp32 patches, plus one row
    being collated."""
    row = cfg.image_slots_per_row * cfg.patches_per_slot * patch_dim * 4
    return (cfg.pack_open_bins + 1) * row


def available_host_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def row_shape(cfg: Data, tokenizer: Tokenizer, spec: VisionInputSpec, seq_len: int) -> RowShape:
    """The packed row layout the config asks for."""
    media_token_ids = tuple(i for i in (tokenizer.image_id, tokenizer.video_id) if i is not None)
    return RowShape(seq_len=seq_len, image_slots=cfg.image_slots_per_row,
                    patches_per_slot=cfg.patches_per_slot, patch_dim=spec.patch_dim,
                    merge_area=spec.merge_area, pad_id=tokenizer.pad_id, media_token_ids=media_token_ids,
                    position_dims=spec.position_dims)


def build_dataloader(cfg: Data, tokenizer: Tokenizer, spec: VisionInputSpec, *, seq_len: int,
                     batch_size: int, dp_rank: int, dp_world: int, seed: int,
                     pin_memory: bool = False) -> StatefulDataLoader:
    """Batches of this data-parallel rank (in page-locked memory with ``pin_memory``, for
    asynchronous copies to a GPU). With data.num_shards the dataset is a ShardRows (its
    ``packers`` hold one state per hosted shard)."""
    check_image_budget(cfg, spec)
    per_rank = check_data_shards(cfg, batch_size, dp_world)
    merge_area = spec.merge_area
    shape = row_shape(cfg, tokenizer, spec, seq_len)

    def packer(shard: int, shards: int) -> BestFitPacker:
        source = build_source(cfg, tokenizer, spec, seq_len=seq_len, dp_rank=shard, dp_world=shards,
                              seed=seed)
        return BestFitPacker(source, shape, cfg.pack_open_bins)

    if cfg.num_shards:
        first = dp_rank * per_rank
        dataset = ShardRows({s: packer(s, cfg.num_shards) for s in range(first, first + per_rank)})
    else:
        dataset = packer(dp_rank, dp_world)
    workers = resolve_num_workers(cfg, spec.patch_dim)
    if cfg.num_workers == "auto":
        logger.info("data.num_workers = auto: %d loader workers (each holds up to %.1f GiB of decoded "
                    "patches in %d open rows)", workers, worker_memory_bytes(cfg, spec.patch_dim) / 2**30,
                    cfg.pack_open_bins)
    return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=workers,
                              collate_fn=Collator(cfg.patches_per_slot // merge_area),
                              persistent_workers=workers > 0, pin_memory=pin_memory)


class LoaderState(Stateful):
    """A dataloader's checkpointed state; loading one saved with another worker count is refused
    with the count to set (each worker reads its own share, so the position cannot be carried
    over)."""

    def __init__(self, loader: StatefulDataLoader):
        self.loader = loader

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict):
        saved = saved_worker_count(state)
        if state and saved != self.loader.num_workers:
            raise ConfigError(f"the checkpoint's data loader ran {saved} workers and this run has "
                              f"{self.loader.num_workers}; set data.num_workers = {saved} to resume")
        self.loader.load_state_dict(state)


def saved_worker_count(state: dict) -> int:
    """Workers of the loader whose state_dict() this is (torchdata keeps one snapshot per worker)."""
    snapshot = state.get("_snapshot")
    return len(snapshot["_worker_snapshots"]) if snapshot else 0


def data_states(dataloader: StatefulDataLoader, dp_rank: int) -> dict[str, Stateful]:
    """What a checkpoint keeps of this rank's data, by checkpoint key: with data.num_shards one
    entry per hosted shard (whichever rank hosts it later), else the whole loader of this
    data-parallel rank."""
    packers = getattr(dataloader.dataset, "packers", None)
    if packers is not None:
        return {f"data_shard{shard}": packer for shard, packer in packers.items()}
    return {f"dataloader_dp{dp_rank}": LoaderState(dataloader)}
