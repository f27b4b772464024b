"""Serve a trained model: an OpenAI-compatible POST /v1/chat/completions (images as http(s) or
base64 data URLs, streaming with server-sent events) and a chat page at / (docs/serving.md).

    python scripts/serve.py --job.config_file train_configs/debug_vlm_chat.toml \\
        [--weights DIR | --hf_path DIR] [--host 127.0.0.1] [--port 8000] [--name NAME] \\
        [--max_request_mb 16] [--max_tokens 512] [--device cuda]

``--weights`` (a DCP model folder) defaults to the newest model-step-N export of the run;
``--hf_path`` loads an HF folder instead. Prompts are written in ``data.chat_format``. Any other
``--section.key value`` is read as in train.py.
"""

import logging
import os
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402

from titan_mm.config import ConfigError, parse_args, split_script_options  # noqa: E402
from titan_mm.generate import load_model_for_inference  # noqa: E402
from titan_mm.serve.engine import ModelEngine  # noqa: E402
from titan_mm.serve.openai_api import Limits  # noqa: E402
from titan_mm.serve.server import serve  # noqa: E402

OPTIONS = {"--weights": None, "--hf_path": None, "--host": "127.0.0.1", "--port": "8000", "--name": None,
           "--max_request_mb": "16", "--max_tokens": "512",
           "--device": "cuda" if torch.cuda.is_available() else "cpu"}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        opts, rest = split_script_options(argv, OPTIONS)
        cfg, _ = parse_args(rest)
        im = load_model_for_inference(cfg, checkpoint=opts["--weights"], hf_path=opts["--hf_path"],
                                      device=opts["--device"])
        if im.chat_builder is None:
            raise ConfigError(f"the server writes prompts in data.chat_format: {im.chat_error}")
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    name = opts["--name"] or f"{cfg.model.name}-{cfg.model.flavor}:{os.path.basename(im.source.rstrip('/'))}"
    limits = Limits(max_request_bytes=int(float(opts["--max_request_mb"]) * (1 << 20)),
                    max_new_tokens=int(opts["--max_tokens"]))
    serve(ModelEngine(im, name), opts["--host"], int(opts["--port"]), limits)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
