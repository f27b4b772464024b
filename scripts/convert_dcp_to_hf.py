"""Convert DCP weights (a run's model-step-N export, or a step-N training checkpoint) into an HF
folder: sharded safetensors, model.safetensors.index.json and config.json that transformers loads.

    python scripts/convert_dcp_to_hf.py DCP_FOLDER OUT_HF --model.name llava \\
        --model.flavor siglip2-so400m-qwen3-8b [--dtype bf16] \\
        [--tokenizer TOKENIZER_FOLDER --chat_format qwen3_vl --min_pixels N --max_pixels N]
        [--mask_token "<|mask|>"]

A vocabulary the run grew (MDLM's mask token) is read from the checkpoint's embedding; with
``--tokenizer``, ``--mask_token`` (the run's objective.mask_token) adds that token to the written
tokenizer as the run did.

With ``--tokenizer`` (the run's model.tokenizer_path) the folder also gets the tokenizer files
with a chat template of ``--chat_format`` (the run's data.chat_format), generation_config.json and
the family's processor configs for images resized into [min_pixels, max_pixels] (the run's data
section): transformers then loads it and generates as it is (titan_mm/hf/export.py).
"""

import argparse
import logging
import sys

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.config import Data  # noqa: E402
from titan_mm.data.tokenizer import Tokenizer  # noqa: E402
from titan_mm.hf.convert import dcp_to_hf  # noqa: E402
from titan_mm.hf.export import InferenceFiles  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dcp_folder")
    parser.add_argument("out_hf")
    parser.add_argument("--model.name", dest="name", required=True, help="model family, e.g. llama or llava")
    parser.add_argument("--model.flavor", dest="flavor", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument("--tokenizer", help="tokenizer folder (model.tokenizer_path): also write the "
                                            "tokenizer, chat template, generation and processor files")
    parser.add_argument("--chat_format", default=Data.chat_format, help="data.chat_format of the run")
    parser.add_argument("--min_pixels", type=int, default=Data.min_pixels)
    parser.add_argument("--max_pixels", type=int, default=Data.max_pixels)
    parser.add_argument("--mask_token", help="objective.mask_token of an MDLM run: added to the tokenizer "
                                             "when it lacks it, as the run did")
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
    files = None
    if opts.tokenizer:
        tokenizer = Tokenizer(opts.tokenizer, spec.special_tokens)
        if opts.mask_token:
            tokenizer.add_special_token(opts.mask_token)
        files = InferenceFiles(tokenizer, opts.chat_format, opts.min_pixels, opts.max_pixels)
    dcp_to_hf(spec, opts.dcp_folder, opts.out_hf, opts.flavor, DTYPES[opts.dtype], files)
    print(f"wrote {opts.out_hf}" + ("" if files else " (weights and config.json only: pass --tokenizer for "
                                                     "the tokenizer, chat template and processor files)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
