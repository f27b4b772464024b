"""OpenAI-style conversations -> documents written in a model family's chat format.

A sample is ``{"id": ..., "messages": [{"role": "system" | "user" | "assistant", "content": ...}]}``
where content is a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image", "image": path}``, ``{"type": "image_url", "image_url": {"url": path}}`` or
``{"type": "video", "video": path}`` (a video file). Paths are relative to the data file's folder;
an image may also be given as encoded bytes or a ``{"bytes", "path"}`` struct (Parquet), or as a bare
``{"type": "image"}`` that stands for the next entry of the sample's ``images`` list (the layout of
HF datasets' chat sets). Images and videos may appear in user messages only, anywhere among the
text. Only assistant turns are trained on: their content and the token that ends the turn, not the
role header.
"""

import bisect
import itertools
import os
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from titan_mm.config import ConfigError
from titan_mm.data.documents import Document, DocumentBuilder, SampleError, image_input, is_image_value
from titan_mm.data.image import ImageProcessor
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.data.video import load_video

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """How one model family writes a conversation out; the strings may hold special tokens."""

    turn_start: str
    """Opens a turn, ``{role}`` standing for the role; never trained on."""
    turn_end: str
    """Closes a turn; trained on after an assistant's content, so that the model learns to stop."""
    between_turns: str = ""
    """Follows each turn's end; never trained on."""
    begin: str = ""
    """Written before the first turn (Llama 3's <|begin_of_text|>)."""
    default_system: str | None = None
    """System prompt written when a conversation does not start with one."""
    strip_content: bool = False
    """Trim white space around each message's content (Llama 3's template does)."""


CHATML = ChatFormat(turn_start="<|im_start|>{role}\n", turn_end="<|im_end|>", between_turns="\n")

CHAT_FORMATS = {
    # the bundled debug tokenizer has no turn tokens: ChatML written with its <|bos|> and <|eos|>
    "plain": ChatFormat(turn_start="<|bos|>{role}\n", turn_end="<|eos|>", between_turns="\n"),
    "chatml": CHATML,
    # Qwen2-VL and Qwen2.5-VL share one chat template; Qwen3-VL's adds no default system prompt
    "qwen2_vl": replace(CHATML, default_system="You are a helpful assistant."),
    "qwen2_5_vl": replace(CHATML, default_system="You are a helpful assistant."),
    "qwen3_vl": CHATML,
    "llama3": ChatFormat(turn_start="<|start_header_id|>{role}<|end_header_id|>\n\n",
                         turn_end="<|eot_id|>", begin="<|begin_of_text|>", strip_content=True),
}

SPECIAL_TOKEN = re.compile(r"<\|[^|]+\|>")


