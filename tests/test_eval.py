"""The evaluation harness (titan_mm/eval): task files, metrics, the runner in one process, in two
data-parallel processes, and inside training."""

import json
import os
import sys

import pytest
from conftest import load_script, make_config
from test_parallel import run_in_own_session

from titan_mm.config import ConfigError, parse_args
from titan_mm.data.documents import SampleError
from titan_mm.eval.harness import task_metrics
from titan_mm.eval.metrics import anls, exact_match, option_letter
from titan_mm.eval.tasks import build_sample, parse_task, read_records

TASKS = ["loss:assets/eval_tasks/captions_loss.jsonl", "multiple_choice:assets/eval_tasks/mc_shapes.jsonl",
         "open_vqa:assets/eval_tasks/open_shapes.jsonl"]
SMALL = ["--job.config_file", "train_configs/debug_vlm_chat.toml", "--training.seq_len", "256",
         "--data.image_slots_per_row", "10", "--data.plan_samples", "0", "--metrics.log_freq", "4"]
EVAL = ["--eval.tasks", ",".join(TASKS), "--eval.max_samples", "3", "--eval.max_new_tokens", "4"]


def reference_results(spec: str) -> list[dict]:
    """Per-sample results of a bundled task whose predictions are its reference answers."""
    task = parse_task(spec)
    samples = [build_sample(task.kind, r, str(i)) for i, r in enumerate(read_records(task.path))]
    if task.kind == "multiple_choice":
        return [{"answer": s.answers[0], "generated_letter": option_letter(s.answers[0], s.options),
                 "likelihood_letter": s.answers[0], "likelihood_norm_letter": s.answers[0]} for s in samples]
    return [{"answers": s.answers, "generated": s.answers[0]} for s in samples]


@pytest.mark.parametrize("spec", TASKS[1:])
def test_reference_answers_as_predictions_score_100_percent(spec):
    metrics = task_metrics(parse_task(spec).kind, reference_results(spec))
    scores = {k: v for k, v in metrics.items() if k != "unparsed_generated"}
    assert scores and all(v == 1.0 for v in scores.values()), metrics
    assert metrics.get("unparsed_generated", 0.0) == 0.0


def test_anls_and_exact_match_follow_the_standard_definitions():
    assert exact_match("Two.", ["two"]) == 1.0 and exact_match("three", ["two"]) == 0.0
    # 1 - normalised edit distance, 0 at or above the 0.5 threshold; best reference counts
    assert anls("helo", ["hello"]) == pytest.approx(0.8)
    assert anls("HELLO ", ["hello"]) == 1.0
    assert anls("abcd", ["abxy"]) == 0.0  # distance 2 / 4 = 0.5: not below the threshold
    assert anls("abcd", ["xyzw", "abcx"]) == pytest.approx(0.75)


def test_option_letter_reads_letters_not_articles():
    options = {"A": "red", "B": "blue", "C": "two"}
    assert [option_letter(a, options) for a in ("B", "(C)", "A. red", "blue", "Two.")] == ["B", "C", "A", "B", "C"]
    assert option_letter("A red square", options) is None  # an article, not a choice
    assert option_letter("D", options) is None


def test_mmstar_options_inside_the_question_are_read_and_listed_once():
    """MMStar's records carry their options in the question ("Options: A: ..., B: ..."): they become
    the sample's options, and the prompt lists them once, as for an 'options' record."""
    question = ("Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase "
                "is on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed.")
    sample = build_sample("multiple_choice", {"question": question, "answer": "C"}, "r")
    listed = build_sample("multiple_choice", {"question": question.split("\nOptions:")[0], "answer": "C",
                                              "options": ["The suitcase is on the book.", "The suitcase is beneath "
                                                          "the cat.", "The suitcase is beneath the bed."]}, "r")
    assert sample.options == listed.options and sample.prompt == listed.prompt
    assert sample.prompt[0]["content"][0]["text"].count("The suitcase is on the book.") == 1
    with pytest.raises(SampleError, match="Options: A: ..., B: ..."):  # letters out of order: not options
        build_sample("multiple_choice", {"question": "q?\nOptions: B: x, A: y", "answer": "A"}, "r")


def test_malformed_records_are_counted_skips_and_bad_task_specs_config_errors(tmp_path):
    with pytest.raises(SampleError, match="answer 'E' is not one of the option letters"):
        build_sample("multiple_choice", {"question": "q?", "options": ["a", "b"], "answer": "E"}, "r")
    with pytest.raises(SampleError, match="needs 'answers'"):
        build_sample("open_vqa", {"question": "q?"}, "r")
    # MMBench's A, B, C, D columns and a hint
    sample = build_sample("multiple_choice", {"question": "q?", "hint": "h", "A": "x", "B": "y", "answer": "B"}, "r")
    assert sample.options == {"A": "x", "B": "y"} and sample.prompt[0]["content"][0]["text"].startswith("h\nq?\nA. x")
    with pytest.raises(ConfigError, match="must be KIND:PATH"):
        parse_args(["--eval.tasks", "vqa:assets/eval_tasks/open_shapes.jsonl"])
    with pytest.raises(ConfigError, match="eval.tasks is empty"):
        parse_args(["--eval.interval", "5"])


