"""Qwen2.5-VL: exact parity with transformers (processor, M-RoPE positions, ViT, logits), HF
checkpoint round trips, and the debug flavor learning on CPU.

References are a tiny random-init Qwen2_5_VLForConditionalGeneration built from a config object
(fp32, eval, eager attention) and the PIL image processor. Our batches come from our own data code
(DocumentBuilder over image / frame files -> build_row -> collate_rows); weights reach our model
through Qwen2_5_VLAdapter.from_hf, the mapping checkpoint conversion uses.
"""

import json
import os

import pytest
import torch
from PIL import Image

from conftest import forward_on_meta
from titan_mm.config import parse_args
from titan_mm.data.dataloader import collate_rows
from titan_mm.data.documents import Document, DocumentBuilder
from titan_mm.data.documents import Image as Media
from titan_mm.data.image import ImageProcessor, VisionInputSpec, patchify
from titan_mm.data.packing import RowShape, build_row
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.hf.io import load_hf_state_dict, load_hf_weights, write_hf_folder
from titan_mm.models.qwen2_5_vl import FLAVORS, SPEC
from titan_mm.models.qwen2_5_vl.hf_adapter import Qwen2_5_VLAdapter
from titan_mm.models.qwen2_5_vl.model import CLIP_MEAN, CLIP_STD, Qwen2_5_VLModel
from titan_mm.models.qwen2_5_vl.positions import mrope_position_ids

transformers = pytest.importorskip("transformers")
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

TOL = 1e-4
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 24
MAX_PATCHES = (MAX_PIXELS // 28 ** 2) * 4
SPEC_PATCH_DIM = 3 * 2 * 14 * 14
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
            "<|video_pad|>", "<|unk|>"]
WORDS = "a an the red green blue circle square triangle at top bottom left right and of video shows".split()
PAD, BOS, EOS, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = range(7)
MODEL_INPUTS = ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw", "image_token_index")
ADAPTER = Qwen2_5_VLAdapter()


def tiny_hf_config(tie: bool = False):
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(SPECIALS) + len(WORDS), rms_norm_eps=1e-6,
                         max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        # windows of 56 px = 2 x 2 merged patches; layers 1 and 3 attend over the whole frame
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1, 3], out_hidden_size=64, tokens_per_second=2),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def tiny_hf_model(tie: bool = False, seed: int = 0, config=None):
    torch.manual_seed(seed)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(config or tiny_hf_config(tie)).eval()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():  # norms at ones and biases at zero would hide a swapped or missing one
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def ours_from_hf(hf) -> Qwen2_5_VLModel:
    args = ADAPTER.args_from_hf_config(hf.config.to_dict())
    with torch.device("meta"):
        model = Qwen2_5_VLModel(args)
    model.to_empty(device="cpu")
    model.init_weights()
    # the tensors under the names save_pretrained writes (those of the released checkpoints)
    load_hf_state_dict(model, ADAPTER, revert_weight_conversion(hf, hf.state_dict()))
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def model(hf_model):
    return ours_from_hf(hf_model)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """A word-level tokenizer with Qwen-style placeholder tokens, and random images / video frames."""
    root = tmp_path_factory.mktemp("qwen2_5_vl")
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    tok = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "image_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
        "image_end_token": "<|vision_end|>", "video_token": "<|video_pad|>"}))
    g = torch.Generator().manual_seed(0)
    # resized to 84 x 56, 28 x 140 and 140 x 112 px (windows of 4 x 4 patches, the last column /
    # row of windows cut short); frames to 56 x 112
    sizes = {"tall.png": (90, 60), "wide.png": (40, 150), "big.png": (130, 110),
             **{f"frame{i}.png": (60, 100) for i in range(5)}}
    for name, (h, w) in sizes.items():
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
        Image.fromarray(pixels.numpy()).save(root / name)
    return root


