"""Training objectives (titan_mm/objectives): MDLM's loss equals its formula, its masks touch only
trainable tokens, its attention is bidirectional within each document, and its losses under
FSDP, TP, CP, Ulysses and PP match one process."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config
from test_parallel import QWEN3_VL, assert_layout_matches_single_process
from titan_mm.data.dataloader import build_dataloader
from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.models.llama.model import DecoderArgs, TextArgs, TextModel
from titan_mm.objectives.mdlm import trainable_tokens
from titan_mm.objectives.mdlm_sampler import mdlm_generate

MDLM = ["--objective.name", "mdlm"]
SMALL = ["--training.seq_len", "256", "--data.image_slots_per_row", "10", "--checkpoint.enable", "false",
         "--metrics.enable_tensorboard", "false"]


@pytest.mark.parametrize("shift", [False, True], ids=["own-position", "shifted"])
def test_mdlm_loss_of_a_fixed_batch_matches_the_formula(tmp_path, shift):
    """The trainer's first-step loss (Qwen3-style text decoder, two accumulated microbatches)
    equals sum over masked tokens of CE / t divided by the trainable tokens of both, computed here
    from full fp64 logits of the initial model: within 1e-6 relative. ``shifted``
    (``mdlm_shift``): masked token i is predicted from position i - 1's logits."""
    import train
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/llama_debug.toml", *SMALL, *MDLM,
                      "--training.steps", "1", "--training.gradient_accumulation_steps", "2",
                      "--objective.mdlm_shift", str(shift).lower())
    trainer = train.Trainer(cfg)
    model = copy.deepcopy(trainer.model).double()
    loader = build_dataloader(cfg.data, trainer.tokenizer, trainer.model_args.vision_input, seq_len=256,
                              batch_size=1, dp_rank=0, dp_world=1, seed=cfg.job.seed)
    batches = [trainer.prepare_batch(mb) for mb, _ in zip(loader, range(2))]
    trainer.batches_prepared = 0  # the trainer prepares the same two microbatches again
    trainer.train()

    total, trainable = 0.0, 0
    mask_id = trainer.tokenizer.token_id("<|mask|>")
    with torch.no_grad():
        for mb in batches:
            masked = mb["input_ids"] == mask_id
            # the original token i is the loader's next-token label of position i - 1
            original = F.pad(mb["labels"][:, :-1], (1, 0), value=IGNORE_INDEX)
            inputs = {k: mb[k] for k in ("input_ids", "position_ids", "document_ids")}
            logits = model.decoder.logits(model(**inputs))
            if shift:  # position i - 1 predicts token i; its weight sits there too
                logits = F.pad(logits[:, :-1], (0, 0, 1, 0))
            weights = F.pad(mb["targets"][:, 1, :-1], (1, 0)) if shift else mb["targets"][:, 1]
            t = 1 / weights  # each masked token's document level
            ce = F.cross_entropy(logits[masked], original[masked], reduction="none")
            total += (ce / t[masked]).sum().item()
            trainable += int(trainable_tokens(mb["labels"]).sum())
            assert masked.any() and (masked <= trainable_tokens(mb["labels"])).all()
    expected = total / trainable
    got = trainer.losses[0].item()
    print(f"MDLM loss: trainer {got:.8f}, formula {expected:.8f}, relative difference "
          f"{abs(got - expected) / expected:.1e}")
    assert got == pytest.approx(expected, rel=1e-6)


