"""Generation with a KV cache (titan_mm/generate) against transformers' ``generate``, for every family.

References are tiny random-init transformers models (fp32, CPU, sdpa) built from config objects,
with untied output heads and O(1) activations (a tied head over large embeddings repeats the last
token forever, which would hide a wrong decode position); weights reach our models through the
families' HF adapters. Prompts are built by our prompt builders from image files (and video frames
for the Qwen families); transformers gets the same token ids and patches and computes its own
positions (``rope_deltas`` for the Qwen families) and cache.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from test_qwen3_vl import VIDEO_ID, order_one_init_, tok  # noqa: F401 (tok: the tokenizer fixture)
from titan_mm.data.chat import ChatDocumentBuilder
from titan_mm.data.documents import DocumentBuilder
from titan_mm.data.image import ImageProcessor
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.generate import (InferenceModel, KVCache, Sampling, chat_prompt, completion_text, generate,
                               generate_stream, text_prompt)
from titan_mm.hf.io import load_hf_state_dict
from titan_mm.models import get_model_spec
from titan_mm.objectives.causal_lm import CausalLM

transformers = pytest.importorskip("transformers")
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

IMAGE_START, IMAGE_PAD, IMAGE_END = 3, 4, 5  # the bundled tokenizer's
VOCAB = 520
NEW_TOKENS = 32
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-6,
               tie_word_embeddings=False)
FRAMES = [f"frame{i}.png" for i in range(4)]


def qwen3_vl_config():
    config = transformers.Qwen3VLConfig(
        text_config={**DECODER, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [3, 3, 2], "mrope_interleaved": True}},
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_ID, vision_start_token_id=IMAGE_START,
        vision_end_token_id=IMAGE_END, tie_word_embeddings=False)
    return transformers.Qwen3VLForConditionalGeneration, config


def qwen2_5_vl_config():
    config = transformers.Qwen2_5_VLConfig(
        text_config={**DECODER, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1], out_hidden_size=64, tokens_per_second=2),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_ID, vision_start_token_id=IMAGE_START,
        vision_end_token_id=IMAGE_END, tie_word_embeddings=False)
    return transformers.Qwen2_5_VLForConditionalGeneration, config


def llava_config():
    vision = transformers.Siglip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=4, num_patches=36,
                                              vision_use_head=False)
    text = transformers.LlamaConfig(**DECODER, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_PAD,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      projector_hidden_act="gelu", tie_word_embeddings=False)
    return transformers.LlavaForConditionalGeneration, config


def llama_config():
    config = transformers.LlamaConfig(**DECODER, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.LlamaForCausalLM, config


FAMILIES = {"qwen3_vl": qwen3_vl_config, "qwen2_5_vl": qwen2_5_vl_config, "llava": llava_config,
            "llama": llama_config}
# (min_pixels, max_pixels) of the image processor; images below are multiples of patch x merge
PIXELS = {"qwen3_vl": (32 * 32, 128 * 128), "qwen2_5_vl": (28 * 28, 28 * 28 * 24), "llava": (16, 64 * 64),
          "llama": (32 * 32, 128 * 128)}
# name -> (height, width); LLaVA's two images have 24 patches each (HF LLaVA takes no padding)
IMAGES = {"qwen3_vl": {"wide": (32, 160), "tall": (96, 64), "frame": (64, 96)},
          "qwen2_5_vl": {"wide": (28, 140), "tall": (84, 56), "frame": (56, 112)},
          "llava": {"wide": (8, 48), "tall": (16, 24)},
          "llama": {}}


def hf_reference(family: str):
    cls, config = FAMILIES[family]()
    config._attn_implementation = "sdpa"
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return order_one_init_(cls(config).eval())


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for family, sizes in IMAGES.items():
        for name, (h, w) in sizes.items():
            for i in range(4 if name == "frame" else 1):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                PILImage.fromarray(pixels).save(root / f"{family}-{name}{i if name == 'frame' else ''}.png")
    return root


def inference_model(family: str, hf, tok: Tokenizer) -> InferenceModel:
    spec = get_model_spec(family)
    args = spec.hf_adapter.args_from_hf_config(hf.config.to_dict())
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    model.init_weights()
    # the tensors under the names save_pretrained writes (those of published checkpoints)
    load_hf_state_dict(model, spec.hf_adapter, revert_weight_conversion(hf, hf.state_dict()))
    vision = args.vision_input
    processor = ImageProcessor(vision, *PIXELS[family])
    return InferenceModel(model.eval(), args, tok, CausalLM(vocab_parallel=False, loss_parallel=False),
                          DocumentBuilder(tok, processor, vision.positions_fn),
                          ChatDocumentBuilder(tok, processor, "plain", vision.positions_fn), source="test")


def image(family: str, name: str) -> dict:
    return {"type": "image", "image": f"{family}-{name}.png"}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def prompts(family: str) -> dict[str, list[dict]]:
    """Interleaved prompts: two images (and a video for the Qwen families), and a shorter one."""
    if family == "llama":
        return {"long": [text("a red circle at the top left of a blue square, and then")],
                "short": [text("green")]}
    video = {"type": "video", "video": [f"{family}-{f}" for f in FRAMES], "fps": 2.0}
    media = [video] if family.startswith("qwen") else []
    return {"long": [text("look at "), image(family, "wide"), text(" and "), *media, image(family, "tall"),
                     text(" then")],
            "short": [image(family, "tall"), text("a")]}


def hf_inputs(family: str, doc, hf) -> dict:
    """What the family's HF processor would hand ``generate``: ids, and our patches."""
    ids = torch.tensor([doc.tokens])
    inputs = {"input_ids": ids}
    images = [m for m in doc.images if not m.is_video]
    videos = [m for m in doc.images if m.is_video]
    if family == "llava" and images:
        # generate encodes images with get_image_features' named arguments only, which leave out
        # SigLIP2's spatial_shapes and pixel_attention_mask: the features are given pre-encoded, by
        # the HF model itself (generate's mm_encoder_outputs)
        with torch.no_grad():
            features = hf.model.get_image_features(
                torch.stack([m.patches for m in images]), return_dict=True,
                spatial_shapes=torch.tensor([m.grid[1:] for m in images]),
                pixel_attention_mask=torch.ones(len(images), images[0].patches.shape[0], dtype=torch.long))
        inputs["mm_encoder_outputs"] = {"image": features}
    elif family.startswith("qwen"):
        inputs["mm_token_type_ids"] = (ids == IMAGE_PAD).long() + 2 * (ids == VIDEO_ID).long()
        if images:
            inputs.update(pixel_values=torch.cat([m.patches for m in images]),
                          image_grid_thw=torch.tensor([m.grid for m in images]))
        if videos:
            inputs.update(pixel_values_videos=torch.cat([m.patches for m in videos]),
                          video_grid_thw=torch.tensor([m.grid for m in videos]))
            if family == "qwen2_5_vl":
                inputs["second_per_grid_ts"] = torch.tensor([m.seconds_per_temporal_patch for m in videos])
    return inputs


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_models(request, tok):
    hf = hf_reference(request.param)
    return request.param, hf, inference_model(request.param, hf, tok)


