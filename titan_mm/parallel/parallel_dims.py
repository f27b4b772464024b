"""ParallelDims: the parallel degrees of a run, validated up front, and the DeviceMesh built from them."""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    dp_shard: int
    world_size: int

    def __post_init__(self):
        if self.dp_shard == -1:
            self.dp_shard = self.world_size
        if self.dp_shard != self.world_size:
            raise ValueError(
                f"parallelism.data_parallel_shard_degree={self.dp_shard} must equal the world size "
                f"{self.world_size} (the only parallelism so far); set it to -1 or {self.world_size}")

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def dp_degree(self) -> int:
        return self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        return init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))
