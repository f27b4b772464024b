"""Throughput of the data pipeline alone: build_dataloader over a data file (decode, resize,
patchify, tokenize, pack, collate), no model. For each worker count, N batches are timed after a
warm-up (which also starts the workers). Prints a Markdown table of samples/s and tokens/s (tokens
of documents, padding not counted).

    python scripts/bench_loader.py --data assets/sample_data/captions_train.jsonl --kind captions
    python scripts/bench_loader.py --generate-images 448     # ~200 captions of 448 x 448 JPEGs
    python scripts/bench_loader.py --generate-videos 40      # chat samples with 2 s ffmpeg clips

The generated data sets are written to a temporary folder and removed afterwards. Images and videos
are processed as the Qwen2.5-VL flavors do (14 px patches merged 2 x 2, temporal patches of 2).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from titan_mm.config import Data  # noqa: E402
from titan_mm.data.dataloader import build_dataloader  # noqa: E402
from titan_mm.data.tokenizer import Tokenizer  # noqa: E402
from titan_mm.models import get_model_spec  # noqa: E402

ROOT = __file__.rsplit("/scripts/", 1)[0]
BUNDLED = f"{ROOT}/assets/sample_data"


def generate_images(folder: str, side: int, n: int) -> str:
    """Captions of the bundled images upscaled to side x side JPEGs (a realistic decode cost)."""
    os.makedirs(f"{folder}/images")
    with open(f"{BUNDLED}/captions_train.jsonl") as f:
        samples = [json.loads(line) for line, _ in zip(f, range(n))]
    with open(f"{folder}/captions.jsonl", "w") as out:
        for s in samples:
            name = f"images/{s['id']}.jpg"
            Image.open(f"{BUNDLED}/{s['image']}").convert("RGB").resize((side, side), Image.BICUBIC) \
                .save(f"{folder}/{name}", quality=90)
            out.write(json.dumps({"id": s["id"], "image": name, "caption": s["caption"]}) + "\n")
    return f"{folder}/captions.jsonl"


def generate_videos(folder: str, n: int, seconds: float = 2.0) -> str:
    """Chat samples, each asking about its own ffmpeg test clip (320 x 240, 25 fps, H.264)."""
    with open(f"{folder}/chat.jsonl", "w") as out:
        for i in range(n):
            name = f"clip{i:03d}.mp4"
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc=size=320x240:rate=25,hue=h={i * 37 % 360}", "-t", str(seconds),
                            "-pix_fmt", "yuv420p", f"{folder}/{name}"], check=True)
            messages = [{"role": "user", "content": [{"type": "video", "video": name},
                                                     {"type": "text", "text": "What is in this video?"}]},
                        {"role": "assistant", "content": "A test pattern of coloured bars and a counter."}]
            out.write(json.dumps({"id": f"v{i}", "messages": messages}) + "\n")
    return f"{folder}/chat.jsonl"


def video_tokenizer(folder: str) -> Tokenizer:
    """The bundled debug tokenizer plus a <|video_pad|> token."""
    tok = HFTokenizer.from_file(f"{ROOT}/assets/tokenizer/tokenizer.json")
    tok.add_special_tokens(["<|video_pad|>"])
    tok.save(f"{folder}/tokenizer.json")
    shutil.copy(f"{ROOT}/assets/tokenizer/tokenizer_config.json", folder)
    return Tokenizer(folder, special_tokens={"video_token": "<|video_pad|>"})


def measure(cfg: Data, tok: Tokenizer, spec, args) -> tuple[float, float, float]:
    """(samples/s, tokens/s, seconds) over args.batches batches after args.warmup batches."""
    loader = build_dataloader(cfg, tok, spec, seq_len=args.seq_len, batch_size=args.batch_size,
                              dp_rank=0, dp_world=1, seed=0)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    samples = tokens = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        doc_ids = next(it)["document_ids"]
        tokens += int((doc_ids >= 0).sum())
        samples += sum(len(row[row >= 0].unique()) for row in doc_ids)
    seconds = time.perf_counter() - start
    del it, loader  # stops the workers before the next worker count
    return samples / seconds, tokens / seconds, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=f"{BUNDLED}/captions_train.jsonl")
    p.add_argument("--kind", default="captions", choices=["captions", "interleaved", "chat", "text"])
    p.add_argument("--generate-images", type=int, metavar="SIDE", help="captions of SIDE x SIDE JPEGs")
    p.add_argument("--generate-videos", type=int, metavar="N", help="N chat samples with ffmpeg clips")
    p.add_argument("--samples", type=int, default=200, help="--generate-images: how many")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--patches-per-slot", type=int, default=1024)
    p.add_argument("--image-slots-per-row", type=int, default=16)
    p.add_argument("--video-fps", type=float, default=2.0)
    p.add_argument("--video-max-frames", type=int, default=16)
    p.add_argument("--model", default="qwen2_5_vl")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the main process (workers=0 runs there); loader workers use 1")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    spec = get_model_spec(args.model).flavors["debug"].vision_input
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        path, kind = args.data, args.kind
        if args.generate_images:
            path, kind = generate_images(tmp, args.generate_images, args.samples), "captions"
        elif args.generate_videos:
            path, kind = generate_videos(tmp, args.generate_videos), "chat"
        os.makedirs(f"{tmp}/tokenizer")
        tok = video_tokenizer(f"{tmp}/tokenizer")
        print(f"data: {kind} {path if not (args.generate_images or args.generate_videos) else '(generated)'}; "
              f"batch {args.batch_size} x {args.seq_len} tokens, {args.warmup} warm-up + {args.batches} "
              f"timed batches; torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} main thread(s)\n")
        print("| workers | samples/s | tokens/s | seconds |")
        print("|---:|---:|---:|---:|")
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = Data(dataset=kind, path=path, num_workers=workers, max_pixels=args.max_pixels,
                       patches_per_slot=args.patches_per_slot, image_slots_per_row=args.image_slots_per_row,
                       video_fps=args.video_fps, video_max_frames=args.video_max_frames)
            samples, tokens, seconds = measure(cfg, tok, spec, args)
            print(f"| {workers} | {samples:.1f} | {tokens:.0f} | {seconds:.2f} |", flush=True)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
