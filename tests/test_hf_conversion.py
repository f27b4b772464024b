"""HF <-> DCP conversion and HF folders in training, for the llama and llava families.

Source checkpoints are tiny random transformers models (Qwen3 / Qwen2 / Llama 3.1, and LLaVA with a
SigLIP2 tower and a Qwen3 decoder) of our debug flavors' sizes, saved with save_pretrained in
several shards. Conversion runs through the scripts' own main().
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import load_script, make_config
from titan_mm.data.dataloader import build_dataloader
from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.data.tokenizer import Tokenizer
from titan_mm.hf.adapter import HFAdapter
from titan_mm.models import get_model_spec

transformers = pytest.importorskip("transformers")


def script(name: str):
    return load_script(name).main


def hf_model(family: str, flavor: str, seed: int = 0):
    """A random transformers model with the flavor's config.json."""
    config = get_model_spec(family).hf_adapter.hf_config(get_model_spec(family).flavors[flavor])
    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    if family == "llava":
        model = transformers.LlavaForConditionalGeneration(hf_config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():  # random norms and biases too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def save_in_hub_layout(model, folder):
    """save_pretrained, with a LLaVA's SigLIP2 tower renamed to the vision_tower.vision_model.*
    layout of published checkpoints (transformers 5 drops 'vision_model.' when it saves)."""
    model.save_pretrained(folder, max_shard_size="300KB")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.loads(open(index_path).read())
    rename = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)  # noqa: E731
    for file in set(index["weight_map"].values()):
        tensors = load_file(os.path.join(folder, file))
        save_file({rename(k): v for k, v in tensors.items()}, os.path.join(folder, file), metadata={"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    open(index_path, "w").write(json.dumps(index))


def read_folder(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def random_inputs(family: str, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, vocab, (1, 40), generator=g)
    if family == "llama":
        return dict(input_ids=ids)
    # LLaVA: a 4 x 6 image (patch 8, channels last) at 24 image tokens (id 4)
    ids[0, 5:29] = 4
    return dict(input_ids=ids, pixel_values=torch.randn(1, 24, 192, generator=g),
                pixel_attention_mask=torch.ones(1, 24, dtype=torch.long), spatial_shapes=torch.tensor([[4, 6]]))


@pytest.mark.parametrize("family,flavor,dtype", [
    ("llama", "debug", "fp32"), ("llama", "debug-qwen2", "fp32"), ("llama", "debug-llama3", "bf16"),
    ("llava", "debug-siglip2", "fp32")])
def test_hf_to_dcp_to_hf_is_bit_identical_and_loads_in_transformers(tmp_path, family, flavor, dtype):
    """Every tensor of the re-exported folder equals the source's bit for bit (same names, dtype,
    values); transformers loads it and its logits equal those of the source folder loaded the same
    way (max abs diff 0 measured, 1e-6 allowed). The flavor is inferred from config.json on the way
    in. Sources are in the layout of published checkpoints (what our export writes)."""
    source = hf_model(family, flavor)
    if dtype == "bf16":
        source = source.to(torch.bfloat16)
    save_in_hub_layout(source, tmp_path / "src")
    assert len([f for f in os.listdir(tmp_path / "src") if f.endswith(".safetensors")]) > 1
    assert script("convert_hf_to_dcp")([str(tmp_path / "src"), str(tmp_path / "dcp"), "--model.name", family]) == 0
    assert script("convert_dcp_to_hf")([str(tmp_path / "dcp"), str(tmp_path / "out"), "--model.name", family,
                                        "--model.flavor", flavor, "--dtype", dtype]) == 0
    src, out = read_folder(tmp_path / "src"), read_folder(tmp_path / "out")
    assert sorted(src) == sorted(out)
    for key in src:
        assert src[key].dtype == out[key].dtype and torch.equal(src[key], out[key]), key
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(out)

    # both folders loaded the same way (a model cast to bf16 in memory keeps a bf16 rotary table,
    # one loaded in bf16 does not)
    cls = transformers.LlavaForConditionalGeneration if family == "llava" else transformers.AutoModelForCausalLM
    reloaded, original = (cls.from_pretrained(tmp_path / d).eval() for d in ("out", "src"))
    inputs = random_inputs(family, source.config.get_text_config().vocab_size)
    if dtype == "bf16":
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        diff = (reloaded(**inputs).logits.float() - original(**inputs).logits.float()).abs().max().item()
    print(f"{family}/{flavor} {dtype}: reloaded logits max abs diff {diff:.1e}")
    assert diff <= 1e-6


def test_hf_to_dcp_refuses_a_flavor_that_does_not_match_config_json(tmp_path):
    hf_model("llama", "debug-qwen2").save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="qkv_bias"):
        script("convert_hf_to_dcp")([str(tmp_path / "src"), str(tmp_path / "dcp"), "--model.name", "llama",
                                     "--model.flavor", "debug"])


def first_batch_loss_of(hf, cfg) -> float:
    """The HF model's loss on the trainer's first batch: each packed document run on its own,
    summed token losses over the batch's label tokens (the trainer's normalisation)."""
    tok = Tokenizer(cfg.model.tokenizer_path)
    args = get_model_spec(cfg.model.name).flavors[cfg.model.flavor]
    loader = build_dataloader(cfg.data, tok, args.vision_input, seq_len=cfg.training.seq_len,
                              batch_size=cfg.training.local_batch_size, dp_rank=0, dp_world=1, seed=cfg.job.seed)
    batch = next(iter(loader))
    total = 0.0
    with torch.no_grad():
        for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"]):
            for d in docs[docs >= 0].unique():
                sel = docs == d
                logits = hf(input_ids=ids[sel][None]).logits[0]
                total += F.cross_entropy(logits, labels[sel], reduction="sum", ignore_index=IGNORE_INDEX).item()
    return total / (batch["labels"] != IGNORE_INDEX).sum().item()


def test_training_from_an_hf_folder_starts_at_its_loss_and_exports_hf(tmp_path):
    """llama/debug started with checkpoint.initial_load_hf_path: step 1's loss equals the HF model's
    loss on the same batch (rel 1e-5; measured ~1e-7); the HF folder written at the last step
    (export_hf_path, fp32) loads in transformers with the trained model's logits (<= 1e-4)."""
    import train
    source = hf_model("llama", "debug")
    source.save_pretrained(tmp_path / "src")
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/llama_debug.toml", "--training.seq_len", "128",
                      "--training.steps", "3", "--checkpoint.enable", "false",
                      "--checkpoint.initial_load_hf_path", str(tmp_path / "src"),
                      "--checkpoint.export_hf_path", str(tmp_path / "out"), "--checkpoint.export_hf_dtype", "fp32")
    trainer = train.Trainer(cfg)
    trainer.train()
    expected = first_batch_loss_of(source, cfg)
    print(f"first loss {trainer.losses[0].item():.6f}, HF model {expected:.6f}")
    assert trainer.losses[0].item() == pytest.approx(expected, rel=1e-5)

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(6, 512, (1, 32))
    with torch.no_grad():
        model = trainer.model.eval()
        ours = model.decoder.logits(model(ids, torch.arange(32)[None], torch.zeros(1, 32, dtype=torch.long)))
        diff = (exported(input_ids=ids).logits - ours).abs().max().item()
    assert diff <= 1e-4


def test_llava_trainer_loads_every_weight_from_an_hf_folder(tmp_path):
    """llava/debug-siglip2 with checkpoint.initial_load_hf_path from a transformers 5 save_pretrained
    folder (its own tensor names): every parameter equals its HF tensor."""
    import train
    source = hf_model("llava", "debug-siglip2")
    source.save_pretrained(tmp_path / "src", max_shard_size="300KB")
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/llava_siglip2_debug.toml",
                      "--checkpoint.enable", "false", "--checkpoint.initial_load_hf_path", str(tmp_path / "src"))
    model = train.Trainer(cfg).model
    adapter: HFAdapter = get_model_spec("llava").hf_adapter
    hf_state = source.state_dict()
    for name, value in adapter.to_hf(model.state_dict()).items():
        assert torch.equal(value, hf_state[adapter.stored_name(name, set(hf_state))]), name