def test_parquet_task_with_image_bytes_reads_like_the_jsonl_task(tmp_path):
    """A multiple-choice task as Parquet, images as {bytes, path} structs (as HF datasets writes
    them): the same prompts, token for token and patch for patch, as the bundled JSONL."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    import torch

    from titan_mm.data.dataloader import build_document_builder
    from titan_mm.eval.harness import absolute_media
    from titan_mm.objectives import objective_setup

    spec = "multiple_choice:assets/eval_tasks/mc_shapes.jsonl"
    records = read_records(parse_task(spec).path)[:4]
    rows = []
    for r in records:
        with open(os.path.join("assets/eval_tasks", r["image"]), "rb") as f:
            rows.append({**r, "image": {"bytes": f.read(), "path": None}})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mc.parquet")
    cfg = parse_args(["--job.config_file", "train_configs/debug_vlm_chat.toml"])[0]
    tok, _, args = objective_setup(cfg)
    builder = build_document_builder(cfg.data, tok, args.vision_input, "chat")
    parquet = read_records(parse_task(f"multiple_choice:{tmp_path / 'mc.parquet'}").path)
    for a, b in zip(records, parquet, strict=True):
        docs = [builder.chat("r", absolute_media(build_sample("multiple_choice", r, "r").prompt, root), root,
                             add_generation_prompt=True)
                for r, root in ((a, os.path.abspath("assets/eval_tasks")), (b, str(tmp_path)))]
        assert docs[0].tokens == docs[1].tokens
        assert torch.equal(docs[0].images[0].patches, docs[1].images[0].patches)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug chat VLM trained 8 steps with the bundled tasks evaluated at steps 4 and 8."""
    import train
    tmp = tmp_path_factory.mktemp("eval_run")
    cfg = make_config(tmp, *SMALL, "--training.steps", "8", "--metrics.enable_tensorboard", "true",
                      "--eval.interval", "4", *EVAL)
    train.Trainer(cfg).train()
    return cfg


def test_evaluation_inside_training_writes_tensorboard_and_json(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = trained.job.dump_folder
    assert sorted(os.listdir(os.path.join(folder, "eval"))) == ["step-4.json", "step-8.json"]
    events = EventAccumulator(os.path.join(folder, "tb")).Reload()
    for tag in ("eval/captions_loss/perplexity", "eval/mc_shapes/accuracy_likelihood", "eval/open_shapes/anls"):
        assert [e.step for e in events.Scalars(tag)] == [4, 8], tag


def run_evaluate_script(cfg, out: str, nproc: int = 1) -> dict:
    args = [*SMALL, "--job.dump_folder", cfg.job.dump_folder, *EVAL, "--eval.out", out]
    if nproc == 1:
        assert load_script("evaluate").main(args) == 0
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "scripts/evaluate.py", *args]
        code, stdout, stderr = run_in_own_session(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert code == 0, stdout[-2000:] + stderr[-3000:]
        assert "| mc_shapes | multiple_choice | 3 | 0 | accuracy_likelihood |" in stdout
    with open(out) as f:
        return json.load(f)


def metrics_of(results: dict) -> dict:
    return {name: task["metrics"] for name, task in results["tasks"].items()}


def test_bundled_tasks_from_the_checkpoint_match_training_and_two_ranks(trained, tmp_path, capsys):
    """scripts/evaluate.py on the exported step-8 weights: the same numbers as the evaluation inside
    training at step 8 (1e-6), and again split over 2 gloo ranks with the results merged."""
    single = run_evaluate_script(trained, str(tmp_path / "one.json"))
    assert "| captions_loss | loss | 3 | 0 | perplexity |" in capsys.readouterr().out
    with open(os.path.join(trained.job.dump_folder, "eval", "step-8.json")) as f:
        during_training = json.load(f)
    two_ranks = run_evaluate_script(trained, str(tmp_path / "two.json"), nproc=2)
    assert two_ranks["ranks"] == 2
    for other in (during_training, two_ranks):
        for task, metrics in metrics_of(single).items():
            assert metrics_of(other)[task] == pytest.approx(metrics, rel=1e-6, abs=1e-9), task
        generated = [s.get("generated") for t in other["tasks"].values() for s in t["samples"]]
        assert generated == [s.get("generated") for t in single["tasks"].values() for s in t["samples"]]


def test_eval_grounding_script_still_runs(trained, tmp_path, capsys):
    """scripts/eval_grounding.py (caption loss with true vs swapped images) goes through the same
    document scoring."""
    with open("assets/sample_data/captions_val.jsonl") as f:
        records = [json.loads(line) for line in f][:6]
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({**r, "image": os.path.abspath(f"assets/sample_data/{r['image']}")}) + "\n"
                            for r in records))
    load_script("eval_grounding").main([*SMALL, "--job.dump_folder", trained.job.dump_folder, "--data_path", str(data)])
    assert "true images lower by" in capsys.readouterr().out
