"""Ablation matrix on one GPU: compile on/off x activation checkpointing x attention backend, each
variant a few training steps of the benchmark shape (scripts/bench.py), written as a Markdown
table, a CSV and a PNG bar chart of tokens/s.

    python scripts/ablate.py --out docs/ablation [--family qwen3_vl --flavor 2B] \
        [--compile off on] [--ac none op full] [--backend flex varlen sdpa] [--steps 5]

Parallel layouts are ablated with scripts/compare_losses.py-style torchrun launches of train.py
(the metrics line reports tokens/s and MFU per GPU); this script covers what one GPU can vary.
"""

import argparse
import csv
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import AC_MODES, BACKENDS, markdown_table, run_variant  # noqa: E402

COLUMNS = ["family", "flavor", "backend", "compiled", "ac", "step_s", "tokens_per_s", "mfu_vs_989",
           "peak_mem_gib", "loss", "error"]


def read_csv(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r.get("error"):
                rows.append(dict(name=f"{r['backend']} compiled={r['compiled']} ac={r['ac']}", error=r["error"]))
                continue
            r = {k: v for k, v in r.items() if k != "error"}
            for k in ("step_s", "tokens_per_s", "mfu_vs_989", "peak_mem_gib", "loss"):
                r[k] = float(r[k])
            r["compiled"] = r["compiled"] == "True"
            r["name"] = f"titan_mm {r['family']}/{r['flavor']} {r['backend']} " \
                        f"{'compiled' if r['compiled'] else 'eager'} ac={r['ac']}"
            r["params_b"] = "-"
            rows.append(r)
    return rows


def write_png(rows: list[dict], path: str):
    """Horizontal bars of tokens/s per variant, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    label_w, bar_w, row_h, pad = 330, 520, 26, 10
    img = Image.new("RGB", (label_w + bar_w + 140, pad * 2 + row_h * (len(ok) + 1)), "white")
    draw = ImageDraw.Draw(img)
    best = max(r["tokens_per_s"] for r in ok)
    draw.text((pad, pad), "tokens/s (bar) and MFU per variant", fill="black")
    for i, r in enumerate(ok, start=1):
        y = pad + i * row_h
        label = f"{r['backend']} {'compiled' if r['compiled'] else 'eager'} ac={r['ac']}"
        draw.text((pad, y + 6), label, fill="black")
        width = int(bar_w * r["tokens_per_s"] / best)
        draw.rectangle([label_w, y + 3, label_w + width, y + row_h - 3], fill=(70, 120, 200))
        draw.text((label_w + width + 6, y + 6), f"{r['tokens_per_s']:,.0f}  {100 * r['mfu_vs_989']:.1f}%",
                  fill="black")
    img.save(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="prefix of the .md / .csv / .png files")
    parser.add_argument("--family", default="qwen3_vl")
    parser.add_argument("--flavor", default="2B")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--ac", nargs="+", default=["none", "op", "full"], choices=AC_MODES)
    parser.add_argument("--backend", nargs="+", default=["flex", "varlen", "sdpa"],
                        choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--from-csv", nargs="+", default=None,
                        help="run nothing: rebuild the table and plot from these CSVs (e.g. parts of a "
                             "matrix run in separate jobs)")
    opts = parser.parse_args()
    if opts.from_csv:
        rows = [row for path in opts.from_csv for row in read_csv(path)]
    else:
        rows = []
        for backend, compiled, ac in itertools.product(opts.backend, opts.compile, opts.ac):
            rows.append(run_variant(family=opts.family, flavor=opts.flavor, compile_blocks=compiled == "on",
                                    steps=opts.steps, warmup=opts.warmup, backend=backend, ac=ac))
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out + ".md", "w") as f:
        f.write(markdown_table(rows) + "\n")
    with open(opts.out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_png(rows, opts.out + ".png")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