def test_mdlm_masks_only_assistant_tokens_never_prompts_padding_or_images(tmp_path):
    """Chat data with images: over 20 microbatches, every masked position holds an assistant
    token (a label-bearing one); prompts, padding and image tokens keep their ids. About t of the
    trainable tokens of each document are masked (mean masked fraction within 0.1 of mean t)."""
    import train
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/debug_vlm_chat.toml", *SMALL, *MDLM)
    trainer = train.Trainer(cfg)
    mask_id = trainer.tokenizer.token_id("<|mask|>")
    fractions, levels = [], []
    for i, batch in zip(range(20), trainer.dataloader):
        mb = trainer.objective.prepare(batch, seed=i)
        masked = mb["input_ids"] == mask_id
        trainable = trainable_tokens(batch["labels"])
        assert (masked <= trainable).all()
        assert torch.equal(mb["input_ids"][~masked], batch["input_ids"][~masked])
        image_or_pad = (batch["image_token_index"] >= 0) | (batch["document_ids"] < 0)
        assert not (masked & image_or_pad).any() and not (trainable & image_or_pad).any()
        assert torch.equal(mb["loss_tokens"], trainable)
        assert (mb["targets"][:, 0][masked] == batch["input_ids"][masked].float()).all()
        assert (mb["targets"][:, 0][~masked] == IGNORE_INDEX).all()
        for doc in batch["document_ids"].unique():
            in_doc = (batch["document_ids"] == doc) & trainable
            if doc >= 0 and in_doc.sum() >= 10:
                fractions.append(masked[in_doc].float().mean().item())
                levels.append(1 / mb["targets"][:, 1][masked & in_doc].mean().item()
                              if (masked & in_doc).any() else 0.0)
    assert len(fractions) >= 20
    assert abs(sum(fractions) / len(fractions) - sum(levels) / len(levels)) < 0.1


def test_mdlm_attention_is_bidirectional_within_a_document_and_blind_across_documents():
    """With causal = False a token sees the later tokens of its own document (changing the last
    token of document 0 changes the hidden state of its first token) and nothing of the next packed
    document (changing document 1 leaves document 0 unchanged, to 1e-6)."""
    torch.manual_seed(0)
    model = TextModel(TextArgs(decoder=DecoderArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                                   ffn_hidden_dim=128, vocab_size=64, causal=False)))
    model.init_weights()
    ids = torch.randint(0, 64, (1, 12))
    doc = torch.tensor([[0] * 6 + [1] * 6])
    pos = torch.tensor([list(range(6)) * 2])
    h = model(ids, pos, doc)
    later = ids.clone()
    later[0, 5] = (later[0, 5] + 1) % 64
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 1) % 64
    assert (model(later, pos, doc)[0, 0] - h[0, 0]).abs().max() > 1e-3
    assert (model(other, pos, doc)[0, :6] - h[0, :6]).abs().max() < 1e-6


LLAMA = ["--job.config_file", "train_configs/llama_debug.toml"]
UNTIED_2_ROWS = ["--model.flavor", "debug-untied", "--training.local_batch_size", "2"]


@pytest.mark.parametrize("nproc,dp_world,model,layout", [
    (2, 2, [], ["--parallelism.data_parallel_shard_degree", "2"]),
    (2, 1, [], ["--parallelism.tensor_parallel_degree", "2"]),
    (2, 1, [], ["--parallelism.context_parallel_degree", "2"]),
    (2, 1, [], ["--parallelism.ulysses_degree", "2"]),
    (2, 1, UNTIED_2_ROWS, ["--parallelism.pipeline_parallel_degree", "2"]),
    (2, 1, LLAMA, ["--parallelism.tensor_parallel_degree", "2"]),
    (2, 1, QWEN3_VL, ["--parallelism.context_parallel_degree", "2"]),
], ids=["fsdp2", "tp2", "cp2", "ulysses2", "pp2", "llama-tp2", "qwen3_vl-cp2"])
def test_mdlm_parallel_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout):
    """MDLM on the debug VLM (LLaVA: SigLIP2 ViT + Qwen3-style decoder, mask token added to the
    bundled tokenizer), the text decoder and Qwen3-VL (M-RoPE, DeepStack; context parallelism
    splits each bidirectional document): the same masks in every layout, losses within 1e-5
    relative over 5 steps."""
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, [*MDLM, *model], layout)


