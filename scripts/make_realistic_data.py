"""Generate realistic data sets for benchmarking the trainer on the data users train on.

    python scripts/make_realistic_data.py --out /data/realistic [--seed 0] [--captions 2000] \
        [--chats 1000] [--videos 100] [--kinds captions,chat,video] [--jobs 8]

Writes, each folder's media paths relative to its JSONL file:
- captions/captions.jsonl: {"id", "image", "caption"} rows (also what
  ../shared/bench/hf_real_baseline.py reads); images/ holds JPEGs whose sides are drawn uniformly
  from 224 to 1024 px (aspect ratio at most 4:1), captions of 20 to 120 words;
- chat/chat.jsonl: OpenAI-style conversations with 1 to 4 such images and 1 to 4 turns, answers of
  5 to 300 words (log-normal, median about 50);
- video/chat.jsonl: conversations about one short mp4 clip each (2 to 5 s, 24-30 fps, 320 x 240 to
  854 x 480, H.264 through torchcodec's encoder, else the ffmpeg command), and video/tokenizer/: the
  bundled tokenizer plus <|video_pad|>, which the Qwen families need for videos
  (--model.tokenizer_path).

Use a folder's JSONL as data.path (kind captions or chat; chat_format "plain" with the bundled
tokenizer). Images are textured (smooth colour fields at three scales, shapes, grain), not flat
colours, so JPEG sizes and decode times are those of photos (about 1 to 2 bits per pixel at
quality 90). Words come from a list of common English words that the bundled 512-token BPE keeps
in one or two tokens and a real BPE (Qwen's, GPT-2's) in one, so a text of n words is roughly
1.3 n tokens with either. Every file is a function of --seed and its index (the same bytes on
every run with the same library versions), whatever --jobs.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

WORDS = (
    "a the of and in on with at to is are was it this that there these an by for near over next its "
    "their his her one two three four some tall short old new dark red green blue yellow orange purple "
    "square wet cold man cat bird cow car bus tree sea park bed wall picture image shows looking hat "
    "ball left right top bottom circle color text time day very who what how can would has have had be "
    "been being not no yes more most other another all both end first second third page set simple see "
    "look now then they we you our she he him them go come comes came get got say well up off any every "
    "same lot way thing seem let sat sit wear ate move show seen gave tell told use call love leg foot"
).split()
"""Common English words of at most two tokens in the bundled tokenizer (one in a real BPE)."""
# Zipf-like frequencies: the first (function) words are the most common, as in English text
WORD_WEIGHTS = [1 / (rank + 2) for rank in range(len(WORDS))]
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 224, 1024, 4.0
JPEG_QUALITY = 90
VIDEO_SIZES = ((320, 240), (480, 360), (640, 360), (640, 480), (854, 480), (360, 640))


def sample_rng(seed: int, kind: str, index: int) -> random.Random:
    """The generator of one sample: a function of the seed, the data set and the index only."""
    return random.Random(f"{seed}/{kind}/{index}")


def words(rng: random.Random, n: int) -> str:
    """n words in sentences of 5 to 18 words."""
    out, left = [], n
    while left > 0:
        k = min(left, rng.randint(5, 18))
        sentence = rng.choices(WORDS, WORD_WEIGHTS, k=k)
        out.append(sentence[0].capitalize() + " " + " ".join(sentence[1:]) + "." if k > 1
                   else sentence[0].capitalize() + ".")
        left -= k
    return " ".join(out)


def image_size(rng: random.Random) -> tuple[int, int]:
    """(width, height), each uniform in [224, 1024], redrawn until the aspect ratio is at most 4:1."""
    while True:
        w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        if max(w, h) / min(w, h) <= MAX_ASPECT:
            return w, h


def texture(rng: random.Random, width: int, height: int) -> torch.Tensor:
    """float [3, H, W] in [0, 1]: smooth random colour fields at three scales plus grain."""
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    # the fields are summed at a quarter of the size, then brought up in one smooth step
    small = (max(1, height // 4), max(1, width // 4))
    fields = torch.zeros(1, 3, *small)
    for cells, amplitude in ((3, 0.55), (12, 0.3), (48, 0.15)):
        grid = torch.rand(1, 3, cells, max(1, round(cells * width / height)), generator=g)
        fields += amplitude * F.interpolate(grid, size=small, mode="bilinear", align_corners=False)
    img = F.interpolate(fields, size=(height, width), mode="bicubic", align_corners=False)
    img += 0.04 * torch.randn(1, 3, height, width, generator=g)
    return img[0].clamp(0, 1)


def to_pil(img: torch.Tensor) -> Image.Image:
    data = (img * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (data.shape[1], data.shape[0]), data.numpy().tobytes())


def draw_shapes(rng: random.Random, image: Image.Image, n: int):
    """n filled ellipses, rectangles or polygons in random colours and places."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(n):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(8, max(9, w // 3)), y0 + rng.randint(8, max(9, h // 3))
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.randrange(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)