def test_fsdp_ranks_load_and_export_an_hf_folder(tmp_path):
    """2 FSDP ranks (torchrun, gloo) start llava/debug-siglip2 from an HF folder (each rank reads its
    own shards) and write the HF export at step 1; with lr 1e-12 the export equals the source to
    1e-9 (measured 6e-14), names included."""
    import subprocess
    import sys
    save_in_hub_layout(hf_model("llava", "debug-siglip2"), tmp_path / "src")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "train.py", "--job.config_file", "train_configs/llava_siglip2_debug.toml",
         "--job.dump_folder", str(tmp_path / "run"), "--training.steps", "1", "--training.seq_len", "128",
         "--data.image_slots_per_row", "2", "--optimizer.lr", "1e-12", "--checkpoint.enable", "false",
         "--metrics.enable_tensorboard", "false", "--checkpoint.initial_load_hf_path", str(tmp_path / "src"),
         "--checkpoint.export_hf_path", str(tmp_path / "out"), "--checkpoint.export_hf_dtype", "fp32"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 data-parallel ranks" in out.stdout + out.stderr
    src, exported = read_folder(tmp_path / "src"), read_folder(tmp_path / "out")
    assert sorted(src) == sorted(exported)
    assert max((src[k] - exported[k]).abs().max().item() for k in src) <= 1e-9


