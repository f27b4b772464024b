"""A model ready to generate: weights from a DCP checkpoint or an HF folder, its tokenizer, and the
builders that turn chat messages or interleaved content into prompt documents."""

import dataclasses
import os
import threading
from dataclasses import dataclass, field

import torch

from titan_mm.config import ConfigError, JobConfig
from titan_mm.data.chat import ChatDocumentBuilder
from titan_mm.data.dataloader import build_document_builder
from titan_mm.data.documents import Document, DocumentBuilder
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.evaluate import latest_model_export, load_model
from titan_mm.hf.convert import args_for_hf_folder
from titan_mm.hf.io import load_hf_weights
from titan_mm.models import get_model_spec
from titan_mm.objectives import args_for_objective, build_objective, objective_setup
from titan_mm.objectives.base import Objective


@dataclass
class InferenceModel:
    model: torch.nn.Module
    """The family's model, in eval mode, on ``device``."""
    args: object
    """The family's args (the decoder's, the vision input's)."""
    tokenizer: Tokenizer
    objective: Objective
    """What the model was trained for: causal_lm generates left to right (titan_mm.generate),
    mdlm by iterative unmasking (titan_mm/objectives/mdlm_sampler.py)."""
    prompt_builder: DocumentBuilder
    """Interleaved text / images / videos -> a prompt document (``DocumentBuilder.prompt``)."""
    chat_builder: ChatDocumentBuilder | None
    """Chat messages -> a prompt document in the chat format (``chat_prompt``); None when the
    tokenizer cannot write the chat format (``chat_error`` says why)."""
    source: str
    """Where the weights came from."""
    chat_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Held by each forward of a generation (titan_mm/generate/decode.py), so that generations
    sharing the model, e.g. a server's requests in threads, take turns step by step."""

    @property
    def device(self) -> torch.device:
        return self.model.decoder.tok_embeddings.weight.device

    def stop_token_ids(self) -> tuple[int, ...]:
        """eos, and the chat format's turn end when it is one token (<|im_end|>, <|eot_id|>)."""
        turn_end = self.tokenizer.token_id(self.chat_builder.format.turn_end) if self.chat_builder else None
        return tuple(dict.fromkeys(i for i in (self.tokenizer.eos_id, turn_end) if i is not None))


def load_model_for_inference(cfg: JobConfig, *, checkpoint: str | None = None, hf_path: str | None = None,
                             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                             chat_format: str | None = None) -> InferenceModel:
    """The model of ``cfg`` (model.name, flavor, tokenizer, objective) with the weights of
    ``checkpoint`` (a DCP folder: a run's model-step-N, or a full step-N checkpoint), or of the HF
    folder ``hf_path`` (its config.json gives the architecture; its tokenizer files, when present,
    the tokenizer). Neither: the newest model-step-N of the run in cfg.job.dump_folder.
    ``dtype``: of the parameters (norms, rotary and softmax still compute in fp32).
    ``chat_format``: default data.chat_format."""
    spec = get_model_spec(cfg.model.name)
    if hf_path is not None:
        tokenizer_folder = hf_path if os.path.isfile(os.path.join(hf_path, "tokenizer.json")) \
            else cfg.model.tokenizer_path
        tokenizer = Tokenizer(tokenizer_folder, spec.special_tokens)
        objective = build_objective(cfg.objective, tokenizer, vocab_parallel=False, loss_parallel=False)
        args = args_for_objective(args_for_hf_folder(spec, hf_path, None), objective, tokenizer)
        with torch.device("meta"):
            model = spec.model_cls(args)
        model.to_empty(device="cpu")
        model.init_weights()  # the buffers (rotary tables); the folder overwrites every parameter
        load_hf_weights(model, spec.hf_adapter, hf_path)
        source = hf_path
    else:
        tokenizer, objective, args = objective_setup(cfg)
        source = checkpoint or latest_model_export(cfg.job.dump_folder, cfg.checkpoint.folder)
        model = load_model(cfg, source)
    for param in model.parameters():  # buffers (rotary frequencies) stay fp32
        param.data = param.data.to(dtype)
    model = model.to(device).eval()
    data_cfg = cfg.data if chat_format is None else dataclasses.replace(cfg.data, chat_format=chat_format)
    try:
        chat_builder, chat_error = build_document_builder(data_cfg, tokenizer, args.vision_input, kind="chat"), ""
    except ConfigError as e:  # e.g. the default chat format (plain) with a Qwen tokenizer: raw prompts still work
        chat_builder, chat_error = None, str(e)
    return InferenceModel(
        model=model, args=args, tokenizer=tokenizer, objective=objective,
        prompt_builder=build_document_builder(data_cfg, tokenizer, args.vision_input, kind="interleaved"),
        chat_builder=chat_builder, source=source, chat_error=chat_error)


def chat_prompt(im: InferenceModel, messages: list[dict], media_root: str = ".") -> Document:
    """A prompt document of OpenAI-style ``messages`` (system / user / assistant; images and videos
    in user messages as paths relative to ``media_root``, or encoded bytes), written in the chat
    format and ending with the opening of the assistant's turn."""
    if im.chat_builder is None:
        raise ConfigError(f"no chat prompts: {im.chat_error}")
    return im.chat_builder.chat("prompt", messages, media_root, add_generation_prompt=True)


def text_prompt(im: InferenceModel, content: str | list[dict], media_root: str = ".") -> Document:
    """A prompt document that continues raw text (``<bos>`` first when the tokenizer has one):
    ``content`` is a string, or a list of parts {"type": "text" | "image" | "video", ...} as in
    interleaved data (docs/data.md)."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return im.prompt_builder.prompt("prompt", content, media_root)

