"""Evaluate a trained model on evaluation tasks (docs/evaluation.md): caption / answer loss and
perplexity, multiple-choice VQA (by the letter generated and by option likelihood), open VQA
(exact match, ANLS). Prints a results table and writes a JSON file.

    python scripts/evaluate.py --job.config_file train_configs/debug_vlm_chat.toml \\
        --eval.tasks loss:assets/eval_tasks/captions_loss.jsonl,multiple_choice:assets/eval_tasks/mc_shapes.jsonl \\
        [--weights DIR | --hf_path DIR] [--eval.out results.json]
    # data-parallel: every rank scores its share of each task, the results are merged
    torchrun --nproc_per_node 2 scripts/evaluate.py --job.config_file ... --eval.tasks ...

``--weights`` (a DCP model folder) defaults to the newest model-step-N export of the run;
``--hf_path`` loads an HF folder instead. Any other ``--section.key value`` is read as in train.py.
"""

import os
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from titan_mm.config import ConfigError, parse_args, split_script_options  # noqa: E402
from titan_mm.eval.harness import Evaluator, results_table, write_results  # noqa: E402
from titan_mm.eval.tasks import parse_task  # noqa: E402
from titan_mm.evaluate import latest_model_export  # noqa: E402
from titan_mm.generate import load_model_for_inference  # noqa: E402


def main(argv: list[str]) -> int:
    try:
        opts, rest = split_script_options(argv, {"--weights": None, "--hf_path": None})
        cfg, _ = parse_args(rest)
        if not cfg.eval.tasks:
            raise ConfigError("no tasks: give --eval.tasks KIND:PATH[,KIND:PATH ...]")
        tasks = [parse_task(spec) for spec in cfg.eval.tasks]
        if not opts["--hf_path"]:
            opts["--weights"] = opts["--weights"] or latest_model_export(cfg.job.dump_folder, cfg.checkpoint.folder)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    group = None
    if "WORLD_SIZE" in os.environ:
        # results are gathered as Python objects: a CPU group, whatever device the model is on
        dist.init_process_group(backend="gloo")
        group = dist.group.WORLD
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    im = load_model_for_inference(cfg, checkpoint=opts["--weights"], hf_path=opts["--hf_path"], device=device)
    try:
        results = Evaluator(cfg, im, group=group).run(tasks)
    except ConfigError as e:  # every rank meets it at the same task
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if group is None or dist.get_rank() == 0:
        out = cfg.eval.out or os.path.join(cfg.job.dump_folder, "eval", "results.json")
        write_results(results, out, weights=im.source, ranks=dist.get_world_size() if group else 1)
        print(f"weights: {im.source}")
        print(results_table(results))
        print(f"results: {out}")
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