GREEDY = Sampling(max_new_tokens=NEW_TOKENS, stop_token_ids=())


def test_greedy_tokens_equal_transformers_generate(family_models, media_root):
    """32 greedy tokens from a prompt with two images (and a video for the Qwen families) equal
    transformers' generate token for token; the output is not a repeated token (which a wrong
    decode position could still match)."""
    family, hf, im = family_models
    doc = text_prompt(im, prompts(family)["long"], str(media_root))
    if family != "llama":
        assert sum(not m.is_video for m in doc.images) == 2
    ours = generate(im, [doc], GREEDY)[0]
    with torch.no_grad():
        theirs = hf.generate(**hf_inputs(family, doc, hf), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(doc.tokens):].tolist()
    print(f"{family}: {len(set(ours))} distinct tokens of {len(ours)}")
    assert len(ours) == NEW_TOKENS and len(set(ours)) >= 4
    assert ours == theirs


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(family_models, media_root):
    family, _, im = family_models
    docs = [text_prompt(im, p, str(media_root)) for p in prompts(family).values()]
    docs.append(chat_prompt(im, [{"role": "user", "content": [text("what is it?")]}]))
    assert len({len(d.tokens) for d in docs}) == 3
    batched = generate(im, docs, GREEDY)
    assert batched == [generate(im, [d], GREEDY)[0] for d in docs]


@pytest.fixture(scope="module")
def qwen3(tok):
    hf = hf_reference("qwen3_vl")
    return inference_model("qwen3_vl", hf, tok)


def test_stop_tokens_and_strings_end_a_row_where_they_occur(qwen3, media_root):
    doc = text_prompt(qwen3, prompts("qwen3_vl")["long"], str(media_root))
    full = generate(qwen3, [doc], GREEDY)[0]
    stop = full[5]
    cut = generate(qwen3, [doc], dataclasses.replace(GREEDY, stop_token_ids=(stop,)))[0]
    assert cut == full[:full.index(stop)]
    stop_string = qwen3.tokenizer.decode(full[6:8])
    ids = generate(qwen3, [doc], dataclasses.replace(GREEDY, stop_strings=(stop_string,)))[0]
    text_ = completion_text(qwen3.tokenizer, ids, (stop_string,))
    assert stop_string in qwen3.tokenizer.decode(ids) and stop_string not in text_
    assert ids == full[:len(ids)] and len(ids) <= 8


def test_stream_yields_one_token_per_step_and_none_after_a_row_stops(qwen3, media_root):
    docs = [text_prompt(qwen3, p, str(media_root)) for p in prompts("qwen3_vl").values()]
    full = generate(qwen3, docs, GREEDY)
    stop = full[0][3]
    steps = list(generate_stream(qwen3, docs, dataclasses.replace(GREEDY, stop_token_ids=(stop,))))
    first = [s[0] for s in steps]
    assert first[:3] == full[0][:3] and all(t is None for t in first[3:])
    assert [s[1] for s in steps if s[1] is not None] == generate(
        qwen3, docs[1:], dataclasses.replace(GREEDY, stop_token_ids=(stop,)))[0]


