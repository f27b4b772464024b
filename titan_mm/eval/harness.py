"""The evaluation harness: run tasks (titan_mm/eval/tasks.py) on a model, data-parallel across ranks,
and merge, tabulate and save the results (docs/evaluation.md).

Each rank scores every world-th sample of a task; the per-sample results are gathered on every
rank and the metrics computed from all of them, so a task's numbers do not depend on the number of
ranks. Likelihoods come from ``titan_mm.evaluate.score_documents`` (packed rows of the training
shape), generated answers from ``titan_mm.generate`` (greedy, batched, KV cache).
"""

import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from titan_mm.config import ConfigError, JobConfig
from titan_mm.data.dataloader import build_document_builder
from titan_mm.data.documents import Document, SampleError, image_input
from titan_mm.eval.metrics import anls, exact_match, option_letter
from titan_mm.eval.tasks import Sample, Task, build_sample, parse_task, read_records, user_turn
from titan_mm.evaluate import score_documents
from titan_mm.generate import InferenceModel, Sampling, chat_prompt, completion_text, generate
from titan_mm.parallel.common import fsdp_gathered

logger = logging.getLogger("titan_mm")


@dataclass
class TaskResult:
    task: Task
    metrics: dict[str, float]
    samples: list[dict]
    """Per-sample results, in file order (id, prediction, ...)."""
    skipped: dict[str, int]
    """Samples left out, by reason."""