def builder_for(model: Qwen2_5_VLModel, media_dir) -> DocumentBuilder:
    spec = model.args.vision_input
    return DocumentBuilder(Tokenizer(str(media_dir)), ImageProcessor(spec, MIN_PIXELS, MAX_PIXELS),
                           spec.positions_fn)


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def video(n_frames: int, fps: float = 2.0) -> dict:
    return {"type": "video", "video": [f"frame{i}.png" for i in range(n_frames)], "fps": fps}


DOCS = {
    "text_only": [text("a red circle at the top left and a blue square")],
    "one_image": [{"type": "image", "image": "tall.png"}, text("a green triangle at the bottom right")],
    "three_images": [text("the top"), {"type": "image", "image": "wide.png"}, text("a red square"),
                     {"type": "image", "image": "big.png"}, {"type": "image", "image": "tall.png"},
                     text("a blue circle and a green triangle")],
    # 4 frames at 2 fps: temporal ids 0 and 2, within the spatial extent (see the test below)
    "video_and_image": [text("the video shows"), video(4), text("and"),
                        {"type": "image", "image": "tall.png"}, text("a red circle at the top")],
}


def batch_of(docs: list[Document]) -> dict:
    shape = RowShape(seq_len=160, image_slots=4, patches_per_slot=MAX_PATCHES, patch_dim=SPEC_PATCH_DIM,
                     merge_area=4, pad_id=PAD, media_token_ids=(IMAGE_PAD, VIDEO_PAD), position_dims=3)
    return collate_rows([build_row(docs, shape)], MAX_PATCHES // 4)


def hf_inputs(doc: Document, media_dir) -> dict:
    """What the HF processor would hand the model for ``doc``: images through
    Qwen2VLImageProcessorPil, videos as our patches (their processor needs torchvision; the
    processor parity tests below cover both)."""
    ids = torch.tensor([doc.tokens])
    inputs = {"input_ids": ids,
              "mm_token_type_ids": (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()}
    images = [m for m in doc.images if not m.is_video]
    videos = [m for m in doc.images if m.is_video]
    if images:
        processor = hf_image_processor()
        pil = [Image.open(media_dir / name).convert("RGB") for name in image_names(doc)]
        out = processor(images=pil, return_tensors="pt")
        inputs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
    if videos:
        inputs.update(pixel_values_videos=torch.cat([v.patches for v in videos]),
                      video_grid_thw=torch.tensor([v.grid for v in videos]),
                      second_per_grid_ts=torch.tensor([v.seconds_per_temporal_patch for v in videos]))
    return inputs


def image_names(doc: Document) -> list[str]:
    return [part["image"] for part in DOCS[doc.ref] if part["type"] == "image"]


def hf_image_processor():
    return transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def build_doc(model, media_dir, name: str) -> Document:
    return builder_for(model, media_dir).interleaved(name, DOCS[name], str(media_dir))


@pytest.mark.parametrize("name", list(DOCS))
def test_logits_match_hf(model, hf_model, media_dir, name):
    """Our logits vs Qwen2_5_VLForConditionalGeneration's, max abs diff <= 1e-4 (fp32). A second,
    text-only document packed into the same row must not disturb the first."""
    doc = build_doc(model, media_dir, name)
    filler = build_doc(model, media_dir, "text_only")
    batch = batch_of([doc, filler])
    with torch.no_grad():
        ours = model.decoder.logits(model(**{k: batch[k] for k in MODEL_INPUTS}))[0]
        inputs = hf_inputs(doc, media_dir)
        positions, _ = hf_model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts"))
        theirs = hf_model(**inputs).logits[0]
        filler_theirs = hf_model(input_ids=torch.tensor([filler.tokens])).logits[0]
    n = len(doc.tokens)
    if doc.images:  # text-only prompts carry no mm inputs, and HF numbers them 0..n-1 itself
        assert torch.equal(batch["position_ids"][0, :, :n], positions[:, 0]), "M-RoPE position ids differ"
    diff = (ours[:n] - theirs).abs().max().item()
    assert diff <= TOL, f"{name}: max abs logit diff {diff:.2e}"
    filler_diff = (ours[n:n + len(filler.tokens)] - filler_theirs).abs().max().item()
    assert filler_diff <= TOL, f"{name}: packed second document differs by {filler_diff:.2e}"


def flat_hub_config_with_yarn() -> dict:
    """The tiny model's config.json in the released checkpoints' flat layout (text fields at the top
    level, ``rope_scaling`` with ``type``), with the YaRN entry Qwen's model card says to add for
    inputs over 32k tokens: original context 64 here, so that the ramp falls inside the tiny
    model's 8 frequencies (3 kept, 5 interpolated)."""
    config = tiny_hf_config().to_dict()
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    return {**config, **text, "model_type": "qwen2_5_vl", "max_position_embeddings": 256,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "yarn", "mrope_section": rope["mrope_section"], "factor": 4.0,
                             "original_max_position_embeddings": 64}}


def test_yarn_rope_scaling_matches_hf(media_dir):
    """A config.json with YaRN rope_scaling loads as YaRN with M-RoPE: logits equal
    transformers' (max abs diff <= 1e-4) on text, images and a video, where plain RoPE on the same
    weights is far off (it was loaded silently before)."""
    import dataclasses
    from titan_mm.models.rope import YarnRopeScaling
    config = flat_hub_config_with_yarn()
    hf = tiny_hf_model(config=transformers.Qwen2_5_VLConfig(**config))
    assert hf.model.language_model.rotary_emb.rope_type == "yarn"
    args = ADAPTER.args_from_hf_config(config)
    assert args.decoder.rope_scaling == YarnRopeScaling(factor=4.0, original_max_position_embeddings=64)
    exported = transformers.Qwen2_5_VLConfig(**ADAPTER.hf_config(args))
    assert exported.text_config.rope_parameters["rope_type"] == "yarn"
    assert ADAPTER.args_from_hf_config(exported.to_dict()) == args
    ours = ours_from_hf(hf)
    plain_rope = dataclasses.replace(args.decoder, rope_scaling=None)
    plain = Qwen2_5_VLModel(dataclasses.replace(args, decoder=plain_rope))
    plain.load_state_dict(ours.state_dict())
    for name in ("three_images", "video_and_image"):
        doc = build_doc(ours, media_dir, name)
        batch = {k: v for k, v in batch_of([doc]).items() if k in MODEL_INPUTS}
        n = len(doc.tokens)
        with torch.no_grad():
            theirs = hf(**hf_inputs(doc, media_dir)).logits[0]
            diff = (ours.decoder.logits(ours(**batch))[0, :n] - theirs).abs().max().item()
            plain_diff = (plain.decoder.logits(plain.eval()(**batch))[0, :n] - theirs).abs().max().item()
        assert diff <= TOL, f"{name}: YaRN logits differ from HF by {diff:.2e}"
        assert plain_diff > 100 * TOL, f"{name}: plain RoPE is only {plain_diff:.2e} off; the test shows nothing"


def test_vit_outputs_match_hf(model, hf_model, media_dir):
    """Merged ViT embeddings of three images and a video vs HF's visual tower: max abs diff <= 1e-4."""
    doc = builder_for(model, media_dir).interleaved("mixed", [
        {"type": "image", "image": "wide.png"}, {"type": "image", "image": "big.png"}, video(4),
        {"type": "image", "image": "tall.png"}, text("a")], str(media_dir))
    batch = batch_of([doc])
    Lm = MAX_PATCHES // 4
    with torch.no_grad():
        ours = model.vision(batch["pixel_values"], batch["grid_thw"])
        for slot, media in enumerate(doc.images):
            theirs = hf_model.model.visual(media.patches, grid_thw=torch.tensor([media.grid])).pooler_output
            n = media.patches.shape[0] // 4
            diff = (ours[slot * Lm:slot * Lm + n] - theirs).abs().max().item()
            assert diff <= TOL, f"media {slot} (grid {media.grid}): max abs diff {diff:.2e}"


def test_text_after_a_long_video_resumes_after_its_largest_position(model, media_dir):
    """5 frames at 1 fps: temporal patches 2 s apart give temporal ids 0, 4, 8, beyond the video's
    spatial extent; the following text starts at the block's largest id + 1 (the rule of Qwen's own
    get_rope_index; transformers 5.x resumes at start + max(h, w) / merge instead)."""
    doc = builder_for(model, media_dir).interleaved("long", [video(5, fps=1.0), text("a")], str(media_dir))
    pos = doc.positions
    start = doc.images[0].first_token
    n = doc.images[0].patches.shape[0] // 4
    assert pos[0, start:start + n].unique().tolist() == [start, start + 4, start + 8]
    assert pos[:, start + n].tolist() == [start + 9] * 3  # <|vision_end|>
    assert torch.equal(pos, mrope_position_ids(doc, model.args))


@pytest.mark.parametrize("h,w", [(37, 53), (300, 200), (28, 1000), (1000, 30), (17, 900), (224, 224),
                                 (480, 641)])
def test_image_processor_matches_hf_exactly(h, w):
    """Pixel patches and grid equal, bit for bit, Qwen2VLImageProcessorPil's with the settings of
    Qwen2.5-VL's preprocessor_config.json, incl. aspect ratios up to 53:1."""
    g = torch.Generator().manual_seed(h * 1000 + w)
    img = Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy())
    min_pixels, max_pixels = 3136, 12845056
    patches, coords = ImageProcessor(FLAVORS["7B"].vision_input, min_pixels, max_pixels)(img)
    ref = transformers.Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))(images=[img], return_tensors="pt")
    assert (coords.amax(0) + 1).tolist() == ref["image_grid_thw"][0].tolist()
    assert torch.equal(patches, ref["pixel_values"])