def test_streams_that_share_the_model_interleaved_step_by_step_give_their_own_tokens(qwen3, media_root):
    docs = [text_prompt(qwen3, p, str(media_root)) for p in prompts("qwen3_vl").values()]
    alone = [generate(qwen3, [d], GREEDY)[0] for d in docs]
    streams = [generate_stream(qwen3, [d], GREEDY) for d in docs]
    interleaved = [[], []]
    for steps in zip(*streams):
        for out, step in zip(interleaved, steps):
            out.append(step[0])
    assert interleaved == alone


def test_sampling_top_k_1_and_tiny_top_p_are_greedy_and_seeds_reproduce(qwen3, media_root):
    doc = text_prompt(qwen3, prompts("qwen3_vl")["short"], str(media_root))
    greedy = generate(qwen3, [doc], GREEDY)[0]
    for s in (Sampling(NEW_TOKENS, temperature=1.0, top_k=1, stop_token_ids=(), seed=1),
              Sampling(NEW_TOKENS, temperature=1.0, top_p=1e-6, stop_token_ids=(), seed=1)):
        assert generate(qwen3, [doc], s)[0] == greedy
    sampled = Sampling(NEW_TOKENS, temperature=1.0, top_k=50, top_p=0.9, stop_token_ids=(), seed=3)
    first = generate(qwen3, [doc], sampled)[0]
    assert first == generate(qwen3, [doc], sampled)[0] and first != greedy


def test_chat_prompt_is_the_training_document_cut_where_the_answer_starts(qwen3, media_root):
    messages = [{"role": "user", "content": [image("qwen3_vl", "tall"), text("what is it?")]}]
    prompt = chat_prompt(qwen3, messages, str(media_root))
    trained = qwen3.chat_builder.chat("x", messages + [{"role": "assistant", "content": "a cat"}],
                                      str(media_root))
    answer = qwen3.tokenizer.encode("a cat")
    assert trained.tokens[:len(prompt.tokens) + len(answer)] == prompt.tokens + answer
    assert torch.equal(trained.positions[:, :len(prompt.tokens)], prompt.positions)
    assert qwen3.stop_token_ids() == (qwen3.tokenizer.eos_id,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_gives_the_eager_tokens(qwen3, media_root):
    qwen3.model.cuda()
    try:
        docs = [text_prompt(qwen3, p, str(media_root)) for p in prompts("qwen3_vl").values()]
        assert generate(qwen3, docs, GREEDY, cuda_graph=True) == generate(qwen3, docs, GREEDY)
    finally:
        qwen3.model.cpu()


def test_cache_is_attached_only_inside_its_block(qwen3):
    decoder = qwen3.model.decoder
    before = decoder.build_mask, [layer.attention.attend for layer in decoder.layers.values()]
    cache = KVCache.for_decoder(decoder, 1, 8, dtype=torch.float32, device="cpu")
    with cache.attached(decoder):
        assert decoder.build_mask == cache.build_mask
    assert decoder.build_mask is before[0]
    assert [layer.attention.attend for layer in decoder.layers.values()] == before[1]


def test_generate_script_answers_a_prompt_with_an_image_from_a_dcp_checkpoint(tmp_path, capsys):
    """scripts/generate.py on the debug VLM's (random-init) DCP weights: a raw continuation of an
    image and a prompt, 6 greedy tokens, and a chat session of two turns (the second sees the
    first's answer)."""
    from conftest import load_script
    from test_parallel import seed_checkpoint
    weights = seed_checkpoint(tmp_path)
    script = load_script("generate")
    common = ["--job.config_file", "train_configs/debug_vlm.toml", "--checkpoint", weights,
              "--max_new_tokens", "6", "--image", "assets/sample_data/images/00000.png"]
    assert script.main([*common, "--prompt", "a red"]) == 0
    assert capsys.readouterr().out.strip()
    lines = ["hello", "/image assets/sample_data/images/00001.png", "and this one?", "/quit"]
    script.input = lambda _prompt: lines.pop(0)
    answers = []
    answer = script.Session.answer
    script.Session.answer = lambda self, messages: answers.append(messages) or answer(self, messages)
    assert script.main([*common, "--interactive", "--mode", "chat"]) == 0
    assert not lines and "error" not in capsys.readouterr().out
    # the second turn carries the first, its answer, and the image attached in between
    assert [m["role"] for m in answers[1]] == ["user", "assistant", "user"]
    assert [p["type"] for p in answers[1][2]["content"]] == ["image", "text"]


def test_generate_script_routes_a_masked_diffusion_run_to_its_sampler(tmp_path, capsys):
    from conftest import load_script
    from test_parallel import seed_checkpoint
    weights = seed_checkpoint(tmp_path, "--objective.name", "mdlm")
    assert load_script("generate").main([
        "--job.config_file", "train_configs/mdlm_vlm_debug.toml", "--checkpoint", weights,
        "--image", "assets/sample_data/images/00000.png", "--gen_length", "8", "--steps", "4",
        "--block_length", "4"]) == 0
    out = capsys.readouterr().out
    assert out.strip() and "<|mask|>" not in out
