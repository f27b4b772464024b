"""HF exports that load as they are (titan_mm/hf/export.py): transformers reads the folder's
tokenizer, chat template and image processor, its model generates, and its greedy tokens equal
ours (titan_mm.generate) from the same folder.

The Qwen-VL processors of transformers 5 need torchvision for their video half; without it the
test tokenizes with the folder's tokenizer and chat template, processes the images with the folder's
image processor and expands each image placeholder as Qwen2_5_VLProcessor / Qwen3VLProcessor do
(grid_t * grid_h * grid_w / merge^2 copies); with torchvision it calls AutoProcessor.
"""

import importlib.util
import json

import pytest
import torch
from PIL import Image

from conftest import load_script, make_config
from test_parallel import seed_checkpoint
from titan_mm.generate import Sampling, chat_prompt, generate, load_model_for_inference

transformers = pytest.importorskip("transformers")

IMAGES = ["assets/sample_data/images/00000.png", "assets/sample_data/images/00001.png"]
MESSAGES = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "a red"},
                                         {"type": "image", "image": IMAGES[1]},
                                         {"type": "text", "text": "what is in the pictures?"}]}]
NEW_TOKENS = 32


def hf_generate(folder) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) of transformers on the exported folder, loaded as it is."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    images = [Image.open(path).convert("RGB") for path in IMAGES]
    if importlib.util.find_spec("torchvision") is not None:
        processor = transformers.AutoProcessor.from_pretrained(folder)
        text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        inputs = dict(processor(text=[text], images=images, return_tensors="pt"))
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
        text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        inputs = dict(image_processor(images=images, return_tensors="pt"))
        pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        for grid in inputs["image_grid_thw"]:
            n = int(grid.prod()) // image_processor.merge_size ** 2
            text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
        inputs.update(tokenizer([text.replace("<|placeholder|>", "<|image_pad|>")], return_tensors="pt"))
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == pad).long()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def check_export_generates_our_tokens(cfg, folder):
    files = set(p.name for p in folder.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
            "preprocessor_config.json", "config.json"} <= files
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == 1 and config["image_token_id"] == 4

    prompt_ids, theirs = hf_generate(folder)
    im = load_model_for_inference(cfg, hf_path=str(folder))
    prompt = chat_prompt(im, MESSAGES)
    assert prompt.tokens == prompt_ids
    ours = generate(im, [prompt], Sampling(max_new_tokens=NEW_TOKENS))[0]
    if theirs[-1] in im.stop_token_ids():  # transformers keeps the stop token, we leave it out
        theirs = theirs[:-1]
    print(f"{len(ours)} tokens, {len(set(ours))} distinct: {ours}")
    assert ours == theirs and len(set(ours)) >= 2


def test_qwen2_5_vl_export_of_dcp_weights_loads_and_generates_our_tokens(tmp_path):
    """scripts/convert_dcp_to_hf.py --tokenizer on random-init debug Qwen2.5-VL weights."""
    flavor = "debug-untied"  # a tied head over tiny embeddings repeats one token
    overrides = ("--job.config_file", "train_configs/qwen2_5_vl_debug.toml", "--model.flavor", flavor)
    cfg = make_config(tmp_path, *overrides)
    assert load_script("convert_dcp_to_hf").main([
        seed_checkpoint(tmp_path, *overrides), str(tmp_path / "hf"), "--model.name", "qwen2_5_vl", "--model.flavor", flavor,
        "--tokenizer", "assets/tokenizer", "--chat_format", "plain", "--min_pixels", str(cfg.data.min_pixels),
        "--max_pixels", str(cfg.data.max_pixels)]) == 0
    check_export_generates_our_tokens(cfg, tmp_path / "hf")


def test_qwen3_vl_export_at_the_end_of_training_loads_and_generates_our_tokens(tmp_path):
    """checkpoint.export_hf_path of a 3-step debug Qwen3-VL run on the bundled chat data."""
    import train
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/qwen3_vl_debug.toml",
                      "--model.flavor", "debug-untied", "--training.steps", "3", "--training.seq_len", "256",
                      "--checkpoint.enable", "false", "--checkpoint.export_hf_path", str(tmp_path / "hf"),
                      "--checkpoint.export_hf_dtype", "fp32", "--data.dataset", "chat",
                      "--data.path", "assets/sample_data/chat_train.jsonl", "--data.chat_format", "plain")
    train.Trainer(cfg).train()
    check_export_generates_our_tokens(cfg, tmp_path / "hf")


def test_llava_export_loads_with_its_tokenizer_template_and_image_processor(tmp_path):
    """The debug SigLIP2 LLaVA: transformers loads the model, the tokenizer whose chat template
    writes our prompt ids (each image placeholder expanded to the image's patch count) and the
    SigLIP2 image processor. (Its greedy tokens equal transformers' in tests/test_generate.py;
    transformers' LlavaProcessor and generate() do not handle naflex towers' spatial_shapes.)"""
    cfg = make_config(tmp_path, "--model.flavor", "debug-siglip2")
    assert load_script("convert_dcp_to_hf").main([
        seed_checkpoint(tmp_path, "--model.flavor", "debug-siglip2"), str(tmp_path / "hf"), "--model.name", "llava", "--model.flavor", "debug-siglip2",
        "--tokenizer", "assets/tokenizer", "--max_pixels", str(cfg.data.max_pixels)]) == 0
    folder = tmp_path / "hf"
    assert isinstance(transformers.AutoModelForImageTextToText.from_pretrained(folder),
                      transformers.LlavaForConditionalGeneration)
    image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert image_processor.max_num_patches == cfg.data.max_pixels // 64 and image_processor.patch_size == 8
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = chat_prompt(load_model_for_inference(cfg, hf_path=str(folder)), MESSAGES)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    for image in prompt.images:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * image.patches.shape[0], 1)
    assert tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"] == prompt.tokens
