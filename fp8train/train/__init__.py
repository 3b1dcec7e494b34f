"""Training runs: ``fp8train train`` / ``fp8train compare`` and their Python API.

    from fp8train.train import TrainConfig, train, compare
    summary = train(TrainConfig(model="tiny", recipe="bf16", steps=200, out="runs/demo"))

Modules: config (settings + flags), data (corpus, split, batches), tokenizer (byte-level BPE),
models (size presets), loop (the training loop), checkpoint (atomic, pickle-free), metrics, report (plots,
report.md), compare, cli.  Importing this package does not import torch.
"""

from __future__ import annotations

from .config import TrainConfig, TrainError


def train(config: TrainConfig, **kwargs):
    from .loop import train as _train

    return _train(config, **kwargs)


def compare(recipes, base: TrainConfig, **kwargs):
    from .compare import compare as _compare

    return _compare(recipes, base, **kwargs)


__all__ = ["TrainConfig", "TrainError", "train", "compare"]
