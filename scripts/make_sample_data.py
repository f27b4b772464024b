"""Generate the bundled synthetic image-caption data set (assets/sample_data/).

Every image shows 1 to 3 coloured shapes, each in a different quadrant of a
2x2 layout, on a near-white tinted background. Captions are a deterministic
function of that content, so a model can actually learn to describe images.

Outputs (relative to --out):
    images/NNNNN.png, images/iNNNNN_K.png   RGB PNG files of mixed sizes
    captions_train.jsonl                    600 {"id", "image", "caption"} rows
    captions_val.jsonl                      100 held-out rows (other images)
    interleaved.jsonl                       80 {"id", "content": [...]} documents
    chat_train.jsonl                        200 {"id", "messages": [...]} conversations
                                            about the caption training images
    README.md                               short description

The output is bit-for-bit reproducible for a given --seed: all randomness
comes from a single random.Random(seed) and files are written with fixed
options.

Usage: python scripts/make_sample_data.py [--out assets/sample_data] [--seed 0]
"""

import argparse
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

NUM_TRAIN = 600
NUM_VAL = 100
NUM_DOCS = 80
NUM_CHATS = 200

SIDES = (32, 48, 64, 80, 96, 112, 128)
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
# Region name -> (column, row) in the 2x2 layout; this order is the caption order.
REGIONS = {
    "top left": (0, 0),
    "top right": (1, 0),
    "bottom left": (0, 1),
    "bottom right": (1, 1),
}
COUNT_WORDS = {2: "two", 3: "three"}
ORDINALS = ("first", "second", "third", "fourth")

TEXT_BEFORE_IMAGE = (
    "The {ordinal} picture shows {desc}.",
    "Here is a picture of {desc}.",
    "Next comes an image with {desc}.",
)
TEXT_AFTER_IMAGE = (
    "This picture shows {desc}.",
    "In the {ordinal} image we see {desc}.",
    "Above you can see {desc}.",
)
CONNECTIVES = ("Here is another one.", "Let us look at one more.", "Now the next picture.")
OPENINGS = (
    "A short set of pictures with simple shapes.",
    "This page has {count} pictures.",
    "Let us look at some coloured shapes.",
)
CLOSINGS = ("That is all for now.", "These were all the pictures.", "The end.")

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You describe pictures of coloured shapes.")
QUESTIONS = ("What is in this picture?", "Describe this image.", "What do you see?",
             "Can you describe the picture?")
TWO_IMAGE_QUESTIONS = ("Describe these two pictures.", "What do these pictures show?")
GREETING = ("Hello!", "Hello! Show me a picture and I will describe it.")

README = """# Sample data

Synthetic image-caption data bundled with titan_mm for smoke tests and demos.
Each image shows 1 to 3 coloured shapes (circle, square, triangle) in the
quadrants of a 2x2 layout; captions describe shape, colour and position.

- `captions_train.jsonl`: {num_train} caption samples
- `captions_val.jsonl`: {num_val} held-out caption samples (different images)
- `interleaved.jsonl`: {num_docs} documents mixing text and 2 to 4 images
- `chat_train.jsonl`: {num_chats} conversations (OpenAI-style messages) about the
  caption training images: questions and answers, some with two images, some
  with follow-up turns or a system prompt
- `images/`: RGB PNG files of mixed sizes (32 to 128 pixels per side)

Image paths are relative to this folder. Generated deterministically with
`python scripts/make_sample_data.py` (seed {seed}).
"""


def sample_content(rng):
    """Return a sorted list of (region, shape, colour) for 1 to 3 objects."""
    regions = rng.sample(list(REGIONS), rng.randint(1, 3))
    objects = [(region, rng.choice(SHAPES), rng.choice(list(COLOURS))) for region in regions]
    return sorted(objects, key=lambda obj: list(REGIONS).index(obj[0]))


def join_phrases(phrases):
    """Join phrases as 'a', 'a and b', 'a, b and c' (', and' if a phrase has 'and')."""
    if len(phrases) == 1:
        return phrases[0]
    last_sep = ", and " if any(" and " in p for p in phrases) else " and "
    return ", ".join(phrases[:-1]) + last_sep + phrases[-1]


