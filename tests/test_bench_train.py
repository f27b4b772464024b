"""scripts/bench_train.py measures the trainer end to end; scripts/make_realistic_data.py makes the
data it is measured on."""

import hashlib
import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT
from titan_mm.config import Data, JobConfig, load_toml
from titan_mm.data.dataloader import build_dataloader
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.models import get_model_spec

sys.path.insert(0, f"{ROOT}/scripts")


def test_bench_train_reports_consistent_figures_of_the_real_trainer(tmp_path, capsys):
    import bench_train
    out = tmp_path / "result.json"
    code = bench_train.main(["--job.config_file", "train_configs/debug_vlm.toml", "--training.seq_len", "256",
                             "--data.image_slots_per_row", "10", "--warmup", "1", "--steps", "2",
                             "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert set(bench_train.FIELDS) <= set(r)
    assert r["mfu"] is None  # no peak FLOP/s on CPU
    assert 0 <= r["token_padding"] < 1 and 0 < r["patch_padding"] < 1 and 0 <= r["data_wait"] < 1
    assert r["useful_tokens_per_s"] > 0 and r["images_per_s"] > 0 and r["peak_mem_gib"] > 0
    # useful tokens of a step = the row's slots less its padding (one row of 256 per step)
    assert r["useful_tokens_per_s"] * r["step_s"] == pytest.approx(256 * (1 - r["token_padding"]), rel=1e-6)
    # the config printed and saved is the one trained: 3 steps, nothing written
    cfg = JobConfig()
    (tmp_path / "used.toml").write_text(r["config"])
    load_toml(cfg, str(tmp_path / "used.toml"))
    assert cfg.training.steps == 3 and not cfg.checkpoint.enable and cfg.training.seq_len == 256
    assert "config used:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realistic")
    args = [sys.executable, "scripts/make_realistic_data.py", "--captions", "6", "--chats", "4", "--videos", "1",
            "--jobs", "2"]
    subprocess.run(args + ["--out", str(folder / "a")], check=True, timeout=600)
    subprocess.run(args + ["--out", str(folder / "b"), "--kinds", "captions"], check=True, timeout=600)
    return folder


def digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generated_data_is_a_function_of_the_seed(realistic):
    assert digest(realistic / "a" / "captions") == digest(realistic / "b" / "captions")


def test_generated_captions_have_varied_jpegs_and_20_to_120_words(realistic):
    folder = realistic / "a" / "captions"
    rows = [json.loads(line) for line in open(folder / "captions.jsonl")]
    assert len(rows) == 6 and all(set(r) == {"id", "image", "caption"} for r in rows)
    sizes = set()
    for r in rows:
        assert 20 <= len(r["caption"].split()) <= 120
        with Image.open(folder / r["image"]) as img:
            assert img.format == "JPEG"
            w, h = img.size
            # textured: far more bytes than a flat colour of that size compresses to
            assert (folder / r["image"]).stat().st_size > w * h / 20
        assert 224 <= min(w, h) and max(w, h) <= 1024 and max(w, h) / min(w, h) <= 4
        sizes.add((w, h))
    assert len(sizes) == 6


def test_generated_chats_have_1_to_4_images_and_train_through_the_loader(realistic):
    folder = realistic / "a" / "chat"
    rows = [json.loads(line) for line in open(folder / "chat.jsonl")]
    for r in rows:
        images = [p for m in r["messages"] if m["role"] == "user" for p in m["content"] if p["type"] == "image"]
        assert 1 <= len(images) <= 4 and sum(m["role"] == "assistant" for m in r["messages"]) >= 1
    spec = get_model_spec("qwen2_5_vl").flavors["debug"].vision_input
    cfg = Data(dataset="chat", path=str(folder / "chat.jsonl"), image_slots_per_row=20, patches_per_slot=64,
               min_pixels=1024, max_pixels=12544, pack_open_bins=1)
    batch = next(iter(build_dataloader(cfg, Tokenizer("assets/tokenizer"), spec, seq_len=4096, batch_size=1,
                                       dp_rank=0, dp_world=1, seed=0)))
    assert batch["stats"]["documents"] >= 1 and (batch["grid_thw"][..., 0] >= 0).any()


def test_generated_videos_decode_through_the_loader_with_the_written_tokenizer(realistic):
    pytest.importorskip("torchcodec")
    folder = realistic / "a" / "video"
    spec = get_model_spec("qwen2_5_vl").flavors["debug"].vision_input
    cfg = Data(dataset="chat", path=str(folder / "chat.jsonl"), image_slots_per_row=20, patches_per_slot=64,
               min_pixels=1024, max_pixels=12544, video_max_frames=4, pack_open_bins=1)
    tok = Tokenizer(str(folder / "tokenizer"))
    batch = next(iter(build_dataloader(cfg, tok, spec, seq_len=2048, batch_size=1, dp_rank=0, dp_world=1,
                                       seed=0)))
    assert not {k for k in batch["stats"] if "video" in k}  # nothing skipped as a bad video
    assert (batch["input_ids"] == tok.video_id).any()
