"""Offline conversion between HF folders and model-only DCP folders (what scripts/convert_*.py run).

A model-only DCP folder holds ``{"model": state_dict}`` like a run's ``model-step-N`` export, so it
is a valid ``checkpoint.initial_load_path``. Either way one copy of the weights is held: HF tensors
are read by DCP straight into the model's parameters. hf_to_dcp keeps the source's config.json in
the DCP folder, so that dcp_to_hf writes the checkpoint's own metadata (token ids) back.
"""

import dataclasses
import json
import logging
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp

from titan_mm.config import ConfigError
from titan_mm.hf.adapter import TOKEN_ID_FIELDS
from titan_mm.hf.export import InferenceFiles, write_inference_files
from titan_mm.hf.io import load_hf_weights, save_hf_weights
from titan_mm.models import ModelSpec
from titan_mm.models.lora import is_adapter_key
from titan_mm.train.checkpoint import ModelState

logger = logging.getLogger(__name__)

METADATA_FIELDS = {"max_position_embeddings", "init_std", *TOKEN_ID_FIELDS}
"""Args recorded in config.json that do not change the weights or the forward."""


def empty_model(spec: ModelSpec, args) -> torch.nn.Module:
    """The model in CPU memory, parameters uninitialised: a checkpoint overwrites every one of them
    (and an 8B init_weights() would take minutes for nothing)."""
    with torch.device("meta"):
        model = spec.model_cls(args)
    return model.to_empty(device="cpu")


def args_differences(ours, theirs, prefix: str = "") -> list[str]:
    """'field: ours vs theirs' for every differing (nested) dataclass field, metadata ones left out."""
    out = []
    for f in dataclasses.fields(ours):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
            out += args_differences(a, b, f"{prefix}{f.name}.")
        elif a != b and f.name not in METADATA_FIELDS:
            out.append(f"{prefix}{f.name}: {a!r} vs {b!r}")
    return out


def with_metadata_of(ours, theirs):
    """``ours`` with the METADATA_FIELDS values of ``theirs`` (nested dataclasses too)."""
    changes = {}
    for f in dataclasses.fields(ours):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if f.name in METADATA_FIELDS:
            changes[f.name] = b
        elif dataclasses.is_dataclass(a) and type(a) is type(b):
            changes[f.name] = with_metadata_of(a, b)
    return dataclasses.replace(ours, **changes)


def args_for_hf_folder(spec: ModelSpec, hf_folder: str, flavor: str | None):
    """The flavor's args, checked against the folder's config.json and with its metadata (token
    ids, context length); or, without a flavor, the args config.json describes."""
    path = os.path.join(hf_folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json in {hf_folder}: not an HF checkpoint folder")
    with open(path) as f:
        from_config = spec.hf_adapter.args_from_hf_config(json.load(f))
    if flavor is None:
        matches = [name for name, args in spec.flavors.items() if not args_differences(args, from_config)]
        if matches:
            logger.info("%s/config.json matches %s flavor %s", hf_folder, spec.name, matches[0])
        else:
            logger.warning("%s/config.json matches no %s flavor: add one to FLAVORS with these args to "
                           "train from the converted weights: %s", hf_folder, spec.name, from_config)
        return from_config
    if flavor not in spec.flavors:
        raise ValueError(f"{flavor!r} is not a flavor of {spec.name}; choose one of {sorted(spec.flavors)}")
    differences = args_differences(spec.flavors[flavor], from_config)
    if differences:
        raise ValueError(f"{spec.name}/{flavor} differs from {hf_folder}/config.json in "
                         f"{'; '.join(differences)} (flavor vs config); pick the matching flavor or omit "
                         f"--model.flavor")
    return with_metadata_of(spec.flavors[flavor], from_config)


def hf_to_dcp(spec: ModelSpec, hf_folder: str, out_folder: str, flavor: str | None = None):
    args = args_for_hf_folder(spec, hf_folder, flavor)
    model = empty_model(spec, args)
    load_hf_weights(model, spec.hf_adapter, hf_folder)
    dcp.save({"model": ModelState(model)}, checkpoint_id=out_folder)
    shutil.copy(os.path.join(hf_folder, "config.json"), os.path.join(out_folder, "config.json"))
    return args


def with_stored_vocab(args, stored: dict, dcp_folder: str):
    """``args`` with the vocabulary size of the checkpoint's token embedding when a run grew it
    (MDLM's added mask token, titan_mm/objectives/__init__.py); a smaller one is an error."""
    rows = [meta.size[0] for key, meta in stored.items() if key.endswith("tok_embeddings.weight")]
    if not rows or rows[0] == args.decoder.vocab_size:
        return args
    if rows[0] < args.decoder.vocab_size:
        raise ValueError(f"{dcp_folder}: the token embedding has {rows[0]} rows, fewer than the flavor's "
                         f"{args.decoder.vocab_size}; is it a checkpoint of this flavor?")
    logger.info("%s: vocabulary grown by the run to %d rows (the flavor has %d)", dcp_folder, rows[0],
                args.decoder.vocab_size)
    return dataclasses.replace(args, decoder=dataclasses.replace(args.decoder, vocab_size=rows[0]))


def dcp_to_hf(spec: ModelSpec, dcp_folder: str, out_folder: str, flavor: str, dtype: torch.dtype | None = None,
              inference_files: InferenceFiles | None = None):
    """Weights of a model-only export or of a full training checkpoint (its model part). A DCP folder
    written by hf_to_dcp holds its source's config.json: the flavor is checked against it and its
    token ids are written back; otherwise the flavor's own are. ``inference_files``: also the
    tokenizer, chat template, generation and processor configs (titan_mm/hf/export.py)."""
    if os.path.isfile(os.path.join(dcp_folder, "config.json")):
        args = args_for_hf_folder(spec, dcp_folder, flavor)
    else:
        args = spec.flavors[flavor]
    spec.hf_adapter.hf_config(args)  # fail before loading when the flavor has no HF layout
    stored = dcp.FileSystemReader(dcp_folder).read_metadata().state_dict_metadata
    if any(is_adapter_key(k) for k in stored):
        # the adapters' alpha / rank is not in the checkpoint: they cannot be merged here
        raise ValueError(f"{dcp_folder} holds LoRA adapters; export them from the run instead "
                         f"(checkpoint.export_hf_path merges them, lora.export_peft_path writes a PEFT folder)")
    args = with_stored_vocab(args, stored, dcp_folder)
    model = empty_model(spec, args)
    dcp.load({"model": ModelState(model)}, checkpoint_id=dcp_folder)
    save_hf_weights(model, spec.hf_adapter, args, out_folder, dtype=dtype)
    if inference_files is not None:
        write_inference_files(out_folder, spec.hf_adapter, args, inference_files)
