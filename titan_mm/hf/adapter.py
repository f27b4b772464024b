"""The interface a model family implements to read and write HF checkpoints."""

import re

import torch

TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
"""Placeholder token ids the Qwen-VL families' args record for config.json; the models themselves
read image_token_index."""


class HFAdapter:
    """Maps state-dict keys between titan_mm and HF by renames, so the mapping also applies to
    sharded (DTensor) state dicts and HF weights load rank by rank; and, for the few HF tensors that
    fuse several of ours (a ViT's qkv projection), concatenates and splits along dim 0.

    Subclasses set ``key_map``: a list of (titan_mm regex, HF template) pairs written with named
    groups, e.g. (r"decoder\\.layers\\.(?P<i>\\d+)\\.attention\\.wq\\.(?P<p>weight|bias)",
    "model.language_model.layers.{i}.self_attn.q_proj.{p}"); optionally ``fused_key_map``; and
    implement the two config methods.
    """

    key_map: list[tuple[str, str]] = []
    fused_key_map: list[tuple[str, str, tuple[str, ...]]] = []
    """HF tensors that are several of ours of equal shape concatenated along dim 0: (titan_mm regex
    with a named group ``part``, HF template, the values of ``part`` in HF's order), e.g.
    (r"vision\\.layers\\.(?P<i>\\d+)\\.attn\\.(?P<part>q|k|v)_proj\\.(?P<p>weight|bias)",
    "visual.blocks.{i}.attn.qkv.{p}", ("q", "k", "v")). Tensor parallelism splits q, k and v by
    heads, which a fused tensor's contiguous shards would not do."""
    hf_prefix_aliases: list[tuple[str, str]] = []
    """(prefix of names key_map writes, prefix other writers give the same tensors), tried in order
    for names a checkpoint lacks: e.g. transformers 5 saves a SigLIP2 tower without 'vision_model.'."""

    hf_module_prefixes: list[tuple[str, str]] = []
    """(prefix of names key_map writes, the prefix transformers 5 gives the same modules in memory),
    where they differ: PEFT adapters name modules as a loaded model does."""

    def hf_config(self, args) -> dict:
        """config.json content for a model of these args (transformers can load it)."""
        raise NotImplementedError

    def args_from_hf_config(self, config: dict):
        """The family's args dataclass for an HF config.json."""
        raise NotImplementedError

    def hf_processor_files(self, args, min_pixels: int, max_pixels: int) -> dict[str, dict]:
        """{file name: JSON content} of the processor files transformers' AutoProcessor reads for
        this family (preprocessor_config.json, ...), for images resized into [min_pixels,
        max_pixels]; none for a text model."""
        return {}

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF names and tensors; fused ones are concatenated, so pass full (not sharded) tensors
        when the model has any (``rename_to_hf`` leaves them out)."""
        out = self.rename_to_hf(state_dict)
        for hf_key, parts in self.fused_parts(state_dict).items():
            out[hf_key] = torch.cat([state_dict[k] for k in parts])
        return out

    def rename_to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """to_hf of the keys that map one to one (works on sharded state dicts)."""
        return {self._rename(k, self._to_hf): v for k, v in state_dict.items() if not self._fused_rule(k)}

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in hf_state_dict.items():
            if self.ignored_hf_key(k):
                continue
            fused = self._split_rule(k)
            if fused is None:
                out[self._rename(k, self._from_hf)] = v
                continue
            template, names = fused
            for name, part in zip(names, v.chunk(len(names))):
                out[template.format(part=name)] = part
        return out

    def fused_parts(self, state_dict: dict) -> dict[str, list[str]]:
        """{HF key: our keys in HF's order} of the fused tensors among ``state_dict``'s keys."""
        out: dict[str, list[str]] = {}
        for k in state_dict:
            rule = self._fused_rule(k)
            if rule is not None:
                (pattern, template, names), m = rule
                groups = {g: v for g, v in m.groupdict().items() if g != "part"}
                out.setdefault(template.format(**groups), [None] * len(names))[names.index(m["part"])] = k
        return out

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

    def _fused_rule(self, key: str):
        for rule in self.fused_key_map:
            m = re.match(rule[0] + "$", key)
            if m:
                return rule, m
        return None

    def _split_rule(self, hf_key: str):
        """(our template with a {part} field, part names) for a fused HF key, else None."""
        for ours, theirs, names in self.fused_key_map:
            m = re.match(_template_to_regex(theirs) + "$", hf_key)
            if m:
                return _regex_to_template(ours).replace("{part}", "{{part}}").format(**m.groupdict()), names
        return None

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
