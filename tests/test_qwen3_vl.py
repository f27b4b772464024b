"""Qwen3-VL: exact parity with transformers (processor, M-RoPE positions, ViT, DeepStack, logits),
HF checkpoint round trips, and the debug flavor learning on CPU.

References are tiny random-init Qwen3VLForConditionalGeneration models (fp32, eval, sdpa) built from
config objects; weights reach our model through Qwen3VLAdapter.from_hf, the mapping checkpoint
conversion uses. Our batches come from our own data code (DocumentBuilder -> build_row ->
collate_rows); HF gets the same token ids and patches and computes its own position ids.
"""

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file

from conftest import forward_on_meta, make_config, train_losses
from titan_mm.data.dataloader import collate_rows
from titan_mm.data.documents import DocumentBuilder, Image
from titan_mm.data.image import ImageProcessor
from titan_mm.data.packing import RowShape, build_row
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.hf.io import load_hf_state_dict, load_hf_weights, write_hf_folder
from titan_mm.models.llama.model import DecoderArgs
from titan_mm.models.qwen3_vl import FLAVORS, SPEC
from titan_mm.models.qwen3_vl.model import Qwen3VLArgs, Qwen3VLModel, VisionArgs
from titan_mm.models.qwen3_vl.video import timestamped_video_tokens

transformers = pytest.importorskip("transformers")

ADAPTER = SPEC.hf_adapter
TOL = 1e-4
VIDEO_ID = 512  # <|video_pad|>, added to the bundled 512-token tokenizer by the ``tok`` fixture

# 3 ViT layers with DeepStack taps at 0 and 2 (not consecutive, so a wrong level order shows);
# a 4 x 4 position table, upsampled and downsampled by the test grids; real patch/merge sizes
TINY = Qwen3VLArgs(
    vision=VisionArgs(dim=32, n_layers=3, n_heads=2, ffn_hidden_dim=64, num_position_embeddings=16,
                      deepstack_layers=(0, 2)),
    decoder=DecoderArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=128,
                        vocab_size=520, rope_theta=10000.0, qk_norm=True, tie_embeddings=True,
                        mrope_section=(6, 5, 5), mrope_interleaved=True),
    image_token_id=4, video_token_id=VIDEO_ID, vision_start_token_id=3, vision_end_token_id=5)
MIN_PIXELS, MAX_PIXELS = 32 * 32, 128 * 128
SHAPE = RowShape(seq_len=160, image_slots=4, patches_per_slot=64, patch_dim=TINY.vision.patch_dim, merge_area=4,
                 pad_id=0, media_token_ids=(4, VIDEO_ID), position_dims=3)


def hf_config(args: Qwen3VLArgs):
    """The transformers config of ``args``, written out by hand (not through our adapter)."""
    v, d = args.vision, args.decoder
    config = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=d.dim, num_hidden_layers=d.n_layers, num_attention_heads=d.n_heads,
                         num_key_value_heads=d.n_kv_heads, head_dim=d.head_dim,
                         intermediate_size=d.ffn_hidden_dim, vocab_size=d.vocab_size, rms_norm_eps=d.norm_eps,
                         tie_word_embeddings=d.tie_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta,
                                          "mrope_section": list(d.mrope_section), "mrope_interleaved": True}),
        vision_config=dict(depth=v.n_layers, hidden_size=v.dim, num_heads=v.n_heads,
                           intermediate_size=v.ffn_hidden_dim,
                           patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                           spatial_merge_size=v.spatial_merge_size, out_hidden_size=d.dim,
                           num_position_embeddings=v.num_position_embeddings,
                           deepstack_visual_indexes=list(v.deepstack_layers)),
        image_token_id=args.image_token_id, video_token_id=args.video_token_id,
        vision_start_token_id=args.vision_start_token_id, vision_end_token_id=args.vision_end_token_id,
        tie_word_embeddings=d.tie_embeddings)
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    return config


def hf_reference(args: Qwen3VLArgs = TINY, seed: int = 0):
    torch.manual_seed(seed)
    return order_one_init_(transformers.Qwen3VLForConditionalGeneration(hf_config(args)).eval())


@torch.no_grad()
def order_one_init_(model):
    """O(1) activations everywhere (HF's 0.02 init would shrink every branch towards zero and hide
    a wrong mapping below the tolerance); random norms and biases too."""
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
        elif "embed_tokens" in name or "pos_embed" in name:
            p.normal_(0.0, 0.5)
        else:
            p.normal_(0.0, (p.numel() / p.shape[0]) ** -0.5)
    return model


