"""Evaluation tasks: local JSONL or Parquet files of samples, one kind of task a file.

A task is named on the command line (``--eval.tasks``) as ``KIND:PATH``; its name in the results is
the file's stem. The kinds and the fields each reads (docs/evaluation.md):

- ``loss``: caption / answer loss and perplexity. ``{"image", "caption"}`` (a caption document, as
  training writes it), ``{"messages"}`` (a conversation in ``data.chat_format``, assistant turns
  scored) or ``{"image", "question", "answer"}`` (one user turn and the answer).
- ``multiple_choice`` (MMBench / MMStar style): ``{"image", "question", "options", "answer"}``,
  options a list (lettered A, B, ...) or a ``{"A": ..., "B": ...}`` object, MMBench's ``A``,
  ``B``, ``C``, ``D`` columns, or MMStar's "Options: A: ..., B: ..." ending the question; an optional ``hint`` goes before the question; ``answer`` is the
  correct letter.
- ``open_vqa``: ``{"image", "question", "answers"}`` (a list of accepted answers) or ``"answer"``.

``image`` is a path relative to the task file's folder, encoded bytes, a ``{"bytes", "path"}``
struct (Parquet, as HF datasets stores images), or absent for a text-only question. ``id`` is
optional (default: the file and record number). An optional ``instruction`` replaces the line
appended to multiple-choice and open questions (MULTIPLE_CHOICE_INSTRUCTION, OPEN_VQA_INSTRUCTION;
"" appends nothing).
"""

import json
import os
import re
from dataclasses import dataclass, field

from titan_mm.config import ConfigError
from titan_mm.data.documents import SampleError, is_image_value
from titan_mm.data.formats import import_parquet

TASK_KINDS = ("loss", "multiple_choice", "open_vqa")

MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""Appended to a multiple-choice prompt (LLaVA's MMBench prompt)."""
OPEN_VQA_INSTRUCTION = "Answer the question using a single word or phrase."
"""Appended to an open question (LLaVA's VQAv2 / TextVQA prompt)."""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    path: str


def parse_task(spec: str) -> Task:
    """``KIND:PATH`` -> Task; ConfigError naming the fix for anything else."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in TASK_KINDS:
        raise ConfigError(f"eval task {spec!r} must be KIND:PATH with KIND one of {list(TASK_KINDS)}, e.g. "
                          f"multiple_choice:assets/eval_tasks/mc_colours.jsonl")
    if os.path.splitext(path)[1].lower() not in (".jsonl", ".parquet"):
        raise ConfigError(f"eval task file {path!r} must end in .jsonl or .parquet")
    if not os.path.isfile(path):
        raise ConfigError(f"eval task file {path!r} not found")
    return Task(os.path.splitext(os.path.basename(path))[0], kind, path)


def read_records(path: str) -> list:
    """Every record of a task file (task files are small: read whole). A JSONL line that is not
    JSON is returned as the SampleError it raises, to be counted as a skip."""
    if path.lower().endswith(".parquet"):
        return import_parquet(path).read_table(path).to_pylist()
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(SampleError("malformed", f"{path}:{number}: invalid JSON ({e})"))
    return records


@dataclass
class Sample:
    """One question of a task, ready to score."""

    id: str
    prompt: list[dict]
    """OpenAI-style messages up to the answer (for loss samples: the whole document's record)."""
    answers: list[str] = field(default_factory=list)
    """open_vqa: the accepted answers; multiple_choice: the correct letter; loss: unused."""
    options: dict[str, str] = field(default_factory=dict)
    """multiple_choice: letter -> option text."""


def build_sample(kind: str, record, ref: str) -> Sample:
    """The Sample of one record; SampleError (counted as a skip) for a record the kind cannot read."""
    if isinstance(record, SampleError):
        raise record
    if not isinstance(record, dict):
        raise SampleError("malformed", f"{ref}: a record must be an object")
    sample_id = str(record.get("id", ref))
    if kind == "loss":
        if not any(k in record for k in ("caption", "messages", "answer")):
            raise SampleError("malformed", f"{ref}: a loss record needs 'caption', 'messages' or "
                                           f"'question' and 'answer'")
        return Sample(sample_id, [record])
    question = _text_field(record, "question", ref)
    if kind == "multiple_choice":
        question, options = _options(record, question, ref)
        answer = record.get("answer")
        if answer not in options:
            raise SampleError("malformed", f"{ref}: answer {answer!r} is not one of the option letters "
                                           f"{list(options)}")
        hint = record.get("hint")
        lines = ([hint] if isinstance(hint, str) and hint.strip() else []) + [question]
        lines += [f"{letter}. {text}" for letter, text in options.items()]
        prompt = with_instruction(record, "\n".join(lines), MULTIPLE_CHOICE_INSTRUCTION, ref)
        return Sample(sample_id, user_turn(record, prompt), [answer], options)
    answers = record.get("answers", record.get("answer"))
    answers = [answers] if isinstance(answers, str) else answers
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise SampleError("malformed", f"{ref}: an open_vqa record needs 'answers' (a list of strings) or "
                                       f"'answer' (a string)")
    return Sample(sample_id, user_turn(record, with_instruction(record, question, OPEN_VQA_INSTRUCTION, ref)), answers)


def with_instruction(record: dict, text: str, default: str, ref: str) -> str:
    """``text`` and, on a line of its own, the record's ``instruction`` (default: ``default``)."""
    instruction = record.get("instruction", default)
    if not isinstance(instruction, str):
        raise SampleError("malformed", f"{ref}: 'instruction' must be a string")
    return f"{text}\n{instruction}" if instruction else text


def user_turn(record: dict, text: str) -> list[dict]:
    """One user message: the record's image (if any), then ``text``."""
    content = [{"type": "text", "text": text}]
    if record.get("image") is not None:
        if not is_image_value(record["image"]):
            raise SampleError("malformed", f"{record.get('id')}: image {record['image']!r:.80} is not a path, "
                                           f"bytes or {{bytes, path}} struct")
        content.insert(0, {"type": "image", "image": record["image"]})
    return [{"role": "user", "content": content}]


def _text_field(record: dict, key: str, ref: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SampleError("malformed", f"{ref}: needs a non-empty string '{key}'")
    return value


def _options(record: dict, question: str, ref: str) -> tuple[str, dict[str, str]]:
    """(question, letter -> text), the options from 'options' (a list or an object), MMBench's A, B,
    C, ... columns, or else MMStar's "Options: A: ..., B: ..." at the end of the question (which
    then loses that part, since the prompt lists the options itself)."""
    options = record.get("options")
    if isinstance(options, list):
        options = {chr(ord("A") + i): o for i, o in enumerate(options)}
    elif options is None:
        options = {letter: record[letter] for letter in "ABCDEFGH" if isinstance(record.get(letter), str)}
        if not options:
            question, options = options_in_question(question)
    if not (isinstance(options, dict) and len(options) >= 2
            and all(isinstance(k, str) and len(k) == 1 and k.isupper() and isinstance(v, str) and v.strip()
                    for k, v in options.items())):
        raise SampleError("malformed", f"{ref}: a multiple_choice record needs 'options' (a list of at least "
                                       f"two strings or a letter -> text object), columns A, B, ..., or a "
                                       f"question ending in 'Options: A: ..., B: ...'")
    return question, options


OPTIONS_IN_TEXT = re.compile(r"(?:^|,\s*|\n\s*)([A-H])\s*[:.]\s+")


def options_in_question(question: str) -> tuple[str, dict[str, str]]:
    """MMStar's layout: "stem\nOptions: A: text, B: text, ..." -> (stem, {"A": text, ...}); the
    letters must run A, B, C, ... in order, else no options are read ({})."""
    stem, found, listed = question.rpartition("Options:")
    if not found:
        return question, {}
    parts = OPTIONS_IN_TEXT.split(listed.strip())
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if parts[0].strip() or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return question, {}
    return stem.rstrip(), dict(zip(letters, texts))