SMALL_TOKEN_IDS = {"image_token_id": 7, "video_token_id": 8, "vision_start_token_id": 5, "vision_end_token_id": 6}
"""Placeholder ids of a checkpoint whose tokenizer is not Qwen's (inside the debug vocabulary)."""


def test_qwen2_5_vl_trained_from_an_hf_folder_exports_its_token_ids(tmp_path):
    """qwen2_5_vl/debug started from an HF folder whose config.json has its own token ids: the HF
    export written at the last step carries those ids, not Qwen's defaults, except where the run's
    tokenizer (written beside the weights) writes its placeholders with other ids: the bundled one
    has image start / pad / end at 3 / 4 / 5 and no video token."""
    import train
    spec = get_model_spec("qwen2_5_vl")
    config = transformers.AutoConfig.for_model(**{**spec.hf_adapter.hf_config(spec.flavors["debug"]),
                                                  **SMALL_TOKEN_IDS})
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path / "src")
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/qwen2_5_vl_debug.toml",
                      "--training.steps", "1", "--training.seq_len", "128", "--data.image_slots_per_row", "4",
                      "--checkpoint.enable", "false", "--checkpoint.initial_load_hf_path", str(tmp_path / "src"),
                      "--checkpoint.export_hf_path", str(tmp_path / "out"))
    train.Trainer(cfg).train()
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    tokenizer_ids = {"image_token_id": 4, "vision_start_token_id": 3, "vision_end_token_id": 5}
    assert {k: exported[k] for k in SMALL_TOKEN_IDS} == {**SMALL_TOKEN_IDS, **tokenizer_ids}


@pytest.mark.parametrize("family,hf_class", [("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
                                             ("qwen3_vl", "Qwen3VLForConditionalGeneration")])
def test_qwen_vl_hf_to_dcp_to_hf_is_bit_identical_and_loads_in_transformers(tmp_path, family, hf_class):
    """The conversion scripts on a sharded save_pretrained folder of the debug flavor: every tensor
    comes back bit-identical, transformers reproduces the source's logits (measured diff 0), and
    config.json keeps the source's own placeholder token ids (not Qwen's defaults)."""
    spec = get_model_spec(family)
    config = transformers.AutoConfig.for_model(**{**spec.hf_adapter.hf_config(spec.flavors["debug"]),
                                                  **SMALL_TOKEN_IDS})
    torch.manual_seed(0)
    source = getattr(transformers, hf_class)(config).eval()
    source.save_pretrained(tmp_path / "src", max_shard_size="300KB")
    assert script("convert_hf_to_dcp")([str(tmp_path / "src"), str(tmp_path / "dcp"), "--model.name", family]) == 0
    assert script("convert_dcp_to_hf")([str(tmp_path / "dcp"), str(tmp_path / "out"), "--model.name", family,
                                        "--model.flavor", "debug", "--dtype", "fp32"]) == 0
    src, out = read_folder(tmp_path / "src"), read_folder(tmp_path / "out")
    assert sorted(src) == sorted(out)
    for key in src:
        assert src[key].dtype == out[key].dtype and torch.equal(src[key], out[key]), key
    exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: exported_config[k] for k in SMALL_TOKEN_IDS} == SMALL_TOKEN_IDS
    cls = getattr(transformers, hf_class)
    reloaded, original = (cls.from_pretrained(tmp_path / d).eval() for d in ("out", "src"))
    ids = torch.randint(8, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - original(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_hf_folder_files_get_the_umask_mode_like_any_new_file(tmp_path, umask, mode):
    """Every file of an HF export (safetensors shards too, which safetensors itself writes 0600) is
    0666 less the umask: 0644 under the usual 022, so other users of a shared cluster can read it."""
    from titan_mm.hf.io import write_hf_folder
    old = os.umask(umask)
    try:
        write_hf_folder({"a": torch.ones(64), "b": torch.ones(64)}, {"model_type": "x"}, str(tmp_path / "hf"),
                        max_shard_bytes=256)
    finally:
        os.umask(old)
    files = sorted(os.listdir(tmp_path / "hf"))
    assert sum(f.endswith(".safetensors") for f in files) == 2
    assert {f: oct(os.stat(tmp_path / "hf" / f).st_mode & 0o777) for f in files} == {f: oct(mode) for f in files}
