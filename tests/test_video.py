"""Video files decoded with torchcodec: frame sampling, placeholders, bad files, packing.

Clips are made at test time with the ffmpeg CLI (testsrc, 64 x 48, 10 frames a second, 1.2 s = 12
frames); the tests are skipped when ffmpeg or torchcodec is unavailable.
"""

import json
import shutil
import subprocess
from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from titan_mm.config import Data
from titan_mm.data.dataloader import build_dataloader
from titan_mm.data.documents import DocumentBuilder
from titan_mm.data.image import ImageProcessor
from titan_mm.data.sources import StreamingSource
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.data.video import load_video
from titan_mm.models.qwen2_5_vl import FLAVORS

SPEC = FLAVORS["debug"].vision_input  # temporal patches of 2 frames, 14 px patches merged 2 x 2


def _torchcodec_error() -> str | None:
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return str(e)
    return None


pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg CLI is not installed (apt-get install ffmpeg)"),
    pytest.mark.skipif(_torchcodec_error() is not None,
                       reason=f"torchcodec does not import (pip install 'titan_mm[video]'): {_torchcodec_error()}"),
]


def make_clip(path, seconds=1.2, rate=10):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=64x48:rate={rate}",
                    "-t", str(seconds), "-pix_fmt", "yuv420p", str(path)], check=True)


def video_tokenizer(folder) -> Tokenizer:
    """The bundled debug tokenizer plus a <|video_pad|> token."""
    tok = HFTokenizer.from_file("assets/tokenizer/tokenizer.json")
    tok.add_special_tokens(["<|video_pad|>"])
    tok.save(str(folder / "tokenizer.json"))
    shutil.copy("assets/tokenizer/tokenizer_config.json", folder / "tokenizer_config.json")
    return Tokenizer(str(folder), special_tokens={"video_token": "<|video_pad|>"})


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    make_clip(root / "clip.mp4")
    (root / "corrupt.mp4").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.uint8).numpy().tobytes())
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return video_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def decoded(path, indices):
    from torchcodec.decoders import VideoDecoder
    return VideoDecoder(str(path)).get_frames_at(indices).data


@pytest.mark.parametrize("fps, max_frames, indices, seconds", [
    (5, 16, [0, 2, 4, 7, 9, 11], 11 / 5 / 10),     # 1.2 s x 5 fps = 6 frames, first to last
    (10, 4, [0, 4, 7, 11], 11 / 3 / 10),            # capped at max_frames
    (2.5, 16, [0, 6, 11, 11], 11 / 2 / 10),         # 3 frames: the last repeated to an even count
    (0.5, 16, [0, 0], 1 / 10),                      # 1 frame: at least one temporal patch of 2
])
def test_frames_are_sampled_at_fps_capped_even_and_at_least_two(media, fps, max_frames, indices, seconds):
    frames, seconds_per_frame = load_video(str(media / "clip.mp4"), fps, max_frames)
    assert frames.dtype == torch.uint8 and frames.shape == (len(indices), 3, 48, 64)
    assert torch.equal(frames, decoded(media / "clip.mp4", indices))
    assert seconds_per_frame == pytest.approx(seconds)


def test_interleaved_video_file_has_one_placeholder_per_merged_patch(media, tok):
    builder = DocumentBuilder(tok, ImageProcessor(SPEC, 3136, 12544), SPEC.positions_fn, video_fps=5,
                              video_max_frames=8)
    content = [{"type": "text", "text": "Watch."}, {"type": "video", "video": "clip.mp4"},
               {"type": "text", "text": "A test pattern."}]
    doc = builder.interleaved("x", content, str(media))
    (video,) = doc.images
    assert video.is_video and video.grid[0] == 6 // SPEC.temporal_patch_size
    assert doc.tokens.count(tok.video_id) == video.patches.shape[0] // SPEC.merge_area
    assert video.seconds_per_temporal_patch == pytest.approx(11 / 5 / 10 * SPEC.temporal_patch_size)
    assert doc.positions.shape == (3, len(doc.tokens))


def test_corrupt_and_missing_videos_are_skipped_and_counted(media, tok, tmp_path):
    def sample(name, video):
        return json.dumps({"id": name, "content": [{"type": "video", "video": video},
                                                   {"type": "text", "text": "A test pattern."}]})
    path = media / "docs.jsonl"
    path.write_text("\n".join([sample("good", "clip.mp4"), sample("corrupt", "corrupt.mp4"),
                               sample("missing", "nope.mp4")]) + "\n")
    builder = DocumentBuilder(tok, ImageProcessor(SPEC, 3136, 12544), video_max_frames=8)
    source = StreamingSource(str(path), "interleaved", builder, shuffle=False, epochs=1)
    docs = list(source)
    assert [doc.ref.split("(")[1] for _, doc in docs] == ["good)"]
    assert source.stats == Counter(corrupt_video=1, missing_video=1)


def test_chat_sample_with_a_video_packs_into_a_batch(media, tok):
    messages = [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A test pattern."}]
    path = media / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"c{i}", "messages": messages}) for i in range(4)) + "\n")
    cfg = Data(dataset="chat", path=str(path), image_slots_per_row=4, patches_per_slot=64,
               min_pixels=3136, max_pixels=12544, video_fps=5, video_max_frames=8)
    loader = build_dataloader(cfg, tok, SPEC, seq_len=256, batch_size=1, dp_rank=0, dp_world=1, seed=0)
    batch = next(iter(loader))
    placeholders = batch["input_ids"] == tok.video_id
    assert placeholders.any()
    assert torch.equal(placeholders, batch["image_token_index"] >= 0)
    real = batch["grid_thw"][..., 0] >= 0
    assert batch["grid_thw"][..., 0].max() == 6 // SPEC.temporal_patch_size - 1  # 3 temporal patches
    assert int(real.sum()) == int(placeholders.sum()) * SPEC.merge_area
    assert batch["position_ids"].dim() == 3
