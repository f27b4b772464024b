"""Generate the bundled synthetic evaluation tasks (assets/eval_tasks/), one of each kind, from the
held-out caption samples of assets/sample_data (images 00600-00699, never trained on).

Questions and answers are written as the bundled chats write them (scripts/make_sample_data.py), so
a model trained on those chats can answer them (the open questions without the usual "single word
or phrase" instruction, which those chats never give):

    captions_loss.jsonl    loss: held-out captions, and question / answer pairs
    mc_shapes.jsonl        multiple_choice: how many shapes (3 options), which colours (4 options)
    open_shapes.jsonl      open_vqa: the same two questions, the chat answer and its short form

The objects of each image are read back from its caption. Deterministic (seed 0).

Usage: python scripts/make_eval_tasks.py [--sample_data assets/sample_data] [--out assets/eval_tasks]
"""

import argparse
import json
import os
import random
import re

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
REGIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PHRASE = re.compile(rf"(?:an?|two|three) ({'|'.join(COLOURS)}) (circle|square|triangle)s? at "
                    rf"((?:the (?:top|bottom) (?:left|right)(?:,? and |, )?)+)")
SAMPLES = 24


def objects_of(caption: str) -> list[tuple[str, str, str]]:
    """(region, shape, colour) of each object a caption names, in region order."""
    objects = []
    for colour, shape, where in PHRASE.findall(caption):
        objects += [(region, shape, colour) for region in re.findall(r"(?:top|bottom) (?:left|right)", where)]
    if not objects:
        raise ValueError(f"cannot read the objects of {caption!r}")
    return sorted(objects, key=lambda o: REGIONS.index(o[0]))


def join_phrases(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def count_answer(n: int) -> str:
    return "There is one shape." if n == 1 else f"There are {COUNT_WORDS[n]} shapes."


def colours_of(objects) -> list[str]:
    return list(dict.fromkeys(colour for _, _, colour in objects))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample_data", default="assets/sample_data")
    parser.add_argument("--out", default="assets/eval_tasks")
    args = parser.parse_args()
    rng = random.Random(0)
    with open(os.path.join(args.sample_data, "captions_val.jsonl")) as f:
        captions = [json.loads(line) for line in f if line.strip()][:SAMPLES]
    image_dir = os.path.relpath(args.sample_data, args.out)
    loss, mc, open_vqa = [], [], []
    for i, c in enumerate(captions):
        image = f"{image_dir}/{c['image']}"
        objects = objects_of(c["caption"])
        colours = colours_of(objects)
        if i % 3 == 2:
            loss.append({"id": f"qa-{i}", "image": image, "question": "How many shapes are there?",
                         "answer": count_answer(len(objects))})
        else:
            loss.append({"id": c["id"], "image": image, "caption": c["caption"]})
        if i % 2 == 0:
            options = [count_answer(n) for n in (1, 2, 3)]
            answer = options.index(count_answer(len(objects)))
            mc.append({"id": f"mc-count-{i}", "image": image, "question": "How many shapes are there?",
                       "options": options, "answer": "ABC"[answer]})
            open_vqa.append({"id": f"open-count-{i}", "image": image, "question": "How many shapes are there?",
                             "answers": [count_answer(len(objects)), COUNT_WORDS[len(objects)]], "instruction": ""})
        else:
            right = f"I see {join_phrases(colours)}."
            others = [f"I see {c}." for c in rng.sample([c for c in COLOURS if c not in colours], 3)]
            options = others[:]
            options.insert(rng.randrange(4), right)
            mc.append({"id": f"mc-colours-{i}", "image": image, "question": "Which colours do you see?",
                       "options": options, "answer": "ABCD"[options.index(right)]})
            open_vqa.append({"id": f"open-colours-{i}", "image": image, "question": "Which colours do you see?",
                             "answers": [right, join_phrases(colours)], "instruction": ""})
    os.makedirs(args.out, exist_ok=True)
    for name, records in (("captions_loss", loss), ("mc_shapes", mc), ("open_shapes", open_vqa)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{args.out}/{name}.jsonl: {len(records)} samples")


if __name__ == "__main__":
    main()
