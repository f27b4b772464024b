"""How the next token is picked from the logits, and when a row stops."""

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it and a token is drawn."""
    top_k: int = 0
    """Draw among the k most likely tokens only (0 = all)."""
    top_p: float = 1.0
    """Draw among the most likely tokens whose probabilities sum to at least top_p (nucleus)."""
    stop_token_ids: tuple[int, ...] | None = None
    """A row stops at any of these (not included in its output); None = the tokenizer's eos and,
    for chat prompts, the chat format's turn end."""
    stop_strings: tuple[str, ...] = ()
    """A row also stops once its decoded text contains one of these; the token that completes it
    is the row's last (``completion_text`` cuts the text at the stop string)."""
    seed: int | None = None
    """Seed of the draws (None: torch's global generator)."""

    def check(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens}; must be at least 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature = {self.temperature} (>= 0), top_k = {self.top_k} (>= 0), "
                             f"top_p = {self.top_p} (in (0, 1]) out of range")


def next_tokens(logits_BV: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B] token ids from the last position's logits [B, V]."""
    if s.temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / s.temperature
    if s.top_k:
        kth_B1 = logits_BV.topk(min(s.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, -torch.inf)
    if s.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # drop a token when the ones before it already reach top_p (the first is always kept)
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= s.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, -torch.inf))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)[:, 0]


def completion_text(tokenizer, ids: list[int], stop_strings: tuple[str, ...] = ()) -> str:
    """The text of generated ``ids``, cut before the first stop string."""
    text = tokenizer.decode(ids)
    cuts = [text.find(stop) for stop in stop_strings if stop in text]
    return text[:min(cuts)] if cuts else text
