"""Tiny models and data shared by the export tests."""

from __future__ import annotations

import torch


def tiny_llama(hidden: int = 128, intermediate: int = 256, layers: int = 2, vocab: int = 300, tie: bool = False,
               seed: int = 0, outliers: bool = True):
    """A small random LlamaForCausalLM; ``outliers`` scales a few norm channels up like a trained model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if outliers:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                    p[torch.randint(0, p.numel(), (2,), generator=gen)] *= 8.0
    return model


def token_batch(n: int = 8, length: int = 32, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen)