def test_video_processor_matches_hf():
    """Frames [T, C, H, W] (odd T, resized): patches equal Qwen2VLVideoProcessor's up to float32
    rounding (HF folds 1/255 into the mean and std), grid exactly."""
    pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, 3, 50, 90), dtype=torch.uint8, generator=g)
    patches, coords = ImageProcessor(FLAVORS["7B"].vision_input, MIN_PIXELS, MAX_PIXELS).video(frames)
    ref = transformers.Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                             cap_pixels_per_frame=False)(videos=[frames], return_tensors="pt")
    assert (coords.amax(0) + 1).tolist() == ref["video_grid_thw"][0].tolist()
    assert torch.allclose(patches, ref["pixel_values_videos"], rtol=0, atol=1e-6)


def test_still_video_is_the_image_and_odd_frames_repeat_the_last():
    spec = VisionInputSpec(14, 2, 2, CLIP_MEAN, CLIP_STD)
    processor = ImageProcessor(spec, MIN_PIXELS, MAX_PIXELS)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 3, 56, 84), dtype=torch.uint8, generator=g)
    image_patches, image_coords = processor(Image.fromarray(frames[0].permute(1, 2, 0).numpy()))
    still_patches, still_coords = processor.video(frames[:1].expand(2, -1, -1, -1))
    assert torch.equal(still_patches, image_patches) and torch.equal(still_coords, image_coords)
    patches, coords = processor.video(frames)
    assert coords[:, 0].max() == 1  # 3 frames -> 2 temporal patches
    last = patches[coords[:, 0] == 1].view(-1, 3, 2, 14 * 14)
    assert torch.equal(last[:, :, 0], last[:, :, 1])


