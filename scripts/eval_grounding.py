"""Does the model use the images? Held-out caption loss with the true images vs images swapped
between samples.

    python scripts/eval_grounding.py --job.config_file train_configs/debug_vlm.toml \
        [--data_path assets/sample_data/captions_val.jsonl] [--weights DIR]

``--weights`` defaults to the newest model-step-N export in the run's checkpoint folder; any other
``--section.key value`` is read as in train.py.
"""

import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.config import parse_args  # noqa: E402
from titan_mm.evaluate import grounding_losses, latest_model_export, load_model  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402


def main(argv):
    data_path, weights, rest = "assets/sample_data/captions_val.jsonl", None, []
    while argv:
        arg = argv.pop(0)
        if arg == "--data_path":
            data_path = argv.pop(0)
        elif arg == "--weights":
            weights = argv.pop(0)
        else:
            rest.append(arg)
    cfg, _ = parse_args(rest)
    weights = weights or latest_model_export(cfg.job.dump_folder, cfg.checkpoint.folder)
    model_args = get_model_spec(cfg.model.name).flavors[cfg.model.flavor]
    model = load_model(cfg, weights)
    true_loss, swapped_loss = grounding_losses(cfg, model, model_args, data_path)
    print(f"weights: {weights}")
    print(f"held-out caption loss, true images:    {true_loss:.4f}")
    print(f"held-out caption loss, swapped images: {swapped_loss:.4f}")
    print(f"true images lower by {100 * (1 - true_loss / swapped_loss):.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
