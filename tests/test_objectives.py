"""Training objectives (titan_mm/objectives): MDLM's loss equals its formula, its masks touch only
trainable tokens, its attention is bidirectional within each document, and its losses under
FSDP, TP, CP, Ulysses and PP match one process."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config
from test_parallel import assert_layout_matches_single_process
from titan_mm.data.dataloader import build_dataloader
from titan_mm.data.packing import IGNORE_INDEX
from titan_mm.models.llama.model import DecoderArgs, TextArgs, TextModel
from titan_mm.objectives.mdlm import trainable_tokens

MDLM = ["--objective.name", "mdlm"]
SMALL = ["--training.seq_len", "256", "--data.image_slots_per_row", "10", "--checkpoint.enable", "false",
         "--metrics.enable_tensorboard", "false"]


def test_mdlm_loss_of_a_fixed_batch_matches_the_formula(tmp_path):
    """The trainer's first-step loss (Qwen3-style text decoder, two accumulated microbatches)
    equals sum over masked tokens of CE / t divided by the trainable tokens of both, computed here
    from full fp64 logits of the initial model: within 1e-6 relative."""
    import train
    cfg = make_config(tmp_path, "--job.config_file", "train_configs/llama_debug.toml", *SMALL, *MDLM,
                      "--training.steps", "1", "--training.gradient_accumulation_steps", "2")
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
            t = 1 / mb["targets"][:, 1]  # each masked token's document level
            inputs = {k: mb[k] for k in ("input_ids", "position_ids", "document_ids")}
            logits = model.decoder.logits(model(**inputs))
            original = mb["targets"][:, 0].long()
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
], ids=["fsdp2", "tp2", "cp2", "ulysses2", "pp2", "llama-tp2"])
def test_mdlm_parallel_layout_matches_single_process(tmp_path, nproc, dp_world, model, layout):
    """MDLM on the debug VLM (LLaVA: SigLIP2 ViT + Qwen3-style decoder, mask token added to the
    bundled tokenizer): the same masks in every layout, losses within 1e-5 relative over 5 steps."""
    assert_layout_matches_single_process(tmp_path, nproc, dp_world, [*MDLM, *model], layout)
