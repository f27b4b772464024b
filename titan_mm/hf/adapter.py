"""The interface a model family implements to read and write HF checkpoints."""

import re

import torch


class HFAdapter:
    """Maps state-dict keys between titan_mm and HF by renames only, so the mapping also applies
    to sharded (DTensor) state dicts and HF weights load rank by rank.

    Subclasses set ``key_map``: a list of (titan_mm regex, HF template) pairs written with named
    groups, e.g. (r"decoder\\.layers\\.(?P<i>\\d+)\\.attention\\.wq\\.(?P<p>weight|bias)",
    "model.language_model.layers.{i}.self_attn.q_proj.{p}"); and implement the two config methods.
    """

    key_map: list[tuple[str, str]] = []
    hf_prefix_aliases: list[tuple[str, str]] = []
    """(prefix of names key_map writes, prefix other writers give the same tensors), tried in order
    for names a checkpoint lacks: e.g. transformers 5 saves a SigLIP2 tower without 'vision_model.'."""

    def hf_config(self, args) -> dict:
        """config.json content for a model of these args (transformers can load it)."""
        raise NotImplementedError

    def args_from_hf_config(self, config: dict):
        """The family's args dataclass for an HF config.json."""
        raise NotImplementedError

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename(k, self._to_hf): v for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename(k, self._from_hf): v for k, v in hf_state_dict.items()
                if not self.ignored_hf_key(k)}

    def stored_name(self, hf_key: str, available: set[str]) -> str:
        """``hf_key`` as a checkpoint holding the names ``available`` spells it (unchanged when no
        alias is found there either, so the loader reports it missing)."""
        if hf_key in available:
            return hf_key
        for ours, theirs in self.hf_prefix_aliases:
            if hf_key.startswith(ours) and theirs + hf_key[len(ours):] in available:
                return theirs + hf_key[len(ours):]
        return hf_key

    def ignored_hf_key(self, key: str) -> bool:
        """HF keys with no titan_mm counterpart (e.g. a tied lm_head.weight)."""
        return False

    @property
    def _to_hf(self):
        return [(re.compile(ours + "$"), theirs) for ours, theirs in self.key_map]

    @property
    def _from_hf(self):
        return [(re.compile(_template_to_regex(theirs) + "$"), _regex_to_template(ours))
                for ours, theirs in self.key_map]

    @staticmethod
    def _rename(key: str, rules) -> str:
        for pattern, template in rules:
            m = pattern.match(key)
            if m:
                return template.format(**m.groupdict())
        raise KeyError(f"no HF mapping for parameter {key!r}")


def _template_to_regex(template: str) -> str:
    """'a.{i}.b' -> r'a\\.(?P<i>[^.]+)\\.b'"""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^.]+)")
    return "".join(out)


def _regex_to_template(pattern: str) -> str:
    """r'a\\.(?P<i>\\d+)\\.b' -> 'a.{i}.b'"""
    template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    return template.replace("\\.", ".")
