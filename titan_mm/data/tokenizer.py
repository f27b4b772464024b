"""Tokenizer loaded from a folder with tokenizer.json and tokenizer_config.json (HF layout)."""

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Text <-> ids, plus the ids of the special tokens the data pipeline inserts.

    Special tokens are named by keys of tokenizer_config.json (pad_token, eos_token, bos_token,
    image_start_token, image_token, image_end_token); ``special_tokens`` fills or overrides them, so a
    model family can name its own (e.g. Qwen's <|vision_start|>) for an HF checkpoint's tokenizer.
    """

    def __init__(self, folder: str, special_tokens: dict[str, str] | None = None):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder} (set model.tokenizer_path)")
        self._tok = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        special = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special.update(special_tokens or {})
        self.pad_id = self._token_id(special, "pad_token")
        self.eos_id = self._token_id(special, "eos_token")
        self.bos_id = self._token_id(special, "bos_token")
        self.image_start_id = self._token_id(special, "image_start_token")
        self.image_id = self._token_id(special, "image_token")
        self.image_end_id = self._token_id(special, "image_end_token")

    def _token_id(self, special: dict, key: str) -> int:
        if special.get(key) is None:
            raise ValueError(f"the tokenizer defines no {key} (tokenizer_config.json or the model family)")
        token = special[key]
        token = token["content"] if isinstance(token, dict) else token
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{key} {token!r} of tokenizer_config.json is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