def test_hf_checkpoint_round_trips_bit_for_bit(tmp_path):
    """save_pretrained -> load_hf_weights (DCP's HF reader) -> to_hf equals the file bit for bit;
    write_hf_folder's output loads in transformers and gives identical logits (tied embeddings, as
    the 3B checkpoint)."""
    hf = tiny_hf_model(tie=True, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    args = ADAPTER.args_from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert args.decoder.tie_embeddings
    with torch.device("meta"):
        model = Qwen2_5_VLModel(args)
    model.to_empty(device="cpu")
    model.init_weights()
    load_hf_weights(model, ADAPTER, str(tmp_path / "hf"))
    from safetensors.torch import load_file
    saved = {}
    for name in os.listdir(tmp_path / "hf"):
        if name.endswith(".safetensors"):
            saved.update(load_file(tmp_path / "hf" / name))
    exported = ADAPTER.to_hf(model.state_dict())
    assert sorted(exported) == sorted(saved)
    assert all(torch.equal(exported[k], saved[k]) for k in saved)

    write_hf_folder(exported, ADAPTER.hf_config(args), str(tmp_path / "out"))
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    assert ADAPTER.args_from_hf_config(reloaded.config.to_dict()) == args
    inputs = {"input_ids": torch.tensor([[BOS, VISION_START] + [IMAGE_PAD] * 6 + [VISION_END, 8, 9, EOS]]),
              "pixel_values": torch.randn(24, SPEC_PATCH_DIM), "image_grid_thw": torch.tensor([[1, 6, 4]])}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_PAD).int()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, hf(**inputs).logits)