def get_chat_format(name: str, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format ``name``, checked to be writable with ``tokenizer``."""
    if name not in CHAT_FORMATS:
        raise ConfigError(f"unknown data.chat_format {name!r}; choose one of {sorted(CHAT_FORMATS)}")
    fmt = CHAT_FORMATS[name]
    for token in SPECIAL_TOKEN.findall(fmt.begin + fmt.turn_start + fmt.turn_end):
        if tokenizer.token_id(token) is None or tokenizer.encode(token) != [tokenizer.token_id(token)]:
            raise ConfigError(f"data.chat_format = {name!r} writes {token}, which is not a special token "
                              f"of this tokenizer; choose the chat format of the tokenizer's model family "
                              f"(plain for assets/tokenizer)")
    return fmt


@dataclass
class Text:
    text: str
    trained: bool = False


@dataclass(frozen=True)
class Media:
    kind: str
    """image or video."""
    value: object
    """A video's path; an image's path, bytes or {"bytes", "path"} struct; None = the next entry of
    the sample's ``images``."""


def render_conversation(ref: str, messages, fmt: ChatFormat,
                        add_generation_prompt: bool = False) -> list[Text | Media]:
    """The conversation as ``fmt`` writes it: texts, assistant turns marked trained, and the media
    between them. Raises SampleError for a conversation that cannot be trained on.
    add_generation_prompt: a prompt to generate from (no assistant message needed), ending with the
    opening of the assistant's turn, as chat templates' ``add_generation_prompt`` writes it."""
    check_messages(ref, messages, need_answer=not add_generation_prompt)
    pieces = [Text(fmt.begin)]
    if fmt.default_system is not None and messages[0]["role"] != "system":
        pieces += _turn("system", [Text(fmt.default_system)], fmt)
    for message in messages:
        pieces += _turn(message["role"], content_pieces(ref, message), fmt)
    if add_generation_prompt:
        pieces.append(Text(fmt.turn_start.replace("{role}", "assistant")))
    return pieces


def check_messages(ref: str, messages, need_answer: bool = True):
    if not isinstance(messages, list):
        raise SampleError("malformed", f"{ref}: needs a 'messages' list")
    if not messages:
        raise SampleError("empty", f"{ref}: 'messages' is empty")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise SampleError("malformed", f"{ref}: message {i} has role {role!r}; roles are {list(ROLES)}")
        if role == "system" and i > 0:
            raise SampleError("malformed", f"{ref}: the system message must come first (it is message {i})")
    if need_answer and not any(message["role"] == "assistant" for message in messages):
        raise SampleError("empty", f"{ref}: no assistant message to train on")


def content_pieces(ref: str, message: dict) -> list[Text | Media]:
    content = message.get("content")
    if isinstance(content, str):
        return [Text(content)]
    if not isinstance(content, list):
        raise SampleError("malformed", f"{ref}: a message's content must be a string or a list of parts")
    pieces = [_part(ref, part) for part in content]
    if message["role"] != "user" and any(isinstance(piece, Media) for piece in pieces):
        raise SampleError("malformed", f"{ref}: images and videos may appear in user messages only")
    return pieces


def _part(ref: str, part) -> Text | Media:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return Text(part["text"])
    if kind == "video" and isinstance(part.get("video"), str):
        return Media(kind, part["video"])
    if kind == "image" and (is_image_value(part.get("image")) or part.get("image") is None):
        return Media(kind, part.get("image"))
    url = part.get("image_url") if kind == "image_url" else None
    if isinstance(url, dict) and isinstance(url.get("url"), str):
        return Media("image", url["url"])
    raise SampleError("malformed", f"{ref}: content part {part!r} is not text, image, image_url or video")


def _turn(role: str, content: list[Text | Media], fmt: ChatFormat) -> list[Text | Media]:
    trained = role == "assistant"
    if fmt.strip_content:
        content = _strip_ends(content)
    for piece in content:
        if isinstance(piece, Text):
            piece.trained = trained
    return [Text(fmt.turn_start.replace("{role}", role)), *content, Text(fmt.turn_end, trained),
            Text(fmt.between_turns)]


def _strip_ends(content: list[Text | Media]) -> list[Text | Media]:
    """Trim white space at the start and at the end of a message's content."""
    content = list(content)
    if content and isinstance(content[0], Text):
        content[0] = Text(content[0].text.lstrip())
    if content and isinstance(content[-1], Text):
        content[-1] = Text(content[-1].text.rstrip())
    return content


class ChatDocumentBuilder(DocumentBuilder):
    """Builds documents from conversations written in one chat format; images and videos become
    ``<image_start> <placeholder> * n <image_end>`` as in DocumentBuilder."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, chat_format: str,
                 positions_fn: Callable[[Document], torch.Tensor] | None = None, *,
                 video_fps: float = 2.0, video_max_frames: int = 16):
        super().__init__(tokenizer, image_processor, positions_fn, video_fps=video_fps,
                         video_max_frames=video_max_frames)
        self.format = get_chat_format(chat_format, tokenizer)

    def chat(self, ref: str, messages, media_root: str, images: list | None = None,
             add_generation_prompt: bool = False) -> Document:
        """``images``: the sample's image list, taken in order by bare ``{"type": "image"}`` parts.
        add_generation_prompt: a prompt for generation, ending where the assistant's answer starts."""
        doc = Document(ref=ref)
        texts: list[Text] = []
        unused = list(images or [])
        for piece in render_conversation(ref, messages, self.format, add_generation_prompt):
            if isinstance(piece, Text):
                texts.append(piece)
                continue
            self._add_texts(doc, texts)
            texts = []
            if piece.kind == "video":
                self._add_video_file(doc, os.path.join(media_root, piece.value))
                continue
            value = piece.value
            if value is None:
                if not unused:
                    raise SampleError("malformed", f"{ref}: more image parts than entries in 'images'")
                value = unused.pop(0)
            if not is_image_value(value):
                raise SampleError("malformed", f"{ref}: image {value!r} is not a path, bytes or "
                                               f"{{bytes, path}} struct")
            self._add_image(doc, image_input(value, media_root))
        if unused:
            raise SampleError("malformed", f"{ref}: {len(unused)} entries of 'images' have no image part")
        self._add_texts(doc, texts)
        if self.positions_fn is not None:
            doc.positions = self.positions_fn(doc)
        return doc

    def _add_texts(self, doc: Document, texts: list[Text]):
        """Tokenize consecutive texts as one string, as a chat template's output is tokenized, and
        train on the tokens that start inside a trained text."""
        ids, starts = self.tok.encode_with_starts("".join(t.text for t in texts))
        ends = list(itertools.accumulate(len(t.text) for t in texts))
        doc.tokens += ids
        doc.targets += [texts[bisect.bisect_right(ends, start)].trained for start in starts]

    def _add_video_file(self, doc: Document, path: str):
        # chat.load_video, looked up here so that tests can stub decoding
        self._add_decoded_video(doc, path, load_video)
