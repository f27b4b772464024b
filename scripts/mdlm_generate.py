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

import torch  # noqa: E402

from titan_mm.config import parse_args  # noqa: E402
from titan_mm.data.dataloader import build_document_builder, collate_rows  # noqa: E402
from titan_mm.data.documents import Document  # noqa: E402
from titan_mm.data.packing import RowShape, build_row  # noqa: E402
from titan_mm.evaluate import MODEL_INPUTS, latest_model_export, load_model  # noqa: E402
from titan_mm.hf.io import load_hf_weights  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402
from titan_mm.objectives import objective_setup  # noqa: E402
from titan_mm.objectives.mdlm_sampler import mdlm_generate  # noqa: E402

OPTIONS = {"--weights": None, "--hf_path": None, "--data_path": "assets/sample_data/captions_val.jsonl",
           "--num": "5", "--gen_length": "16", "--steps": "16", "--block_length": "16",
           "--remasking": "low_confidence", "--temperature": "0"}


def prompt_inputs(cfg, tok, model_args, image_path: str, mask_id: int, gen_length: int) -> tuple[dict, int]:
    """One packed row: <bos> <image> then gen_length mask tokens; returns (model inputs, where the
    answer starts)."""
    builder = build_document_builder(cfg.data, tok, model_args.vision_input)
    caption = builder.caption("prompt", image_path, "")
    prompt = caption.tokens[:-1]  # without <eos>: the answer follows the image
    doc = Document("prompt", prompt + [mask_id] * gen_length, [False] * (len(prompt) + gen_length),
                   caption.images)
    spec = model_args.vision_input
    if spec.positions_fn is not None:
        doc.positions = spec.positions_fn(doc)
    shape = RowShape(cfg.training.seq_len, cfg.data.image_slots_per_row, cfg.data.patches_per_slot,
                     spec.patch_dim, spec.merge_area, tok.pad_id, (tok.image_id,),
                     position_dims=spec.position_dims)
    batch = collate_rows([build_row([doc], shape)], cfg.data.patches_per_slot // spec.merge_area)
    return {k: batch[k] for k in MODEL_INPUTS}, len(prompt)


def load(cfg, opts, args):
    if opts["--hf_path"]:
        spec = get_model_spec(cfg.model.name)
        with torch.device("meta"):
            model = spec.model_cls(args)
        model.to_empty(device="cpu")
        model.init_weights()
        load_hf_weights(model, spec.hf_adapter, opts["--hf_path"])
        return model.eval(), opts["--hf_path"]
    weights = opts["--weights"] or latest_model_export(cfg.job.dump_folder, cfg.checkpoint.folder)
    return load_model(cfg, weights), weights


def main(argv: list[str]):
    opts, rest = dict(OPTIONS), []
    while argv:
        arg = argv.pop(0)
        if arg in opts:
            opts[arg] = argv.pop(0)
        else:
            rest.append(arg)
    cfg, _ = parse_args(rest + ["--objective.name", "mdlm"])
    tok, objective, args = objective_setup(cfg)
    model, source = load(cfg, opts, args)
    root = os.path.dirname(os.path.abspath(opts["--data_path"]))
    with open(opts["--data_path"]) as f:
        samples = [json.loads(line) for line in f if line.strip()][:int(opts["--num"])]
    generator = torch.Generator().manual_seed(cfg.job.seed)
    print(f"weights: {source}")
    for s in samples:
        inputs, start = prompt_inputs(cfg, tok, args, os.path.join(root, s["image"]), objective.mask_id,
                                      int(opts["--gen_length"]))
        answer = mdlm_generate(model, inputs, start, mask_id=objective.mask_id, gen_length=int(opts["--gen_length"]),
                               steps=int(opts["--steps"]), block_length=int(opts["--block_length"]),
                               remasking=opts["--remasking"], temperature=float(opts["--temperature"]),
                               generator=generator, shift=cfg.objective.mdlm_shift).tolist()
        if tok.eos_id in answer:
            answer = answer[:answer.index(tok.eos_id)]
        print(f"{s['image']}: {tok.decode(answer)!r}  (reference: {s['caption']!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
