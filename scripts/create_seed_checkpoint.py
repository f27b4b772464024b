"""Write the initial weights of a config's model, initialised in one process, as a model-only DCP
folder. Runs that start from it (checkpoint.initial_load_path) begin from identical weights
whatever their parallel layout: sharded random init does not reproduce single-device init.

    python scripts/create_seed_checkpoint.py --job.config_file train_configs/debug_vlm.toml OUT_DIR
"""

import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from titan_mm.config import parse_args  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.models.lora import apply_lora, init_adapters  # noqa: E402
from titan_mm.objectives import objective_setup  # noqa: E402
from titan_mm.train.checkpoint import ModelState  # noqa: E402


def create_seed_checkpoint(cfg, out_dir: str):
    spec = get_model_spec(cfg.model.name)
    _, _, args = objective_setup(cfg)  # the trainer's model for this objective (MDLM may grow the vocabulary)
    with torch.device("meta"):
        model = spec.model_cls(args)
        if cfg.lora.enabled:  # the adapters' initial values too, the same for every layout
            apply_lora(model, cfg.lora)
    model.to_empty(device="cpu")
    torch.manual_seed(cfg.job.seed)
    model.init_weights()
    init_adapters(model)
    dcp.save({"model": ModelState(model)}, checkpoint_id=out_dir)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[-1].startswith("--"):
        sys.exit(__doc__)
    cfg, _ = parse_args(sys.argv[1:-1])
    create_seed_checkpoint(cfg, sys.argv[-1])
    print(f"seed checkpoint written to {sys.argv[-1]}")
