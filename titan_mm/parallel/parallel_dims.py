"""ParallelDims: the parallel degrees of a run, validated up front, and the DeviceMesh built from them.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, cp, ulysses, tp. Parameters are
sharded by FSDP over dp_shard x cp x ulysses (those ranks hold the same parameters) and replicated
over dp_replicate (HSDP); the loss is averaged over every rank that sees different tokens.
"""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelismError(ValueError):
    """An impossible parallel layout, reported before any compute."""


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ulysses: int
    world_size: int
    enable_loss_parallel: bool = True
    """With tp > 1: compute the loss on vocabulary-sharded logits instead of gathering them."""

    def __post_init__(self):
        for name in ("dp_replicate", "cp", "tp", "pp", "ulysses"):
            if getattr(self, name) < 1:
                raise ParallelismError(f"{name} degree must be >= 1, got {getattr(self, name)}")
        others = self.dp_replicate * self.cp * self.tp * self.pp * self.ulysses
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ParallelismError(
                    f"world size {self.world_size} is not divisible by dp_replicate*cp*tp*pp*ulysses = "
                    f"{others}; change the degrees or the number of processes")
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ParallelismError(f"data_parallel_shard_degree must be -1 or >= 1, got {self.dp_shard}")
        product = others * self.dp_shard
        if product != self.world_size:
            raise ParallelismError(
                f"parallel degrees multiply to {product} (dp_replicate={self.dp_replicate} x "
                f"dp_shard={self.dp_shard} x cp={self.cp} x ulysses={self.ulysses} x tp={self.tp} x "
                f"pp={self.pp}) but {self.world_size} processes were started; set "
                f"data_parallel_shard_degree = -1 to fill the rest, or launch {product} processes")

    @property
    def dp_enabled(self) -> bool:
        return self.dp_replicate * self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP2 wraps the model: parameters are sharded, replicated (HSDP), or both."""
        return self.dp_replicate * self.dp_shard * self.cp * self.ulysses > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def loss_parallel_enabled(self) -> bool:
        return self.tp_enabled and self.enable_loss_parallel

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ulysses_enabled(self) -> bool:
        return self.ulysses > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_degree(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def ranks_per_batch(self) -> int:
        """Ranks that share the work of one data-parallel batch (cp x ulysses x tp x pp)."""
        return self.world_size // self.dp_degree

    def check_divisible(self, what: str, value: int, dim: str):
        """Raise a message naming the fix when ``value`` (e.g. a head count) does not split over ``dim``."""
        degree = getattr(self, dim)
        if value % degree:
            options = [d for d in range(1, value + 1) if value % d == 0]
            raise ParallelismError(f"{dim} degree {degree} does not divide {what} = {value}; choose "
                                   f"{dim} in {options}")

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        names = ("pp", "dp_replicate", "dp_shard", "cp", "ulysses", "tp")
        sizes = tuple(getattr(self, n) for n in names)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        # parameters are sharded over every rank that holds the same parameters
        mesh[("dp_shard", "cp", "ulysses")]._flatten("fsdp")
        mesh[("dp_replicate", "dp_shard")]._flatten("dp")
        mesh[("dp_replicate", "dp_shard", "cp", "ulysses")]._flatten("loss")
        return mesh
