"""Loss curves of several runs in one PNG (drawn with Pillow), and a table of their final losses.

    python scripts/plot_losses.py --out docs/optimizers_debug_vlm.png \
        "AdamW lr 1e-3=outputs/adamw/losses.json" "Muon lr 2e-3=outputs/muon/losses.json" [--smooth 20]

Each argument is LABEL=PATH of a run's losses.json (step -> loss, as train.py writes it). Curves are
moving averages over --smooth steps; the table gives each run's mean loss over its last --tail
steps. The y axis runs from the lowest smoothed loss to --ymax.
"""

import argparse
import json

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def read_losses(path: str) -> list[float]:
    with open(path) as f:
        losses = {int(k): v for k, v in json.load(f).items()}
    return [losses[s] for s in sorted(losses)]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw(curves: dict[str, list[float]], path: str, ymax: float, title: str):
    from PIL import Image, ImageDraw
    width, height, left, right, top, bottom = 900, 520, 70, 250, 40, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    steps = max(len(c) for c in curves.values())
    ymin = min(min(c) for c in curves.values())
    ymin = max(0.0, ymin - 0.05 * (ymax - ymin))
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: int, loss: float) -> tuple[float, float]:
        loss = min(max(loss, ymin), ymax)
        return left + plot_w * step / max(1, steps - 1), top + plot_h * (1 - (loss - ymin) / (ymax - ymin))

    d.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for i in range(6):
        loss = ymin + (ymax - ymin) * i / 5
        y = xy(0, loss)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.line([left, y, left + plot_w, y], fill=(230, 230, 230))
        d.text((left - 50, y - 6), f"{loss:.2f}", fill="black")
    for i in range(6):
        step = round((steps - 1) * i / 5)
        x = xy(step, ymin)[0]
        d.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        d.text((x - 10, top + plot_h + 8), str(step + 1), fill="black")
    d.text((left + plot_w // 2 - 20, height - 22), "step", fill="black")
    d.text((left, 12), title, fill="black")
    for k, (label, curve) in enumerate(curves.items()):
        color = COLORS[k % len(COLORS)]
        d.line([xy(s, v) for s, v in enumerate(curve)], fill=color, width=2)
        y = top + 10 + 20 * k
        d.line([left + plot_w + 15, y + 6, left + plot_w + 40, y + 6], fill=color, width=3)
        d.text((left + plot_w + 46, y), label, fill="black")
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=PATH of losses.json")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window (steps)")
    p.add_argument("--tail", type=int, default=50, help="final loss = mean over this many last steps")
    p.add_argument("--ymax", type=float, default=2.0)
    p.add_argument("--title", default="training loss (moving average)")
    opts = p.parse_args()
    raw = {}
    for run in opts.runs:
        label, _, path = run.rpartition("=")
        raw[label] = read_losses(path)
    curves = {label: moving_average(v, opts.smooth) for label, v in raw.items()}
    draw(curves, opts.out, opts.ymax, f"{opts.title}, {opts.smooth}-step moving average")
    print(f"| run | steps | mean loss, last {opts.tail} steps | min {opts.smooth}-step average |")
    print("|---|---:|---:|---:|")
    for label, values in raw.items():
        tail = values[-opts.tail:]
        print(f"| {label} | {len(values)} | {sum(tail) / len(tail):.4f} | {min(curves[label]):.4f} |")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
