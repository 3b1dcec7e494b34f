"""Optimizers with low-precision state: ``fp8train.optim.AdamW`` (FP8 moments with Dynamic Range Expansion)."""

from .adamw import AdamW

__all__ = ["AdamW"]
