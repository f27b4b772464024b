"""Does the model use the images? Held-out caption loss and accuracy with the true images vs images
swapped between samples (for an MDLM config: of the caption tokens masked at t = 0.5).

    python scripts/eval_grounding.py --job.config_file train_configs/debug_vlm.toml \
        [--data_path assets/sample_data/captions_val.jsonl] [--weights DIR]

``--weights`` defaults to the newest model-step-N export in the run's checkpoint folder; any other
``--section.key value`` is read as in train.py.
"""

import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.config import parse_args  # noqa: E402
from titan_mm.evaluate import SWAP_SHIFT, caption_metrics, latest_model_export, load_model  # noqa: E402
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
    (true_loss, true_acc), (swapped_loss, swapped_acc) = (
        caption_metrics(cfg, model, model_args, data_path, shift) for shift in (0, SWAP_SHIFT))
    what = ("masked caption tokens at t = 0.5" if cfg.objective.name == "mdlm" else "caption tokens")
    print(f"weights: {weights}")
    print(f"held-out {what}, true images:    loss {true_loss:.4f}  accuracy {true_acc:.3f}")
    print(f"held-out {what}, swapped images: loss {swapped_loss:.4f}  accuracy {swapped_acc:.3f}")
    print(f"true images lower by {100 * (1 - true_loss / swapped_loss):.1f}%")

if __name__ == "__main__":
    main(sys.argv[1:])