class LogitsModel(torch.nn.Module):
    """A stand-in model whose 'hidden states' are its logits: it predicts ``target`` at every
    position with confidence ``confidence[position]``, and records the input ids of every call."""

    def __init__(self, target_S: torch.Tensor, confidence_S: torch.Tensor, vocab: int):
        super().__init__()
        self.logits_SV = torch.full((len(target_S), vocab), -10.0)
        self.logits_SV[torch.arange(len(target_S)), target_S] = confidence_S
        self.decoder = self
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, **inputs):
        self.seen.append(input_ids[0].clone())
        return self.logits_SV[None]

    def logits(self, h):
        return h


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampler_unmasks_block_by_block_one_share_per_step(remasking):
    """gen_length 8 in blocks of 4, 8 steps: one token a step, the second block stays all mask
    until the first is done, and every position ends with the model's prediction. With
    low_confidence the most confident masked position of the block goes first."""
    mask, vocab, start = 9, 10, 2
    target = torch.tensor([0, 1, 5, 6, 7, 8, 1, 2, 3, 4])
    confidence = torch.tensor([0.0, 0, 1, 4, 2, 3, 8, 5, 7, 6])
    model = LogitsModel(target, confidence, vocab)
    ids = torch.cat([target[:start], torch.full((8,), mask)])[None]
    out = mdlm_generate(model, {"input_ids": ids}, start, mask_id=mask, gen_length=8, steps=8, block_length=4,
                        remasking=remasking, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == target[start:].tolist()
    masked_per_call = [(seen[start:] == mask).long() for seen in model.seen]
    assert [int(m.sum()) for m in masked_per_call] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert all(m[4:].all() for m in masked_per_call[:4])  # block 2 waits for block 1
    if remasking == "low_confidence":  # block 1's confidences 1, 4, 2, 3: position 1 first, then 3
        assert model.seen[1][start:start + 4].tolist() == [mask, 6, mask, mask]
        assert model.seen[2][start:start + 4].tolist() == [mask, 6, mask, 8]


def test_shifted_sampler_reads_each_answer_token_from_the_position_before_it():
    """``shift`` (a model trained with ``mdlm_shift``): the answer token at position p comes from
    position p - 1's prediction, the last prompt token's predicting the first answer token."""
    vocab, mask, start = 16, 15, 2
    target = torch.tensor([3, 9, 4, 6, 11, 8, 2])  # position i "predicts" target[i]
    model = LogitsModel(target, torch.arange(7.0), vocab)
    ids = torch.cat([target[:start], torch.full((5,), mask)])[None]
    out = mdlm_generate(model, {"input_ids": ids}, start, mask_id=mask, gen_length=4, steps=4, block_length=4,
                        shift=True)
    assert out.tolist() == target[start - 1:start + 3].tolist()


def test_sampler_tokens_per_step_spread_the_remainder_first():
    from titan_mm.objectives.mdlm_sampler import tokens_per_step
    assert tokens_per_step(10, 4) == [3, 3, 2, 2]
    assert tokens_per_step(2, 4) == [1, 1, 0, 0]


def test_mdlm_generate_script_writes_captions_without_mask_tokens(tmp_path, capsys):
    """scripts/mdlm_generate.py on a DCP model folder (the debug VLM with the mask token added):
    one caption per held-out image, semi-autoregressive (2 blocks of 4 tokens, 4 steps), every mask
    filled."""
    from conftest import load_script
    from test_parallel import seed_checkpoint
    weights = seed_checkpoint(tmp_path, *MDLM)
    load_script("mdlm_generate").main([
        "--job.config_file", "train_configs/mdlm_vlm_debug.toml", "--job.dump_folder", str(tmp_path / "run"),
        "--weights", weights, "--num", "2", "--gen_length", "8", "--steps", "4", "--block_length", "4"])
    out = capsys.readouterr().out
    assert out.count("reference:") == 2 and "<|mask|>" not in out, out


def test_mdlm_starts_from_an_autoregressive_checkpoint_whose_vocabulary_lacks_the_mask(tmp_path):
    """The Dream / Tiny-A2D start: a causal text-decoder checkpoint (512 rows, no mask token) loads
    into the shifted MDLM model whose embedding grew to 576 rows. Its 512 rows are the checkpoint's,
    the new rows keep the initialisation a run without the checkpoint has, and training goes on."""
    import torch.distributed.checkpoint as dcp

    import train
    from test_parallel import seed_checkpoint
    llama = ["--job.config_file", "train_configs/llama_debug.toml", *SMALL]
    ar = seed_checkpoint(tmp_path, *llama, "--job.seed", "7")  # causal: another init than the run's
    mdlm = [*llama, *MDLM, "--objective.mdlm_shift", "true", "--training.steps", "2"]
    trainer = train.Trainer(make_config(tmp_path / "mdlm", *mdlm, "--checkpoint.enable", "true",
                                        "--checkpoint.initial_load_path", ar))
    fresh = train.Trainer(make_config(tmp_path / "fresh", *mdlm)).model.state_dict()
    state = trainer.model.state_dict()
    stored = {k: torch.empty(512, v.shape[1]) for k, v in state.items() if v.shape[0] == 576}
    assert stored, "the MDLM model's vocabulary did not grow"
    stored_norm = {"decoder.norm.weight": torch.empty_like(state["decoder.norm.weight"])}
    dcp.load({"model": {**stored, **stored_norm}}, checkpoint_id=ar)
    for name, rows in stored.items():
        assert torch.equal(state[name][:512], rows), name
        assert torch.equal(state[name][512:], fresh[name][512:]), name
        assert not torch.equal(state[name][:512], fresh[name][:512]), name
    assert torch.equal(state["decoder.norm.weight"], stored_norm["decoder.norm.weight"])
    trainer.train()
    assert all(torch.isfinite(loss) for loss in trainer.losses)


def test_convert_dcp_to_hf_exports_an_mdlm_checkpoint_whose_vocabulary_grew(tmp_path):
    """scripts/convert_dcp_to_hf.py on a debug-VLM MDLM checkpoint (576 rows: the mask token grew the
    512-token vocabulary): the HF folder records 576 and a tokenizer holding <|mask|> at the run's
    id, transformers loads it with every weight, and the MDLM model read back from the folder gives
    the checkpoint's logits."""
    from safetensors.torch import load_file

    from conftest import load_script
    from test_parallel import seed_checkpoint
    from titan_mm.generate import load_model_for_inference
    transformers = pytest.importorskip("transformers")
    overrides = ("--job.config_file", "train_configs/mdlm_vlm_debug.toml", "--model.flavor", "debug-siglip2")
    cfg = make_config(tmp_path, *overrides)
    dcp_folder, hf = seed_checkpoint(tmp_path, *overrides), str(tmp_path / "hf")
    assert load_script("convert_dcp_to_hf").main([
        dcp_folder, hf, "--model.name", "llava", "--model.flavor", "debug-siglip2", "--tokenizer", "assets/tokenizer",
        "--mask_token", cfg.objective.mask_token]) == 0
    config = transformers.AutoConfig.from_pretrained(hf)
    assert config.text_config.vocab_size == 576
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == 512
    _, info = transformers.AutoModelForImageTextToText.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    weights = {k: v for f in tmp_path.joinpath("hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert weights["language_model.model.embed_tokens.weight"].shape[0] == 576
    ours = load_model_for_inference(cfg, checkpoint=dcp_folder)
    back = load_model_for_inference(cfg, hf_path=hf)
    assert not ours.objective.causal and not back.objective.causal
    assert back.tokenizer.token_id("<|mask|>") == ours.tokenizer.token_id("<|mask|>") == 512
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), name
