"""A converted model with fp8train.AdamW trains through transformers.Trainer (the snippet in docs/training.md)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install -e .[dev])")

import fp8train  # noqa: E402


class PatternDataset(torch.utils.data.Dataset):
    """Sequences of a learnable pattern: each token is the previous one plus a per-sequence stride."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.tokens = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def _tiny_llama(vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(config)


def _trainer(model, optimizer, out, **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(out), max_steps=16, per_device_train_batch_size=8, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    lr_scheduler_type="constant", dataloader_num_workers=0)
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=PatternDataset(256, 32, 128),
                   optimizers=(optimizer, None))


def test_coat_model_and_fp8_adamw_train_through_trainer(tmp_path):
    model = fp8train.convert(_tiny_llama(), recipe="coat")
    optimizer = fp8train.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, optimizer, tmp_path)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5  # learns the pattern
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)  # every parameter (FP8 linears included) was updated
    # parameter names survive conversion, and the optimizer really holds FP8 moments
    assert set(before) == {n for n, _ in _tiny_llama().named_parameters()}
    state_dtypes = {t.dtype for s in optimizer.state_dict()["state"].values() for t in s.values()
                    if isinstance(t, torch.Tensor)}
    assert torch.float8_e4m3fn in state_dtypes


def test_trainer_checkpoint_resume_with_fp8_adamw(tmp_path):
    model = fp8train.convert(_tiny_llama(), recipe="coat")
    trainer = _trainer(model, fp8train.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0), tmp_path,
                       max_steps=8, save_strategy="steps", save_steps=4)
    trainer.train()
    straight = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    model = fp8train.convert(_tiny_llama(), recipe="coat")
    resumed = _trainer(model, fp8train.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0), tmp_path,
                       max_steps=8, save_strategy="steps", save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    again = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert again[-4:] == pytest.approx(straight[-4:], rel=1e-6)