def ours_from_hf(hf_model, args: Qwen3VLArgs = TINY) -> Qwen3VLModel:
    with torch.device("meta"):
        model = Qwen3VLModel(args)
    model.to_empty(device="cpu")
    model.init_weights()
    load_hf_state_dict(model, ADAPTER, hf_model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """The bundled tokenizer plus <|video_pad|> at id 512."""
    folder = tmp_path_factory.mktemp("tokenizer")
    shutil.copy("assets/tokenizer/tokenizer.json", folder)
    with open("assets/tokenizer/tokenizer_config.json") as f:
        config = json.load(f)
    config["video_token"] = "<|video_pad|>"
    config["added_tokens_decoder"] = {str(VIDEO_ID): {"content": "<|video_pad|>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(str(folder))


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    """Random RGB images (name -> (height, width)) and 4 frames of a 64 x 96 video."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    sizes = {"wide": (32, 160), "tall": (128, 64), "square": (96, 96), "small": (20, 40)}
    for i in range(4):
        sizes[f"frame{i}"] = (64, 96)
    for name, (h, w) in sizes.items():
        PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def builder(tok: Tokenizer, args: Qwen3VLArgs = TINY) -> DocumentBuilder:
    spec = args.vision_input
    return DocumentBuilder(tok, ImageProcessor(spec, MIN_PIXELS, MAX_PIXELS), spec.positions_fn)


def video_of_grid(grid: tuple[int, int, int], frame_seconds: list[float]) -> Image:
    """A video of (t, h, w) patches whose sampled frames are at ``frame_seconds`` (the pixels do not
    matter)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    return Image(torch.zeros(len(coords), 1), coords, is_video=True, frame_seconds=tuple(frame_seconds))


def ours_batch(docs):
    return collate_rows([build_row(docs, SHAPE)], SHAPE.patches_per_slot // SHAPE.merge_area)


def hf_inputs(doc) -> dict:
    """What Qwen3VLProcessor would hand the model for ``doc``: ids, token types, patches, grids."""
    ids = torch.tensor(doc.tokens)[None]
    inputs = {"input_ids": ids, "mm_token_type_ids": (ids == 4).long() + 2 * (ids == VIDEO_ID).long()}
    for kind, is_video in (("image", False), ("video", True)):
        media = [m for m in doc.images if m.is_video == is_video]
        if media:
            key = "pixel_values_videos" if is_video else "pixel_values"
            inputs[key] = torch.cat([m.patches for m in media])
            inputs[f"{kind}_grid_thw"] = torch.tensor([m.grid for m in media])
    return inputs


def max_logit_diff(ours: Qwen3VLModel, hf, docs) -> float:
    """Each document of one packed row against HF run on that document alone."""
    batch = ours_batch(docs)
    with torch.no_grad():
        logits = ours.decoder.logits(ours(**{k: batch[k] for k in ("input_ids", "position_ids", "document_ids",
                                                                   "pixel_values", "grid_thw", "image_token_index")}))
        worst, start = 0.0, 0
        for doc in docs:
            n = len(doc.tokens)
            ref = hf(**hf_inputs(doc)).logits[0]
            worst = max(worst, (logits[0, start:start + n] - ref).abs().max().item())
            start += n
    return worst


@pytest.fixture(scope="module")
def models():
    hf = hf_reference()
    return hf, ours_from_hf(hf)


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def image(name: str) -> dict:
    return {"type": "image", "image": f"{name}.png"}


VIDEO = {"type": "video", "video": [f"frame{i}.png" for i in range(4)], "fps": 2.0}

CASES = {
    "text_only": [[text("a plain sentence with no image at all.")]],
    "one_image": [[image("square"), text("a square image.")]],
    # three aspect ratios in one sample, packed after a text-only document
    "three_images": [[text("first a sentence.")],
                     [image("wide"), text("wide, "), image("tall"), text("tall and "), image("small"),
                      text("small.")]],
    "video_and_image": [[text("watch: "), VIDEO, text("then look at "), image("tall"), text(" done.")]],
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, models, tok, media_root):
    """Max abs logit diff <= 1e-4 per document (measured 6e-6 to 2e-5 on logits of O(10)): text
    only; one image; three images of different aspect ratios (1:5, 2:1, 1:1 after resize) in one
    sample, packed after a text-only document; a 4-frame video plus an image. HF computes its own
    M-RoPE ids with get_rope_index, so ours are checked too."""
    hf, ours = models
    b = builder(tok)
    docs = [b.interleaved(f"{case}-{i}", content, str(media_root)) for i, content in enumerate(CASES[case])]
    worst = max_logit_diff(ours, hf, docs)
    print(f"{case}: max abs logit diff {worst:.2e}")
    assert worst <= TOL


def test_vit_and_deepstack_features_match_transformers(models, tok, media_root):
    """Merged ViT embeddings and each DeepStack level against HF's visual tower on the same images
    and video (4 slots of one row, padding included): max abs diff <= 1e-4 (measured ~2e-6)."""
    hf, ours = models
    doc = builder(tok).interleaved("vit", [image("wide"), image("tall"), VIDEO, image("small"), text(".")],
                                   str(media_root))
    batch = ours_batch([doc])
    with torch.no_grad():
        merged, deepstack = ours.vision(batch["pixel_values"], batch["grid_thw"])
        Lm = SHAPE.patches_per_slot // SHAPE.merge_area
        valid = torch.cat([slot * Lm + torch.arange(m.patches.shape[0] // 4)
                           for slot, m in enumerate(doc.images)])
        ref = hf.model.visual(torch.cat([m.patches for m in doc.images]),
                              grid_thw=torch.tensor([m.grid for m in doc.images]))
    assert len(deepstack) == len(ref.deepstack_features) == 2
    diffs = [(merged[valid] - ref.pooler_output).abs().max().item()]
    diffs += [(ours_f[valid] - ref_f).abs().max().item()
              for ours_f, ref_f in zip(deepstack, ref.deepstack_features)]
    print(f"merged / deepstack max abs diffs: {diffs}")
    assert max(diffs) <= TOL
    # DeepStack matters: dropping it moves the logits far beyond the tolerance
    no_deepstack = dataclasses.replace(TINY, vision=dataclasses.replace(TINY.vision, deepstack_layers=()))
    assert max_logit_diff(ours_from_hf(hf, no_deepstack), hf, [doc]) > 100 * TOL


def test_positions_match_get_rope_index(models, tok, media_root):
    """Our per-document M-RoPE ids equal HF's get_rope_index exactly (images of three shapes and a
    video whose temporal patches are separate blocks with timestamp text between them)."""
    hf, _ = models
    content = [text("a "), image("wide"), VIDEO, text("b "), image("tall"), text(".")]
    doc = builder(tok).interleaved("pos", content, str(media_root))
    inputs = hf_inputs(doc)
    ref, _ = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                     inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    assert torch.equal(doc.positions, ref[:, 0])


def hf_video_placeholders(grid: tuple[int, int, int], frames_indices: list[int], fps: float) -> str:
    """Qwen3VLProcessor.replace_video_token's text for a video of ``grid`` whose sampled frames are
    ``frames_indices`` of a video at ``fps`` (the processor's own code, with the bundled
    tokenizer's media token names)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata
    hf_processor = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
        video_token="<|video_pad|>", vision_start_token="<|image_start|>", vision_end_token="<|image_end|>",
        _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a))
    metadata = VideoMetadata(total_num_frames=frames_indices[-1] + 1, fps=fps, frames_indices=list(frames_indices))
    return Qwen3VLProcessor.replace_video_token(
        hf_processor, {"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}, 0)


@pytest.mark.parametrize("frames_indices,fps", [
    (range(6), 2.0), (range(8), 0.7),
    (range(5), 3.0),      # odd: the last temporal patch repeats frame 4, '<1.3 seconds>' (was 1.5)
    ([0, 6, 11], 10.0),   # 3 frames sampled from a 12-frame clip: uneven gaps, odd count
    ([0], 24.0),          # a single frame, paired with itself
])
def test_video_placeholders_match_qwen3vl_processor(tok, frames_indices, fps):
    """Our video tokens equal Qwen3VLProcessor.replace_video_token's string tokenized (timestamps
    '<t seconds>' per temporal patch, the mean of its first and last frame's time, the last frame
    repeated for an odd count)."""
    frames_indices = list(frames_indices)
    grid = ((len(frames_indices) + 1) // 2, 4, 6)
    video = video_of_grid(grid, frame_seconds=[i / fps for i in frames_indices])
    ours = timestamped_video_tokens(tok, video, merge_area=4, temporal_patch_size=2)
    assert ours == tok.encode(hf_video_placeholders(grid, frames_indices, fps))


def test_video_frame_files_get_hf_timestamps(tok, media_root):
    """A video given as 5 frame files at 3 fps, through the document builder: the same placeholder
    tokens as Qwen3VLProcessor writes for frames 0-4 at 3 fps (the last block at '<1.3 seconds>')."""
    video = {"type": "video", "video": [f"frame{i}.png" for i in (0, 1, 2, 3, 0)], "fps": 3.0}
    doc = builder(tok).interleaved("v", [video, text("a video.")], str(media_root))
    (media,) = doc.images
    hf_tokens = tok.encode(hf_video_placeholders(media.grid, list(range(5)), 3.0))
    assert any(doc.tokens[i:i + len(hf_tokens)] == hf_tokens for i in range(len(doc.tokens)))
    assert "<1.3 seconds>" in tok.decode(hf_tokens)


@pytest.mark.parametrize("size", [(224, 224), (37, 500), (1000, 30), (12, 18), (1500, 2000), (333, 100)])
def test_image_processor_matches_transformers(size):
    """Our ImageProcessor (Qwen3-VL: patch 16, merge 2, temporal 2, mean = std = 0.5) against
    transformers' Qwen2VLImageProcessorPil configured as Qwen3-VL's, with Qwen3-VL's pixel budget and
    a small one: same grid and bit-identical patches (measured: max abs diff 0)."""
    spec = FLAVORS["2B"].vision_input
    rng = np.random.default_rng(sum(size))
    img = PILImage.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    for min_pixels, max_pixels in ((65536, 16777216), (32 * 32, 256 * 256)):
        hf = transformers.Qwen2VLImageProcessorPil(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
        ref = hf(images=[img], return_tensors="pt")
        patches, coords = ImageProcessor(spec, min_pixels, max_pixels)(img)
        media = Image(patches, coords)
        assert list(media.grid) == ref["image_grid_thw"][0].tolist()
        assert torch.equal(patches, ref["pixel_values"])


def test_video_patches_match_qwen3vl_video_processor():
    """Qwen3VLVideoProcessor needs torchvision, which is not installed here; its torch-only parts
    are compared: frames that need no resize, normalised and cut by our ImageProcessor.video, equal
    its patchify of the same normalised frames (5 frames: the last temporal patch repeats the last
    frame), and the grid matches. (Run once with torchvision loaded, the whole processor agreed on
    frames of 4-6 x 64x96 to 200x90 px, resized ones included: same grids, patches within 6e-8,
    with its pixel budget set to ours times the frame count.)"""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    spec = FLAVORS["2B"].vision_input
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (5, 3, 64, 96), dtype=torch.uint8, generator=g)
    patches, coords = ImageProcessor(spec, 32 * 32, 256 * 256).video(frames)
    normalised = (frames.float() / 255 - 0.5) / 0.5
    ref, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, normalised[None], patch_size=16, merge_size=2,
                                                    temporal_patch_size=2)
    assert list(Image(patches, coords).grid) == [gt, gh, gw] == [3, 4, 6]
    assert (patches - ref[0]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("tied", [True, False])
def test_hf_checkpoint_load_and_export_round_trip(tmp_path, tied, tok, media_root):
    """save_pretrained of a tiny HF model -> load_hf_weights (DCP HuggingFaceStorageReader, one
    process) -> same logits (<= 1e-4, measured ~1e-5); every tensor our write_hf_folder writes is
    bit-identical to HF's, and transformers loads the export bit-identically (logits diff 0)."""
    untied = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, tie_embeddings=False))
    args = TINY if tied else untied
    hf = hf_reference(args, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    with torch.device("meta"):
        ours = Qwen3VLModel(args)
    ours.to_empty(device="cpu")
    ours.init_weights()
    load_hf_weights(ours, ADAPTER, str(tmp_path / "hf"))
    ours.eval()
    content = [image("tall"), text("x "), VIDEO, text("y.")]
    doc = builder(tok, args).interleaved("rt", content, str(media_root))
    loaded_diff = max_logit_diff(ours, hf, [doc])
    assert loaded_diff <= TOL

    export = tmp_path / "export"
    write_hf_folder(ADAPTER.to_hf(ours.state_dict()), ADAPTER.hf_config(args), str(export))
    written = {k: v for f in export.glob("*.safetensors") for k, v in load_file(f).items()}
    # a tied lm_head is not stored, as in HF's own save_pretrained
    theirs = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(written) == sorted(theirs)
    assert all(torch.equal(written[k], theirs[k]) for k in theirs)
    reloaded = transformers.Qwen3VLForConditionalGeneration.from_pretrained(export, attn_implementation="sdpa")
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():
        inputs = hf_inputs(doc)
        diff = (reloaded.eval()(**inputs).logits - hf(**inputs).logits).abs().max().item()
    print(f"tied={tied}: loaded max abs logit diff {loaded_diff:.2e}, exported {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_hf_config_round_trips_through_transformers(flavor):
    """Our config.json loads as a Qwen3VLConfig and reads back (in both the transformers 5 and the
    hub layout) to the same args."""
    args = FLAVORS[flavor]
    config = ADAPTER.hf_config(args)
    hf_config_obj = transformers.AutoConfig.for_model(**config)
    assert type(hf_config_obj).__name__ == "Qwen3VLConfig"
    assert ADAPTER.args_from_hf_config(hf_config_obj.to_dict()) == args
    assert ADAPTER.args_from_hf_config(config) == args


def test_published_flavor_sizes():
    """Parameter counts of the presets against the released checkpoints (billions)."""
    expected = {"2B": 2.128, "4B": 4.438, "8B": 8.767, "32B": 33.357}
    for flavor, billions in expected.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in Qwen3VLModel(FLAVORS[flavor]).parameters())
        assert abs(n / 1e9 - billions) < 0.001, (flavor, n)


def test_forward_has_no_host_syncs(tok, media_root):
    """A forward on the meta device, where no tensor holds data: any .item(), .tolist(), .cpu() or
    data-dependent branch raises (conftest.forward_on_meta)."""
    doc = builder(tok).interleaved("fake", [image("wide"), VIDEO, text("z.")], str(media_root))
    batch = ours_batch([doc])
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "grid_thw",
                                    "image_token_index")}
    logits = forward_on_meta(Qwen3VLModel, TINY, inputs)
    assert logits.shape == (1, SHAPE.seq_len, TINY.decoder.vocab_size)


def test_training_flops_count_every_matmul():
    """On a row with no padding (one 64-patch image, every token used), training_flops minus its
    attention terms equals 3 x the matmul FLOPs torch's FlopCounterMode sees in a forward
    (patch embedding, ViT blocks, the merger and the 3 DeepStack mergers, decoder, logits)."""
    from torch.utils.flop_counter import FlopCounterMode
    from titan_mm.data.batch import BatchShape
    from titan_mm.data.documents import Document
    from titan_mm.data.image import patchify
    from titan_mm.models.qwen3_vl.model import training_flops
    args = FLAVORS["debug"]
    v, d = args.vision, args.decoder
    media = Image(*patchify(torch.randn(2, 3, 64, 64), v.patch_size, 2, 2), first_token=2)
    n_image, seq_len = media.patches.shape[0] // 4, 40
    tokens = [1, 3] + [4] * n_image + [5] + [7] * (seq_len - n_image - 3)
    doc = Document("full", tokens, [True] * seq_len, [media])
    doc.positions = args.vision_input.positions_fn(doc)
    shape = RowShape(seq_len, 1, media.patches.shape[0], v.patch_dim, 4, 0, (4,), 3)
    batch = collate_rows([build_row([doc], shape)], n_image)
    with torch.device("meta"):
        model = Qwen3VLModel(args)
    model.to_empty(device="cpu")
    model.init_weights()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.decoder.logits(model(**{k: batch[k] for k in ("input_ids", "position_ids", "document_ids",
                                                            "pixel_values", "grid_thw", "image_token_index")}))
    attention = (d.n_layers * 2 * d.n_heads * d.head_dim * seq_len ** 2
                 + v.n_layers * 4 * v.dim * media.patches.shape[0] ** 2)
    assert training_flops(args, BatchShape.of(batch)) == 3 * (counter.get_total_flops() + attention)


def test_debug_flavor_trains_on_bundled_captions(tmp_path):
    """100 steps of the debug flavor on the bundled captions (CPU, 256-token rows of up to 10
    images, ~20 s): the mean loss of the last 10 steps is below 60% of the first 10's (measured
    4.6 -> 0.6)."""
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/qwen3_vl_debug.toml",
                      "--training.steps", "100", "--training.seq_len", "256",
                      "--data.image_slots_per_row", "10", "--checkpoint.enable", "false")
    threads = torch.get_num_threads()
    # one thread: on a busy 2-core machine two OpenMP threads spin-wait on each other and this
    # 20-second run can take minutes
    torch.set_num_threads(1)
    try:
        losses = train_losses(cfg)
    finally:
        torch.set_num_threads(threads)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"loss: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last < 0.6 * first
