"""Tokenizer loaded from a folder with tokenizer.json and tokenizer_config.json (HF layout)."""

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from titan_mm.config import ConfigError


# tried in order when neither tokenizer_config.json nor the model family names the token
CONVENTIONAL_NAMES = {
    "image_start_token": ("<|vision_start|>", "<|image_start|>"),
    "image_token": ("<|image_pad|>",),
    "image_end_token": ("<|vision_end|>", "<|image_end|>"),
    "video_token": ("<|video_pad|>",),
    "pad_token": ("<|endoftext|>", "<|pad|>"),
}


class Tokenizer:
    """Text <-> ids, plus the ids of the special tokens the data pipeline inserts.

    Special tokens are named by keys of tokenizer_config.json (pad_token, eos_token, bos_token,
    image_start_token, image_token, image_end_token, and optionally video_token, the placeholder of
    video frames; ``video_id`` is None without it); ``special_tokens`` fills or overrides them, so a
    model family can name its own. Unnamed media tokens fall back to CONVENTIONAL_NAMES (Qwen's
    <|vision_start|> <|image_pad|> <|vision_end|> <|video_pad|>), so an HF checkpoint's tokenizer
    folder works as it is. bos_id is None when the tokenizer has no bos token.
    """

    def __init__(self, folder: str, special_tokens: dict[str, str] | None = None):
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"no tokenizer.json in {folder} (set model.tokenizer_path)")
        self._tok = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        special = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.config = dict(special)
        """The folder's tokenizer_config.json as read (an HF export writes it back, extended)."""
        self._add_declared_tokens(special.get("added_tokens_decoder", {}))
        special.update(special_tokens or {})
        for key, names in CONVENTIONAL_NAMES.items():
            if special.get(key) is None:
                special[key] = next((n for n in names if self._tok.token_to_id(n) is not None), None)
        self.pad_id = self._token_id(special, "pad_token")
        self.eos_id = self._token_id(special, "eos_token")
        # Qwen tokenizers have no bos token: documents then start without one
        self.bos_id = self._token_id(special, "bos_token") if special.get("bos_token") else None
        self.image_start_id = self._token_id(special, "image_start_token")
        self.image_id = self._token_id(special, "image_token")
        self.image_end_id = self._token_id(special, "image_end_token")
        self.video_id = self._token_id(special, "video_token") if special.get("video_token") else None

    def _add_declared_tokens(self, added_tokens_decoder: dict):
        """Add the tokens tokenizer_config.json declares (id -> token) but tokenizer.json lacks."""
        for token_id, entry in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
            known = self._tok.token_to_id(entry["content"])
            if known == int(token_id):
                continue
            # added tokens take the next free id, so only a token declared at that id can be added
            if known is not None or int(token_id) != self._tok.get_vocab_size():
                raise ConfigError(f"tokenizer_config.json declares {entry['content']!r} at id {token_id} "
                                  f"but tokenizer.json has it at {known} (vocabulary size "
                                  f"{self._tok.get_vocab_size()}); the two files do not belong together")
            self._tok.add_special_tokens([AddedToken(
                entry["content"], single_word=entry.get("single_word", False),
                lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                normalized=entry.get("normalized", False), special=entry.get("special", True))])

    def _token_id(self, special: dict, key: str) -> int:
        if special.get(key) is None:
            raise ConfigError(f"the tokenizer defines no {key} (tokenizer_config.json or the model family)")
        token = special[key]
        token = token["content"] if isinstance(token, dict) else token
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{key} {token!r} of tokenizer_config.json is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. a special token such as <|im_start|>), or None."""
        return self._tok.token_to_id(token)

    def token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id``."""
        return self._tok.id_to_token(token_id)

    def save_tokenizer_json(self, path: str):
        """tokenizer.json of this tokenizer, tokens added since loading included."""
        self._tok.save(path)

    def add_special_token(self, token: str) -> int:
        """The id of ``token``, added after the last id when the vocabulary lacks it (e.g. the mask
        token of masked diffusion, titan_mm/objectives/mdlm.py)."""
        if self._tok.token_to_id(token) is None:
            self._tok.add_special_tokens([AddedToken(token, normalized=False, special=True)])
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and the character offset in ``text`` where each token starts."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
