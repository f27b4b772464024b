"""Convert DCP weights (a run's model-step-N export, or a step-N training checkpoint) into an HF
folder: sharded safetensors, model.safetensors.index.json and config.json that transformers loads.

    python scripts/convert_dcp_to_hf.py DCP_FOLDER OUT_HF --model.name llava \\
        --model.flavor siglip2-so400m-qwen3-8b [--dtype bf16]

Copy the tokenizer files next to the weights yourself; they are not part of a DCP checkpoint.
"""

import argparse
import logging
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.hf.convert import dcp_to_hf  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dcp_folder")
    parser.add_argument("out_hf")
    parser.add_argument("--model.name", dest="name", required=True, help="model family, e.g. llama or llava")
    parser.add_argument("--model.flavor", dest="flavor", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    spec = get_model_spec(opts.name)
    if spec.hf_adapter is None:
        print(f"model family {opts.name} has no HF adapter", file=sys.stderr)
        return 2
    if opts.flavor not in spec.flavors:
        print(f"{opts.flavor!r} is not a flavor of {opts.name}; choose one of {sorted(spec.flavors)}",
              file=sys.stderr)
        return 2
    dcp_to_hf(spec, opts.dcp_folder, opts.out_hf, opts.flavor, DTYPES[opts.dtype])
    print(f"wrote {opts.out_hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