def write_image(rng: random.Random, path: Path):
    width, height = image_size(rng)
    image = to_pil(texture(rng, width, height))
    draw_shapes(rng, image, rng.randint(2, 12))
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


def make_caption(args: tuple) -> dict:
    seed, index, folder = args
    rng = sample_rng(seed, "captions", index)
    name = f"images/{index:06d}.jpg"
    write_image(rng, Path(folder) / name)
    return {"id": f"cap-{index:06d}", "image": name, "caption": words(rng, rng.randint(20, 120))}


def answer_words(rng: random.Random) -> int:
    """Words of an assistant answer: log-normal around 50, from 5 to 300."""
    return max(5, min(300, round(math.exp(rng.gauss(math.log(50), 0.8)))))


def make_chat(args: tuple) -> dict:
    seed, index, folder = args
    rng = sample_rng(seed, "chat", index)
    n_images, n_turns = rng.randint(1, 4), rng.randint(1, 4)
    images = []
    for k in range(n_images):
        name = f"images/{index:06d}_{k}.jpg"
        write_image(rng, Path(folder) / name)
        images.append({"type": "image", "image": name})
    # most conversations show every image up front; the rest bring one more in a later turn
    per_turn = [images] + [[] for _ in range(n_turns - 1)]
    if n_turns > 1 and n_images > 1 and rng.random() < 0.3:
        per_turn[0], per_turn[rng.randint(1, n_turns - 1)] = images[:-1], images[-1:]
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": words(rng, rng.randint(5, 20))})
    for turn in range(n_turns):
        question = words(rng, rng.randint(4, 30))[:-1] + "?"
        content = per_turn[turn] + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": words(rng, answer_words(rng))}]
    return {"id": f"chat-{index:06d}", "messages": messages}


def video_frames(rng: random.Random, width: int, height: int, n_frames: int) -> torch.Tensor:
    """uint8 [T, 3, H, W]: a textured scene panned across, with a shape moving over it."""
    pan = 64
    scene = texture(rng, width + pan, height + pan)
    dx, dy = rng.choice((-1, 1)), rng.choice((-1, 1))
    r = min(width, height) // 8
    colour = torch.tensor([rng.random() for _ in range(3)])[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frames = []
    for t in range(n_frames):
        s = t / max(1, n_frames - 1)
        ox, oy = int(pan * (s if dx > 0 else 1 - s)), int(pan * (s if dy > 0 else 1 - s))
        frame = scene[:, oy:oy + height, ox:ox + width].clone()
        cx, cy = r + (width - 2 * r) * s, height / 2 + (height / 3) * math.sin(2 * math.pi * s)
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        frame = torch.where(inside, colour, frame)
        frames.append((frame * 255).round().to(torch.uint8))
    return torch.stack(frames)


def encode_video(frames: torch.Tensor, fps: int, path: Path):
    """H.264 mp4 through torchcodec's encoder, else the ffmpeg command (frames piped raw)."""
    try:
        from torchcodec.encoders import VideoEncoder
        VideoEncoder(frames, frame_rate=fps).to_file(str(path), codec="libx264", pixel_format="yuv420p",
                                                     crf=28, preset="veryfast")
        return
    except (ImportError, RuntimeError):
        pass
    _, _, h, w = frames.shape
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-crf", "28", "-preset", "veryfast", str(path)], input=frames.permute(0, 2, 3, 1).contiguous().numpy().tobytes(),
                   check=True)


