"""Convert an HF checkpoint folder (safetensors + config.json) into a model-only DCP folder.

    python scripts/convert_hf_to_dcp.py HF_FOLDER OUT_DCP --model.name llama [--model.flavor qwen3-8b]

Without --model.flavor the args come from config.json (and the matching flavor, if any, is named);
with it, config.json must describe the same model. Start training from the result with
``--checkpoint.initial_load_path OUT_DCP`` (or skip this step: ``--checkpoint.initial_load_hf_path``).
"""

import argparse
import logging
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.hf.convert import hf_to_dcp  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_folder")
    parser.add_argument("out_dcp")
    parser.add_argument("--model.name", dest="name", required=True, help="model family, e.g. llama or llava")
    parser.add_argument("--model.flavor", dest="flavor", default=None, help="default: from config.json")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    spec = get_model_spec(opts.name)
    if spec.hf_adapter is None:
        print(f"model family {opts.name} has no HF adapter", file=sys.stderr)
        return 2
    hf_to_dcp(spec, opts.hf_folder, opts.out_dcp, opts.flavor)
    print(f"wrote {opts.out_dcp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
