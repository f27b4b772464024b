"""Captions from a masked diffusion model (MDLM): iterative unmasking of an all-mask answer after
each held-out image (titan_mm/objectives/mdlm_sampler.py, docs/objectives.md).

    python scripts/mdlm_generate.py --job.config_file train_configs/mdlm_vlm_debug.toml \\
        [--weights DIR | --hf_path DIR] [--data_path assets/sample_data/captions_val.jsonl] \\
        [--num 5] [--gen_length 16] [--steps 16] [--block_length 16] \\
        [--remasking low_confidence|random] [--temperature 0]

``--weights`` (a DCP model folder) defaults to the newest model-step-N export of the run;
``--hf_path`` loads an HF folder instead. Any other ``--section.key value`` is read as in train.py.
"""

import json
import os
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from titan_mm.config import parse_args  # noqa: E402
from titan_mm.generate import load_model_for_inference, text_prompt  # noqa: E402
from titan_mm.generate.mdlm import MDLMSampling, generate_mdlm  # noqa: E402

OPTIONS = {"--weights": None, "--hf_path": None, "--data_path": "assets/sample_data/captions_val.jsonl",
           "--num": "5", "--gen_length": "16", "--steps": "16", "--block_length": "16",
           "--remasking": "low_confidence", "--temperature": "0"}


def main(argv: list[str]):
    opts, rest = dict(OPTIONS), []
    while argv:
        arg = argv.pop(0)
        if arg in opts:
            opts[arg] = argv.pop(0)
        else:
            rest.append(arg)
    cfg, _ = parse_args(rest + ["--objective.name", "mdlm"])
    im = load_model_for_inference(cfg, checkpoint=opts["--weights"], hf_path=opts["--hf_path"])
    root = os.path.dirname(os.path.abspath(opts["--data_path"]))
    with open(opts["--data_path"]) as f:
        samples = [json.loads(line) for line in f if line.strip()][:int(opts["--num"])]
    sampling = MDLMSampling(gen_length=int(opts["--gen_length"]), steps=int(opts["--steps"]),
                            block_length=int(opts["--block_length"]), remasking=opts["--remasking"],
                            temperature=float(opts["--temperature"]), seed=cfg.job.seed)
    print(f"weights: {im.source}")
    for s in samples:
        # <bos> <image>, then the answer: the caption documents the model was trained on
        prompt = text_prompt(im, [{"type": "image", "image": s["image"]}], root)
        answer = generate_mdlm(im, prompt, sampling)
        print(f"{s['image']}: {im.tokenizer.decode(answer)!r}  (reference: {s['caption']!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