def make_video_chat(args: tuple) -> dict:
    seed, index, folder = args
    rng = sample_rng(seed, "video", index)
    width, height = rng.choice(VIDEO_SIZES)
    fps, seconds = rng.choice((24, 25, 30)), rng.uniform(2.0, 5.0)
    name = f"videos/{index:06d}.mp4"
    encode_video(video_frames(rng, width, height, round(fps * seconds)), fps, Path(folder) / name)
    messages = []
    for turn in range(rng.randint(1, 2)):
        content = ([{"type": "video", "video": name}] if turn == 0 else []) + [
            {"type": "text", "text": words(rng, rng.randint(4, 20))[:-1] + "?"}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": words(rng, answer_words(rng))}]
    return {"id": f"video-{index:06d}", "messages": messages}


def write_video_tokenizer(folder: Path):
    """The bundled tokenizer plus a <|video_pad|> token (the Qwen families' video placeholder)."""
    from tokenizers import Tokenizer as HFTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer.from_file(str(ROOT / "assets/tokenizer/tokenizer.json"))
    tok.add_special_tokens(["<|video_pad|>"])
    tok.save(str(folder / "tokenizer.json"))
    shutil.copy(ROOT / "assets/tokenizer/tokenizer_config.json", folder)


def init_worker():
    torch.set_num_threads(1)


def write_dataset(make, kind: str, folder: Path, media: str, count: int, seed: int, jobs: int):
    """``count`` rows of ``make`` (run in ``jobs`` processes) as folder/kind.jsonl."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / media).mkdir(parents=True)
    tasks = [(seed, i, str(folder)) for i in range(count)]
    with ProcessPoolExecutor(jobs, initializer=init_worker) as pool:
        rows = list(pool.map(make, tasks, chunksize=8))
    with open(folder / f"{kind}.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows


def summary(folder: Path, rows: list[dict], media: str) -> str:
    files = sorted((folder / media).iterdir())
    size = sum(p.stat().st_size for p in files)
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(ROOT / "assets/tokenizer/tokenizer.json"))
    texts = [r["caption"] if "caption" in r else " ".join(
        m["content"] if isinstance(m["content"], str) else " ".join(p.get("text", "") for p in m["content"])
        for m in r["messages"]) for r in rows]
    n_words = sum(len(t.split()) for t in texts)
    n_tokens = sum(len(tok.encode(t).ids) for t in texts)
    return (f"{folder}: {len(rows)} samples, {len(files)} {media} files, {size / 1e6:.1f} MB "
            f"({size / max(1, len(files)) / 1e3:.0f} kB each); {n_words / len(rows):.0f} words per sample, "
            f"{n_tokens / max(1, n_words):.2f} bundled-tokenizer tokens per word")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", type=int, default=2000)
    p.add_argument("--chats", type=int, default=1000)
    p.add_argument("--videos", type=int, default=100)
    p.add_argument("--kinds", default="captions,chat,video")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count())
    args = p.parse_args()
    kinds = set(args.kinds.split(","))
    unknown = kinds - {"captions", "chat", "video"}
    if unknown:
        sys.exit(f"--kinds: unknown {sorted(unknown)}; choose from captions, chat, video")
    if "captions" in kinds:
        rows = write_dataset(make_caption, "captions", args.out / "captions", "images", args.captions,
                             args.seed, args.jobs)
        print(summary(args.out / "captions", rows, "images"), flush=True)
    if "chat" in kinds:
        rows = write_dataset(make_chat, "chat", args.out / "chat", "images", args.chats, args.seed, args.jobs)
        print(summary(args.out / "chat", rows, "images"), flush=True)
    if "video" in kinds:
        rows = write_dataset(make_video_chat, "chat", args.out / "video", "videos", args.videos, args.seed,
                             args.jobs)
        write_video_tokenizer(args.out / "video" / "tokenizer")
        print(summary(args.out / "video", rows, "videos"), flush=True)


if __name__ == "__main__":
    main()
