"""Train the bundled byte-level BPE tokenizer (assets/tokenizer/).

The tokenizer is trained with HF `tokenizers` on every caption and
interleaved-document text in the sample data plus a few built-in English
paragraphs, so that common words get their own tokens. It uses a ByteLevel
pre-tokenizer and decoder (any UTF-8 text round-trips), reserves ids 0..5 for
the special tokens below, and has no post-processor: the trainer adds
<|bos|>/<|eos|> itself.

Outputs (in --out): tokenizer.json and tokenizer_config.json.

Usage: python scripts/train_tokenizer.py [--data assets/sample_data]
                                         [--out assets/tokenizer] [--vocab-size 512]
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "eos_token": "<|eos|>",
    "bos_token": "<|bos|>",
    "image_start_token": "<|image_start|>",
    "image_token": "<|image_pad|>",
    "image_end_token": "<|image_end|>",
}

ENGLISH_PARAGRAPHS = (
    "The quick brown fox jumps over the lazy dog. It was a bright and sunny day, "
    "and the children were playing in the park near the river.",
    "What is in this image? Please describe the picture in one sentence. "
    "There is a small house with a red roof, a tall tree and a white cloud in the sky.",
    "A model learns to read text and look at images at the same time. "
    "It can answer questions about what it sees, count objects and name their colours.",
    "Yesterday we went to the market to buy some fruit: apples, bananas, oranges and "
    "grapes. My friend said that the weather would be better tomorrow.",
    "Once upon a time there was a little girl who lived in a village by the sea. "
    "Every morning she would walk along the beach and collect shells.",
    "The number of people who have been working on this project is larger than we "
    "thought, but they all want to make it faster, simpler and more useful for everyone.",
)

ROUND_TRIP_CHECKS = (
    "a red circle at the top left.",
    "  Leading spaces, tabs\tand\nnew lines  ",
    "Unicode: naïve café, Grüße, 日本語, emoji 🙂👍🏽",
    "<|bos|>text <|image_start|><|image_pad|><|image_pad|><|image_end|> more<|eos|>",
)


def read_texts(data_dir):
    """Return all caption and interleaved texts found in data_dir, in file order."""
    texts = []
    for path in sorted(data_dir.glob("captions_*.jsonl")):
        texts += [row["caption"] for row in read_jsonl(path)]
    for doc in read_jsonl(data_dir / "interleaved.jsonl"):
        texts += [item["text"] for item in doc["content"] if item["type"] == "text"]
    return texts


def read_jsonl(path):
    """Yield one parsed JSON object per non-empty line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def train(texts, vocab_size):
    """Train a byte-level BPE tokenizer with the special tokens at ids 0..5."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def check(tokenizer):
    """Assert special-token ids and lossless encode/decode round-trips."""
    for expected_id, token in enumerate(SPECIAL_TOKENS.values()):
        assert tokenizer.token_to_id(token) == expected_id, token
        assert tokenizer.encode(token).ids == [expected_id], token
    for text in ROUND_TRIP_CHECKS:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text, text


def average_length(tokenizer, texts):
    """Average number of tokens per text."""
    return sum(len(enc.ids) for enc in tokenizer.encode_batch(texts)) / len(texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("assets/sample_data"))
    parser.add_argument("--out", type=Path, default=Path("assets/tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()

    tokenizer = train(read_texts(args.data) + list(ENGLISH_PARAGRAPHS), args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=True)
    config = json.dumps(SPECIAL_TOKENS, indent=2, sort_keys=True) + "\n"
    (args.out / "tokenizer_config.json").write_text(config, encoding="utf-8")

    tokenizer = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    check(tokenizer)
    captions = [row["caption"] for row in read_jsonl(args.data / "captions_train.jsonl")]
    print(f"wrote {args.out}: vocab size {tokenizer.get_vocab_size()}, "
          f"average train caption length {average_length(tokenizer, captions):.2f} tokens")


if __name__ == "__main__":
    main()