class Evaluator:
    """Runs tasks (``cfg.eval``: sample limit, generation length and batch) with one model.
    ``group``: the data-parallel process group the samples are split over (None: this process
    scores everything)."""

    def __init__(self, cfg: JobConfig, im: InferenceModel, *, group=None):
        self.cfg, self.im, self.group = cfg, im, group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.chat_builder = im.chat_builder
        self.caption_builder = build_document_builder(cfg.data, im.tokenizer, im.args.vision_input, "captions")

    def run(self, tasks: list[Task]) -> list[TaskResult]:
        return [self.run_task(task) for task in tasks]

    def run_task(self, task: Task) -> TaskResult:
        if task.kind != "loss" and not self.im.objective.causal:
            raise ValueError(f"task {task.name} ({task.kind}) generates answers, which a model trained with "
                             f"objective {self.cfg.objective.name} cannot do left to right; run loss tasks")
        if self.chat_builder is None and task.kind != "loss":
            raise ConfigError(f"task {task.name} ({task.kind}) is prompted in data.chat_format: {self.im.chat_error}")
        records = read_records(task.path)
        if self.cfg.eval.max_samples:
            records = records[:self.cfg.eval.max_samples]
        samples, skipped = [], []
        for i in range(self.rank, len(records), self.world):  # this rank's share
            try:
                samples.append((i, build_sample(task.kind, records[i], f"{task.path}:{i + 1}")))
            except SampleError as e:
                skipped.append((i, e.kind, str(e)))
        score = {"loss": self.score_loss, "multiple_choice": self.score_multiple_choice,
                 "open_vqa": self.score_open_vqa}[task.kind]
        results, failed = score(samples, os.path.dirname(os.path.abspath(task.path)))
        results, skipped = self.gather(results), self.gather(skipped + failed)
        counts: dict[str, int] = {}
        for _, kind, _ in skipped:
            counts[kind] = counts.get(kind, 0) + 1
        per_sample = [r for _, r in results]
        return TaskResult(task, task_metrics(task.kind, per_sample), per_sample, counts)

    def gather(self, items: list[tuple]) -> list[tuple]:
        """Every rank's (sample index, ...) items, in sample order."""
        if self.group is not None:
            parts = [None] * self.world
            dist.all_gather_object(parts, items, group=self.group)
            items = [item for part in parts for item in part]
        return sorted(items, key=lambda item: item[0])

    # --- documents ------------------------------------------------------------------------------

    def document(self, sample: Sample, root: str, answer: str | None = None) -> Document:
        """The sample as a training document: a loss record as its kind is trained; a question with
        ``answer`` as the assistant's turn (the answer's tokens and the end of turn predicted)."""
        if answer is None:
            record = sample.prompt[0]
            if "caption" in record:
                image = record.get("image")
                if image is None:
                    raise SampleError("malformed", f"{sample.id}: a caption record needs an image")
                return self.caption_builder.caption(sample.id, image_input(image, root), record["caption"])
            if "messages" in record:
                return self.chat_document(sample.id, record["messages"], root, record.get("images"))
            if not (isinstance(record.get("question"), str) and isinstance(record["answer"], str)):
                raise SampleError("malformed", f"{sample.id}: 'question' and 'answer' must be strings")
            answer, sample = record["answer"], Sample(sample.id, user_turn(record, record["question"]))
        return self.chat_document(sample.id, [*sample.prompt, {"role": "assistant", "content": answer}], root)

    def chat_document(self, ref: str, messages: list[dict], root: str, images: list | None = None) -> Document:
        if self.chat_builder is None:
            raise ConfigError(f"{ref} is a conversation, written in data.chat_format: {self.im.chat_error}")
        return self.chat_builder.chat(ref, messages, root, images)

    def scores(self, docs: list[Document]) -> list:
        return score_documents(self.cfg, self.im.model, self.im.args, docs, self.cfg.job.seed, self.im.device)

    def answers(self, prompts: list[Document]) -> list[str]:
        """Greedy answers to ``prompts`` (generated eval.batch_size at a time), stripped."""
        sampling = Sampling(max_new_tokens=self.cfg.eval.max_new_tokens)
        answers = []
        for i in range(0, len(prompts), self.cfg.eval.batch_size):
            for ids in generate(self.im, prompts[i:i + self.cfg.eval.batch_size], sampling):
                answers.append(completion_text(self.im.tokenizer, ids).strip())
        return answers

    def prompt(self, sample: Sample, root: str) -> Document:
        return chat_prompt(self.im, absolute_media(sample.prompt, root))

    # --- the three kinds --------------------------------------------------------------------------

    def documents_of(self, samples, make) -> tuple[list, list]:
        """(index, sample, make(sample)) of the samples whose documents build, and the skips."""
        ok, skipped = [], []
        for i, sample in samples:
            try:
                ok.append((i, sample, make(sample)))
            except SampleError as e:
                skipped.append((i, e.kind, str(e)))
        return ok, skipped

    def score_loss(self, samples, root):
        ok, skipped = self.documents_of(samples, lambda s: [self.document(s, root)])
        scores = self.scores([docs[0] for _, _, docs in ok])
        results = []
        for (i, sample, _), s in zip(ok, scores):
            if s is None:
                skipped.append((i, "overlong", f"{sample.id}: does not fit a row of training.seq_len tokens"))
            else:
                results.append((i, {"id": sample.id, "loss": s.loss, "tokens": s.tokens, "correct": s.correct}))
        return results, skipped

    def score_multiple_choice(self, samples, root):
        # per sample: its prompt to generate from, then each option as the answer
        ok, skipped = self.documents_of(samples, lambda s: [self.prompt(s, root)] + [
            self.document(s, root, text) for text in s.options.values()])
        scores = self.scores([doc for _, _, docs in ok for doc in docs[1:]])
        generated = self.answers([docs[0] for _, _, docs in ok])
        results, k = [], 0
        for (i, sample, docs), text in zip(ok, generated):
            option_scores, k = scores[k:k + len(docs) - 1], k + len(docs) - 1
            if any(s is None for s in option_scores):
                skipped.append((i, "overlong", f"{sample.id}: an option does not fit a row"))
                continue
            letters = list(sample.options)
            loss = [s.loss for s in option_scores]
            # lm-evaluation-harness' acc_norm: log-likelihood per character of the option text
            per_char = [s.loss / max(1, len(t)) for s, t in zip(option_scores, sample.options.values())]
            results.append((i, {
                "id": sample.id, "answer": sample.answers[0], "generated": text,
                "generated_letter": option_letter(text, sample.options),
                "likelihood_letter": letters[min(range(len(loss)), key=loss.__getitem__)],
                "likelihood_norm_letter": letters[min(range(len(per_char)), key=per_char.__getitem__)],
                "option_losses": loss}))
        return results, skipped

    def score_open_vqa(self, samples, root):
        ok, skipped = self.documents_of(samples, lambda s: self.prompt(s, root))
        generated = self.answers([prompt for _, _, prompt in ok])
        results = [(i, {"id": sample.id, "answers": sample.answers, "generated": text})
                   for (i, sample, _), text in zip(ok, generated)]
        return results, skipped


