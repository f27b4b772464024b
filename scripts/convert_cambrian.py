"""Convert an official Cambrian checkpoint folder (cambrian-mllm/cambrian's CambrianLlamaForCausalLM
with the SVA connector; its *.safetensors) into a model-only DCP folder for a titan_mm flavor.

    python scripts/convert_cambrian.py OFFICIAL_FOLDER OUT_DCP --model.flavor FLAVOR

The flavor must describe the checkpoint's model (encoders, G, C, layers); every parameter must be
found. Start training from the result with ``--checkpoint.initial_load_path OUT_DCP``.
"""

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.models.cambrian import FLAVORS  # noqa: E402
from titan_mm.models.cambrian.hf_adapter import official_to_dcp  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("official_folder")
    parser.add_argument("out_dcp")
    parser.add_argument("--model.flavor", dest="flavor", required=True, choices=sorted(FLAVORS))
    opts = parser.parse_args(argv)
    official_to_dcp(FLAVORS[opts.flavor], opts.official_folder, opts.out_dcp)
    print(f"wrote {opts.out_dcp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
