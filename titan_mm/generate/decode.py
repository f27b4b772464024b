"""Incremental decoding with a KV cache: one prefill over the prompts, then one token at a time.

Prefill runs the whole model once on the left-padded prompt batch (the vision encoder, the image
scatter and DeepStack included) and fills the cache. Every decode step then runs only the decoder
on one new token a row: text tokens take no visual features, so nothing visual is recomputed.
A row's rotary position at decode step i is (its largest prompt position) + 1 + i, on all three
M-RoPE axes for the Qwen-VL families (transformers' ``rope_deltas``), and simply its length + i
for the others.
"""

from typing import Iterator

import torch

from titan_mm.data.dataloader import collate_rows
from titan_mm.data.documents import Document
from titan_mm.data.packing import RowShape, build_row
from titan_mm.evaluate import MODEL_INPUTS
from titan_mm.generate.kv_cache import KVCache
from titan_mm.generate.load import InferenceModel
from titan_mm.generate.sampling import Sampling, next_tokens

SEQUENCE_INPUTS = ("input_ids", "position_ids", "document_ids", "image_token_index")


def prompt_batch(im: InferenceModel, prompts: list[Document]) -> dict:
    """The model inputs of ``prompts``, one row each, left-padded to the longest; each image or
    video in a patch slot of its own (slots as long as the largest)."""
    if not prompts or any(not doc.tokens for doc in prompts):
        raise ValueError("generation needs at least one prompt, and no empty prompt")
    spec, tok = im.args.vision_input, im.tokenizer
    S = max(len(doc.tokens) for doc in prompts)
    # one all-padding slot at least: the vision encoder runs on fixed shapes, images or not
    n_slots = max([1] + [len(doc.images) for doc in prompts])
    slot_len = max([spec.merge_area] + [media.patches.shape[0] for doc in prompts for media in doc.images])
    shape = RowShape(S, n_slots, slot_len, spec.patch_dim, spec.merge_area, tok.pad_id,
                     tuple(i for i in (tok.image_id, tok.video_id) if i is not None),
                     position_dims=spec.position_dims)
    rows = []
    for doc in prompts:
        row = build_row([doc], shape)
        for key in SEQUENCE_INPUTS:  # right padding -> left padding
            row[key] = row[key].roll(S - len(doc.tokens), dims=-1)
        rows.append(row)
    batch = collate_rows(rows, slot_len // spec.merge_area)
    return {k: batch[k].to(im.device) for k in MODEL_INPUTS}


@torch.no_grad()
def generate_stream(im: InferenceModel, prompts: list[Document], sampling: Sampling, *,
                    cuda_graph: bool = False) -> Iterator[list[int | None]]:
    """Yields, after each decode step, one new token per prompt (None for a row that has stopped
    or stops at this step: stop tokens are not yielded). Ends when every row has stopped or after
    ``sampling.max_new_tokens`` steps. ``cuda_graph``: replay the decode step as a CUDA graph
    (captured after two eager steps; CUDA only)."""
    sampling.check()
    if cuda_graph and im.device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device; the model is on {im.device}")
    if not im.objective.causal:
        raise ValueError("this model was trained with a bidirectional objective (mdlm); sample it with "
                         "titan_mm.objectives.mdlm_sampler (scripts/generate.py --objective.name mdlm)")
    model, decoder, tok = im.model, im.model.decoder, im.tokenizer
    stop_ids = set(im.stop_token_ids() if sampling.stop_token_ids is None else sampling.stop_token_ids)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(im.device).manual_seed(sampling.seed)

    batch = prompt_batch(im, prompts)
    B, S = batch["input_ids"].shape
    cache = KVCache.for_decoder(decoder, B, S + sampling.max_new_tokens,
                                dtype=decoder.tok_embeddings.weight.dtype, device=im.device)
    position_dims = im.args.vision_input.position_dims
    positions = batch["position_ids"].view(B, position_dims, S)
    next_position_B = positions.amax(dim=(1, 2)) + 1
    document_ids_B1 = torch.zeros(B, 1, dtype=torch.long, device=im.device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    running = [True] * B

    def last_logits(fn, *args, **kwargs) -> torch.Tensor:
        # the cache is attached for one forward at a time, under the model's lock: streams that
        # share the model (a server's requests, in threads or interleaved) take turns step by step
        with im.lock, cache.attached(decoder):
            h_BSD = fn(*args, **kwargs)
            cache.advance(h_BSD.shape[1])
            return decoder.logits(h_BSD[:, -1])

    def decode_step(ids_B1: torch.Tensor, position_B1: torch.Tensor) -> torch.Tensor:
        return last_logits(decoder, ids_B1, position_B1, document_ids_B1)

    step_logits = CudaGraphStep(decode_step) if cuda_graph else decode_step
    logits_BV = last_logits(model, **batch)
    for step in range(sampling.max_new_tokens):
        token_B = next_tokens(logits_BV, sampling, generator)
        emitted = [None] * B
        for b, token in enumerate(token_B.tolist()):
            if not running[b]:
                continue
            if token in stop_ids:
                running[b] = False
                continue
            outputs[b].append(token)
            emitted[b] = token
            if sampling.stop_strings and _ends_in_stop_string(tok, outputs[b], sampling.stop_strings):
                running[b] = False
        yield emitted
        if not any(running) or step == sampling.max_new_tokens - 1:
            return
        # rows that stopped keep feeding padding, which no running row attends to
        ids_B1 = torch.where(torch.tensor(running, device=im.device), token_B, tok.pad_id)[:, None]
        position_B1 = (next_position_B + step)[:, None]
        if position_dims == 3:
            position_B1 = position_B1[:, None].expand(B, 3, 1)
        logits_BV = step_logits(ids_B1, position_B1)


def generate(im: InferenceModel, prompts: list[Document], sampling: Sampling, *,
             cuda_graph: bool = False) -> list[list[int]]:
    """The new token ids of each prompt (stop tokens left out), generated as a batch."""
    outputs = [[] for _ in prompts]
    for step_tokens in generate_stream(im, prompts, sampling, cuda_graph=cuda_graph):
        for out, token in zip(outputs, step_tokens):
            if token is not None:
                out.append(token)
    return outputs


class CudaGraphStep:
    """A decode step (ids [B, 1], positions -> logits [B, V]) run eagerly ``warmup`` times on a side
    stream, then captured once as a CUDA graph and replayed: every decode step has the same shapes
    (the KV cache is fixed-size and written at a device-side cursor), so one graph serves them all,
    without a kernel launch per op. Its inputs are copied into the graph's own buffers; the logits
    returned are the graph's output buffer, valid until the next call."""

    def __init__(self, step, warmup: int = 2):
        self.step, self.warmup = step, warmup
        self.graph = None

    def __call__(self, ids_B1: torch.Tensor, position_B1: torch.Tensor) -> torch.Tensor:
        if self.warmup > 0:
            self.warmup -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits_BV = self.step(ids_B1, position_B1)
            torch.cuda.current_stream().wait_stream(stream)
            return logits_BV
        if self.graph is None:
            self.ids_B1, self.position_B1 = ids_B1.clone(), position_B1.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the replay below runs it
                self.logits_BV = self.step(self.ids_B1, self.position_B1)
        else:
            self.ids_B1.copy_(ids_B1)
            self.position_B1.copy_(position_B1)
        self.graph.replay()
        return self.logits_BV


def _ends_in_stop_string(tok, ids: list[int], stop_strings: tuple[str, ...]) -> bool:
    """Whether the text of ``ids`` holds a stop string that its last token completed (only the
    tail is decoded: a stop string spans at most as many tokens as it has characters)."""
    longest = max(len(s) for s in stop_strings)
    text = tok.decode(ids[-longest - 1:])
    return any(s in text for s in stop_strings)