def test_hf_config_round_trips_for_every_flavor():
    adapter = SPEC.hf_adapter
    for name, args in FLAVORS.items():
        config = adapter.hf_config(args)
        assert adapter.args_from_hf_config(config) == args, name
        transformers.Qwen2_5_VLConfig(**config)  # transformers accepts it


def test_forward_has_no_host_syncs(media_dir):
    """A forward on the meta device, where no tensor holds data: any .item(), .tolist(), .cpu() or
    data-dependent branch raises (conftest.forward_on_meta)."""
    shape = RowShape(seq_len=64, image_slots=2, patches_per_slot=64, patch_dim=SPEC_PATCH_DIM, merge_area=4,
                     pad_id=PAD, media_token_ids=(IMAGE_PAD,), position_dims=3)
    patches, coords = patchify(torch.randn(2, 3, 56, 56), patch=14, temporal_patch=2, merge=2)
    tokens = [BOS, VISION_START] + [IMAGE_PAD] * 4 + [VISION_END, 8, EOS]
    doc = Document("fake", tokens, [False] * 7 + [True] * 2, [Media(patches, coords, first_token=2)])
    doc.positions = mrope_position_ids(doc, FLAVORS["debug"])
    batch = collate_rows([build_row([doc], shape)], 16)
    logits = forward_on_meta(Qwen2_5_VLModel, FLAVORS["debug"], {k: batch[k] for k in MODEL_INPUTS})
    assert logits.shape == (1, 64, FLAVORS["debug"].decoder.vocab_size)


@pytest.fixture
def one_thread():
    """Matrices this small gain nothing from a second thread, and on a busy machine the thread
    pool's hand-offs cost several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_debug_flavor_trains_on_bundled_captions(tmp_path, one_thread):
    """100 steps of train_configs/qwen2_5_vl_debug.toml (bundled tokenizer and captions, rows of 128
    tokens): the mean loss of the last 10 steps is well below that of the first 10."""
    import train
    cfg, _ = parse_args([
        "--job.config_file", "train_configs/qwen2_5_vl_debug.toml",
        "--job.dump_folder", str(tmp_path / "run"), "--metrics.enable_tensorboard", "false", "--checkpoint.enable", "false", "--training.steps", "100",
        "--training.seq_len", "128", "--data.image_slots_per_row", "6", "--metrics.log_freq", "50"])
    trainer = train.Trainer(cfg)
    trainer.train()
    losses = [loss.item() for loss in trainer.losses]
    print(f"loss: first 10 steps {sum(losses[:10]) / 10:.3f}, last 10 {sum(losses[-10:]) / 10:.3f}")
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
