"""The files beside the weights that make an exported HF folder usable as it is: transformers'
AutoTokenizer / AutoProcessor / AutoModelForImageTextToText load it and ``generate`` answers chat
messages with images, with the token ids our prompt builders write.

- ``tokenizer.json`` (the training tokenizer, with any token the run added, e.g. MDLM's <|mask|>)
  and ``tokenizer_config.json`` (the source's, plus the special tokens and ``chat_template``);
  ``chat_template.jinja`` the same template on its own (transformers 5 reads it for processors);
- token ids in ``config.json`` (bos / eos / pad, top level and text_config) and
  ``generation_config.json`` (greedy; eos and the chat format's turn end stop generation);
- the family's processor files (``preprocessor_config.json``, and ``video_preprocessor_config.json``
  / ``processor_config.json`` for the Qwen-VL families) from the image budget of the run.
"""

import json
import logging
import os
from dataclasses import dataclass

from titan_mm.config import ConfigError
from titan_mm.data.chat import ChatFormat, get_chat_format
from titan_mm.data.image import VisionInputSpec
from titan_mm.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class InferenceFiles:
    """What an export needs beyond the weights: the run's tokenizer, chat format and image budget."""

    tokenizer: Tokenizer
    chat_format: str
    """A name of titan_mm.data.chat.CHAT_FORMATS: the chat template written."""
    min_pixels: int
    max_pixels: int


def write_inference_files(folder: str, adapter, args, files: InferenceFiles):
    """Everything but the weights and their config.json's architecture (save_hf_weights writes
    those first)."""
    tokenizer = files.tokenizer
    try:
        fmt = get_chat_format(files.chat_format, tokenizer)
    except ConfigError as e:
        # e.g. a caption run on a Qwen tokenizer with the default data.chat_format (plain)
        fmt = None
        logger.warning("HF export: no chat template written (%s); the tokenizer's own is kept, if any", e)
    template = chat_template(fmt, tokenizer) if fmt is not None else tokenizer.config.get("chat_template")
    ids = special_token_ids(tokenizer)
    stop = [tokenizer.eos_id]
    turn_end = tokenizer.token_id(fmt.turn_end) if fmt is not None else None
    if turn_end is not None and turn_end not in stop:
        stop.append(turn_end)

    tokenizer.save_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    _write_json(os.path.join(folder, "tokenizer_config.json"), tokenizer_config(tokenizer, template))
    if template is not None:
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(template)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(ids)
    # the placeholder ids the prompts are written with (a flavor's defaults may be another tokenizer's)
    media = {"image_token_id": tokenizer.image_id, "image_token_index": tokenizer.image_id,
             "video_token_id": tokenizer.video_id, "vision_start_token_id": tokenizer.image_start_id,
             "vision_end_token_id": tokenizer.image_end_id}
    for key, token_id in media.items():
        if key in config and token_id is not None and config[key] != token_id:
            logger.warning("HF export: config.json %s = %d, but the tokenizer writes that placeholder as %d; "
                           "writing %d", key, config[key], token_id, token_id)
            config[key] = token_id
    if "text_config" in config:
        config["text_config"].update(ids)
    _write_json(config_path, config)
    _write_json(os.path.join(folder, "generation_config.json"),
                {**ids, "eos_token_id": stop if len(stop) > 1 else stop[0], "do_sample": False})
    for name, content in adapter.hf_processor_files(args, files.min_pixels, files.max_pixels).items():
        _write_json(os.path.join(folder, name), content)


def special_token_ids(tokenizer: Tokenizer) -> dict:
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        ids["bos_token_id"] = tokenizer.bos_id
    return ids


def tokenizer_config(tokenizer: Tokenizer, template: str | None) -> dict:
    """The source folder's tokenizer_config.json (titan_mm's own keys such as image_token kept:
    they name the media tokens for both readers), with the special tokens and the chat template."""
    config = dict(tokenizer.config)
    names = {"eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id, "bos_token": tokenizer.bos_id,
             "image_token": tokenizer.image_id, "video_token": tokenizer.video_id}
    config.update({key: tokenizer.token(i) for key, i in names.items() if i is not None})
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if template is not None:
        config["chat_template"] = template
    return config


def chat_template(fmt: ChatFormat, tokenizer: Tokenizer) -> str:
    """A Jinja chat template that writes what titan_mm.data.chat writes for ``fmt``, images and
    videos as one placeholder between the vision start and end tokens (the processor expands it),
    and with ``add_generation_prompt`` the opening of the assistant's turn."""
    start, end = tokenizer.token(tokenizer.image_start_id), tokenizer.token(tokenizer.image_end_id)
    image = start + tokenizer.token(tokenizer.image_id) + end
    video = start + tokenizer.token(tokenizer.video_id) + end if tokenizer.video_id is not None else ""
    head, tail = fmt.turn_start.split("{role}")
    q = json.dumps  # a JSON string is a valid Jinja string literal
    strip = fmt.strip_content
    text_part = ("{%- set t = part['text'] -%}"
                 + ("{%- if loop.first -%}{%- set t = t.lstrip() -%}{%- endif -%}"
                    "{%- if loop.last -%}{%- set t = t.rstrip() -%}{%- endif -%}" if strip else "")
                 + "{{- t -}}")
    string_content = "{{- message['content'].strip() -}}" if strip else "{{- message['content'] -}}"
    system = ""
    if fmt.default_system is not None:
        system = (f"{{%- if messages[0]['role'] != 'system' -%}}{{{{- {q(head + 'system' + tail)} + "
                  f"{q(fmt.default_system)} + {q(fmt.turn_end + fmt.between_turns)} -}}}}{{%- endif -%}}")
    return (
        f"{{{{- {q(fmt.begin)} -}}}}{system}"
        "{%- for message in messages -%}"
        f"{{{{- {q(head)} + message['role'] + {q(tail)} -}}}}"
        f"{{%- if message['content'] is string -%}}{string_content}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'text' -%}}{text_part}"
        f"{{%- elif part['type'] in ['image', 'image_url'] -%}}{{{{- {q(image)} -}}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{- {q(video)} -}}}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        f"{{{{- {q(fmt.turn_end + fmt.between_turns)} -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {q(head + 'assistant' + tail)} -}}}}{{%- endif -%}}"
    )


def qwen_processor_files(spec: VisionInputSpec, processor_class: str, video_processor_class: str,
                         min_pixels: int, max_pixels: int) -> dict[str, dict]:
    """The Qwen-VL families' processor files: Qwen2-VL's image processor (the resize rule and
    patch order titan_mm.data.image reproduces) and the family's video processor."""
    common = {"patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
              "merge_size": spec.spatial_merge_size, "image_mean": list(spec.image_mean),
              "image_std": list(spec.image_std), "min_pixels": min_pixels, "max_pixels": max_pixels,
              "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
              "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "do_convert_rgb": True, "processor_class": processor_class}
    return {"preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessor"},
            "video_preprocessor_config.json": {**common, "video_processor_type": video_processor_class},
            "processor_config.json": {"processor_class": processor_class}}


def _write_json(path: str, content: dict):
    with open(path, "w") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
