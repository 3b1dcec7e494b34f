"""Model-size presets: Llama-style decoders built from a config (no download), from a CPU toy up to 13B shapes.

The larger presets use the published Llama shapes so that numbers measured here compare with other
projects: "1b" is the 953M-parameter Llama of the COAT / torchao benchmarks, "7b" and "13b" are Llama-2.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    lr: float

    def llama_config(self, vocab_size: int | None = None):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=vocab_size or self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=None,
        )

    def num_parameters(self, vocab_size: int | None = None) -> int:
        v = vocab_size or self.vocab_size
        h, f = self.hidden_size, self.intermediate_size
        per_layer = 4 * h * h + 3 * h * f + 2 * h
        return self.num_layers * per_layer + 2 * v * h + h


PRESETS: dict[str, Preset] = {
    "micro": Preset(64, 2, 4, 176, 512, 256, 3e-3),           # 0.17M: tests and smoke runs
    # ~5M parameters: ~0.35 s per 16x128-token step on 2 CPU cores
    "tiny": Preset(256, 4, 4, 688, 4096, 1024, 3e-3),
    "small": Preset(512, 8, 8, 1376, 8192, 2048, 1e-3),       # 34M
    "125m": Preset(768, 12, 12, 2048, 32000, 2048, 6e-4),     # 134M
    "350m": Preset(1024, 24, 16, 2816, 32000, 2048, 3e-4),    # 374M
    "1b": Preset(2048, 16, 16, 5632, 32000, 2048, 3e-4),      # 953M
    "7b": Preset(4096, 32, 32, 11008, 32000, 4096, 1.5e-4),   # 6.7B (Llama-2-7B)
    "13b": Preset(5120, 40, 40, 13824, 32000, 4096, 1e-4),    # 13.0B (Llama-2-13B)
}

PRESET_HELP = ", ".join(PRESETS)


def build_model(name: str, vocab_size: int, device):
    """A freshly initialised LlamaForCausalLM in fp32, created directly on ``device`` (fast init on GPU)."""
    import torch
    from transformers import LlamaForCausalLM

    config = PRESETS[name].llama_config(vocab_size)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.float()
