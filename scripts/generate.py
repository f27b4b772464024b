"""Ask a trained model: one prompt with images, or an interactive chat (titan_mm/generate,
docs/generation.md).

    python scripts/generate.py --job.config_file train_configs/debug_vlm.toml \\
        [--checkpoint DIR | --hf_path DIR] [--image a.jpg ...] [--video clip.mp4] --prompt "..." \\
        [--mode auto|chat|raw] [--max_new_tokens 64] [--temperature 0] [--top_k 0] [--top_p 1] \\
        [--stop STRING ...] [--seed 0] [--device cpu|cuda] [--dtype fp32|bf16] [--cuda_graph]
    python scripts/generate.py --job.config_file ... --interactive      # chat; /image PATH, /reset, /quit

``--checkpoint``: a DCP folder (a run's model-step-N or step-N); default the run's newest
model-step-N. ``--hf_path``: an HF folder instead. ``--mode chat`` writes the prompt as a user turn
in data.chat_format and generates the assistant's answer; ``raw`` continues ``<bos>``, the images
and the prompt text (how caption / interleaved runs were trained); ``auto``: chat when
data.dataset is chat. With ``--objective.name mdlm`` (a masked diffusion run) the answer is sampled
by iterative unmasking: ``--gen_length``, ``--steps``, ``--block_length``, ``--remasking``. Any
other ``--section.key value`` is read as in train.py.
"""

import argparse
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import torch  # noqa: E402

from titan_mm.config import ConfigError, parse_args  # noqa: E402
from titan_mm.data.documents import SampleError  # noqa: E402
from titan_mm.generate import (Sampling, chat_prompt, completion_text, generate_stream,  # noqa: E402
                               load_model_for_inference, text_prompt)
from titan_mm.generate.mdlm import MDLMSampling, generate_mdlm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="DCP weights folder (default: the run's newest model-step-N)")
    p.add_argument("--hf_path", help="HF folder (safetensors + config.json) instead of DCP weights")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="a video file (repeatable; Qwen families)")
    p.add_argument("--prompt", default="")
    p.add_argument("--interactive", action="store_true")
    p.add_argument("--mode", choices=["auto", "chat", "raw"], default="auto")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--cuda_graph", action="store_true", help="replay the decode step as a CUDA graph")
    mdlm = p.add_argument_group("masked diffusion (--objective.name mdlm)")
    mdlm.add_argument("--gen_length", type=int, default=32)
    mdlm.add_argument("--steps", type=int, default=32)
    mdlm.add_argument("--block_length", type=int, default=32)
    mdlm.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    return p.parse_known_args(argv)


def user_content(text: str, images: list[str], videos: list[str]) -> list[dict]:
    return ([{"type": "image", "image": path} for path in images] + [{"type": "video", "video": path} for path in videos]
            + ([{"type": "text", "text": text}] if text else []))


class Session:
    """One model and how to ask it: chat turns or raw continuation, causal or MDLM sampling."""

    def __init__(self, im, opts, chat: bool):
        self.im, self.opts, self.chat = im, opts, chat
        self.sampling = Sampling(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                 top_k=opts.top_k, top_p=opts.top_p, stop_strings=tuple(opts.stop), seed=opts.seed)
        self.mdlm = MDLMSampling(gen_length=opts.gen_length, steps=opts.steps, block_length=opts.block_length,
                                 remasking=opts.remasking, temperature=opts.temperature, seed=opts.seed or 0)

    def prompt(self, messages: list[dict]):
        if self.chat:
            return chat_prompt(self.im, messages)
        # raw: the user parts of every turn, continued
        return text_prompt(self.im, [part for m in messages for part in m["content"]])

    def answer(self, messages: list[dict], out=sys.stdout) -> str:
        """Writes the answer to ``out`` as it is generated; returns its text."""
        prompt = self.prompt(messages)
        if not self.im.objective.causal:
            text = self.im.tokenizer.decode(generate_mdlm(self.im, prompt, self.mdlm))
            out.write(text)
        else:
            ids, text = [], ""
            for step in generate_stream(self.im, [prompt], self.sampling, cuda_graph=self.opts.cuda_graph):
                if step[0] is not None:
                    ids.append(step[0])
                new = completion_text(self.im.tokenizer, ids, self.sampling.stop_strings)
                out.write(new[len(text):])
                out.flush()
                text = new
        out.write("\n")
        return text


def interactive(session: Session, images: list[str], videos: list[str]):
    print("chat: type a message; /image PATH or /video PATH attaches media to the next one, /reset "
          "forgets the conversation, /quit ends")
    messages, pending_images, pending_videos = [], list(images), list(videos)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages, pending_images, pending_videos = [], [], []
            continue
        if line.startswith("/image ") or line.startswith("/video "):
            (pending_images if line.startswith("/image") else pending_videos).append(line.split(" ", 1)[1].strip())
            continue
        if not line:
            continue
        turn = {"role": "user", "content": user_content(line, pending_images, pending_videos)}
        try:
            reply = session.answer(messages + [turn])
        except (SampleError, ValueError) as e:  # a bad image path, no chat format: say so, go on
            print(f"error: {e}")
            continue
        pending_images, pending_videos = [], []
        messages += [turn, {"role": "assistant", "content": reply}]


def main(argv: list[str]) -> int:
    opts, rest = parse_options(argv)
    try:
        cfg, _ = parse_args(rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[opts.dtype or ("bf16" if opts.device.startswith("cuda") else "fp32")]
    im = load_model_for_inference(cfg, checkpoint=opts.checkpoint, hf_path=opts.hf_path, device=opts.device,
                                  dtype=dtype)
    chat = opts.mode == "chat" or (opts.mode == "auto" and cfg.data.dataset == "chat")
    session = Session(im, opts, chat)
    print(f"weights: {im.source} ({'chat, ' + cfg.data.chat_format if chat else 'raw'} prompts)", file=sys.stderr)
    if opts.interactive:
        interactive(session, opts.image, opts.video)
        return 0
    try:
        session.answer([{"role": "user", "content": user_content(opts.prompt, opts.image, opts.video)}])
    except (SampleError, ConfigError) as e:  # a missing image, a chat format the tokenizer cannot write
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