def describe(objects):
    """Describe objects (in region order) without a trailing period."""
    groups = {}
    for region, shape, colour in objects:
        groups.setdefault((shape, colour), []).append(region)
    phrases = []
    for (shape, colour), regions in groups.items():
        where = join_phrases(["the " + region for region in regions])
        if len(regions) == 1:
            article = "an" if colour[0] in "aeiou" else "a"
            phrases.append(f"{article} {colour} {shape} at {where}")
        else:
            phrases.append(f"{COUNT_WORDS[len(regions)]} {colour} {shape}s at {where}")
    return join_phrases(phrases)


def draw_shape(draw, shape, colour, x, y, size):
    """Draw one filled shape with its top-left corner at (x, y)."""
    box = (x, y, x + size - 1, y + size - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + size // 2, y), (x + size - 1, y + size - 1), (x, y + size - 1)], fill=fill)


def render(rng, objects):
    """Render objects on a random-size, near-white tinted canvas."""
    width, height = rng.choice(SIDES), rng.choice(SIDES)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    quad_w, quad_h = width // 2, height // 2
    smaller = min(quad_w, quad_h)
    for region, shape, colour in objects:
        col, row = REGIONS[region]
        size = rng.randint((smaller + 1) // 2, smaller * 8 // 10)
        x = col * quad_w + jittered_offset(rng, quad_w - size)
        y = row * quad_h + jittered_offset(rng, quad_h - size)
        draw_shape(draw, shape, colour, x, y, size)
    return image


def jittered_offset(rng, slack):
    """Offset that centres an object in `slack` free pixels, plus small jitter."""
    jitter = slack // 4
    return slack // 2 + rng.randint(-jitter, jitter)


def make_image(rng, out_dir, name):
    """Create one random image file; return (relative path, objects)."""
    objects = sample_content(rng)
    rel_path = f"images/{name}.png"
    render(rng, objects).save(out_dir / rel_path, format="PNG", optimize=True)
    return rel_path, objects


def make_captions(rng, out_dir, start, count):
    """Create `count` caption samples numbered from `start`; return the rows and each image's objects."""
    rows, objects = [], []
    for index in range(start, start + count):
        rel_path, image_objects = make_image(rng, out_dir, f"{index:05d}")
        rows.append({"id": f"cap-{index:05d}", "image": rel_path, "caption": describe(image_objects) + "."})
        objects.append(image_objects)
    return rows, objects


def make_document(rng, out_dir, doc_index):
    """Create one interleaved document with 2 to 4 images."""
    num_images = rng.randint(2, 4)
    segments = []
    if rng.random() < 0.5:
        segments.append(rng.choice(OPENINGS).format(count=num_images))
    for k in range(num_images):
        rel_path, objects = make_image(rng, out_dir, f"i{doc_index:05d}_{k}")
        desc = describe(objects)
        image = {"type": "image", "image": rel_path}
        if k > 0 and rng.random() < 0.3:
            segments.append(rng.choice(CONNECTIVES))
        if rng.random() < 0.5:
            segments += [rng.choice(TEXT_BEFORE_IMAGE).format(ordinal=ORDINALS[k], desc=desc), image]
        else:
            segments += [image, rng.choice(TEXT_AFTER_IMAGE).format(ordinal=ORDINALS[k], desc=desc)]
    if rng.random() < 0.3:
        segments.append(rng.choice(CLOSINGS))
    return {"id": f"doc-{doc_index:05d}", "content": merge_texts(segments)}


def sentence(text):
    """Capitalise the first letter and end with a period."""
    return text[0].upper() + text[1:] + "."


def answer_follow_up(rng, objects):
    """A follow-up question about objects and its answer, both deterministic given rng."""
    kind = rng.choice(("count", "colours", "shape", "region"))
    if kind == "count":
        n = len(objects)
        return "How many shapes are there?", "There is one shape." if n == 1 else f"There are {COUNT_WORDS[n]} shapes."
    if kind == "colours":
        colours = list(dict.fromkeys(colour for _, _, colour in objects))
        return "Which colours do you see?", f"I see {join_phrases(colours)}."
    if kind == "shape":
        shape = rng.choice(SHAPES)
        found = [(region, colour) for region, s, colour in objects if s == shape]
        if not found:
            return f"Is there a {shape}?", f"No, there is no {shape}."
        region, colour = found[0]
        return f"Is there a {shape}?", f"Yes, there is a {colour} {shape} at the {region}."
    region = rng.choice(list(REGIONS))
    found = [(shape, colour) for r, shape, colour in objects if r == region]
    if not found:
        return f"What is at the {region}?", f"Nothing, the {region} is empty."
    shape, colour = found[0]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"What is at the {region}?", f"There is {article} {colour} {shape} at the {region}."


def image_question(rng, image, question):
    """A user message with one image before or after the question."""
    parts = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    return {"role": "user", "content": parts if rng.random() < 0.7 else parts[::-1]}


def make_chat(rng, chat_index, captions, objects):
    """One conversation about one or two caption images, with optional system prompt, greeting and
    follow-up questions."""
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.1:
        messages += [{"role": "user", "content": GREETING[0]}, {"role": "assistant", "content": GREETING[1]}]
    if rng.random() < 0.2:
        first, second = rng.sample(range(len(captions)), 2)
        parts = [{"type": "text", "text": rng.choice(TWO_IMAGE_QUESTIONS)},
                 {"type": "image", "image": captions[first]["image"]},
                 {"type": "image", "image": captions[second]["image"]}]
        answer = (f"The first picture shows {describe(objects[first])}. "
                  f"The second picture shows {describe(objects[second])}.")
        messages += [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]
    else:
        index = rng.randrange(len(captions))
        messages += [image_question(rng, captions[index]["image"], rng.choice(QUESTIONS)),
                     {"role": "assistant", "content": sentence(describe(objects[index]))}]
        for _ in range(rng.choice((0, 0, 1, 2))):
            question, answer = answer_follow_up(rng, objects[index])
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": f"chat-{chat_index:05d}", "messages": messages}


def merge_texts(segments):
    """Turn strings into text items, merging adjacent strings with a space."""
    content = []
    for segment in segments:
        if not isinstance(segment, str):
            content.append(segment)
        elif content and content[-1]["type"] == "text":
            content[-1]["text"] += " " + segment
        else:
            content.append({"type": "text", "text": segment})
    return content


def write_jsonl(path, rows):
    """Write one compact JSON object per line with fixed formatting."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n")


def reset_output(out_dir):
    """Delete the files this script owns in out_dir and recreate images/."""
    shutil.rmtree(out_dir / "images", ignore_errors=True)
    for name in ("captions_train.jsonl", "captions_val.jsonl", "interleaved.jsonl", "chat_train.jsonl",
                 "README.md"):
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / "images").mkdir(parents=True)


def print_summary(out_dir):
    """Print the number of files and total bytes under out_dir."""
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    num_png = sum(p.suffix == ".png" for p in files)
    print(f"{out_dir}: {len(files)} files ({num_png} png), {total} bytes ({total / 1e6:.2f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/sample_data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    reset_output(args.out)
    captions, objects = make_captions(rng, args.out, 0, NUM_TRAIN)
    write_jsonl(args.out / "captions_train.jsonl", captions)
    write_jsonl(args.out / "captions_val.jsonl", make_captions(rng, args.out, NUM_TRAIN, NUM_VAL)[0])
    write_jsonl(args.out / "interleaved.jsonl", [make_document(rng, args.out, i) for i in range(NUM_DOCS)])
    # drawn last from the same generator, so the files above do not change
    write_jsonl(args.out / "chat_train.jsonl",
                [make_chat(rng, i, captions, objects) for i in range(NUM_CHATS)])
    readme = README.format(num_train=NUM_TRAIN, num_val=NUM_VAL, num_docs=NUM_DOCS,
                           num_chats=NUM_CHATS, seed=args.seed)
    (args.out / "README.md").write_text(readme, encoding="utf-8", newline="\n")
    print_summary(args.out)


if __name__ == "__main__":
    main()