def absolute_media(messages: list[dict], root: str) -> list[dict]:
    """``messages`` with image paths made absolute (relative ones are relative to the task file)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": image_input(part["image"], root)}
                       if part.get("type") == "image" and isinstance(part.get("image"), str) else part
                       for part in content]
        out.append({**message, "content": content})
    return out


def task_metrics(kind: str, results: list[dict]) -> dict[str, float]:
    """A task's metrics from its per-sample results (every rank's). Accuracies are fractions."""
    n = len(results)
    if kind == "loss":
        tokens = sum(r["tokens"] for r in results)
        loss = sum(r["loss"] for r in results) / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy":
                sum(r["correct"] for r in results) / max(tokens, 1), "tokens": tokens}
    if kind == "multiple_choice":
        def accuracy(key):
            return sum(r[key] == r["answer"] for r in results) / max(n, 1)
        return {"accuracy_generated": accuracy("generated_letter"), "accuracy_likelihood": accuracy("likelihood_letter"),
                "accuracy_likelihood_norm": accuracy("likelihood_norm_letter"),
                "unparsed_generated": sum(r["generated_letter"] is None for r in results) / max(n, 1)}
    return {"exact_match": sum(exact_match(r["generated"], r["answers"]) for r in results) / max(n, 1),
            "anls": sum(anls(r["generated"], r["answers"]) for r in results) / max(n, 1)}


def results_table(results: list[TaskResult]) -> str:
    """A Markdown table: one line per task and metric."""
    lines = ["| task | kind | samples | skipped | metric | value |", "|---|---|---|---|---|---|"]
    for r in results:
        skipped = sum(r.skipped.values())
        for name, value in r.metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {r.task.name} | {r.task.kind} | {len(r.samples)} | {skipped} | {name} | {shown} |")
    return "\n".join(lines)


def write_results(results: list[TaskResult], path: str, **header):
    """The results as JSON: ``header`` (weights, step ...), then per task its metrics, skip counts and
    per-sample results."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = {**header, "tasks": {r.task.name: {"kind": r.task.kind, "path": r.task.path, "metrics": r.metrics,
                                             "skipped": r.skipped, "samples": r.samples} for r in results}}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


class TrainingEvaluation:
    """eval.tasks run inside train.py every eval.interval steps and at the last step: the training
    model in eval mode (parameters gathered under FSDP, so that each data-parallel rank scores its
    own share), results in TensorBoard as eval/TASK/METRIC, as a table in the log and in
    dump_folder/eval/step-N.json."""

    def __init__(self, cfg: JobConfig, model: torch.nn.Module, model_args, tokenizer, objective, *, dp_group,
                 rank: int, autocast):
        self.cfg, self.model, self.rank, self.autocast, self.dp_group = cfg, model, rank, autocast, dp_group
        self.tasks = [parse_task(spec) for spec in cfg.eval.tasks]
        self.im = InferenceModel(
            model=model, args=model_args, tokenizer=tokenizer, objective=objective,
            prompt_builder=build_document_builder(cfg.data, tokenizer, model_args.vision_input, "interleaved"),
            chat_builder=build_document_builder(cfg.data, tokenizer, model_args.vision_input, "chat"),
            source="training")

    def due(self, step: int, last: bool) -> bool:
        return self.cfg.eval.interval > 0 and (step % self.cfg.eval.interval == 0 or last)

    def run(self, step: int, writer) -> list[TaskResult]:
        self.model.eval()
        try:
            with fsdp_gathered(self.model), self.autocast:
                results = Evaluator(self.cfg, self.im, group=self.dp_group).run(self.tasks)
        finally:
            self.model.train()
        if self.rank == 0:
            write_results(results, os.path.join(self.cfg.job.dump_folder, "eval", f"step-{step}.json"), step=step)
            logger.info("evaluation at step %d:\n%s", step, results_table(results))
            if writer is not None:
                for r in results:
                    for name, value in r.metrics.items():
                        writer.add_scalar(f"eval/{r.task.name}/{name}", value, step)
                writer.flush()
        return results
