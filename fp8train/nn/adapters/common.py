"""Structural tests for the module kinds fp8train converts (no lists of model class names)."""

from __future__ import annotations

from torch import nn

from ..activation import activation_name

__all__ = ["is_rmsnorm_like", "is_layernorm", "is_activation"]


def is_rmsnorm_like(module: nn.Module) -> bool:
    """torch.nn.RMSNorm, or an HF-style ``*RMSNorm`` with a 1-D ``weight`` (or none) and an epsilon."""
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    if not type(module).__name__.endswith("RMSNorm"):
        return False
    weight = getattr(module, "weight", None)
    has_eps = getattr(module, "variance_epsilon", None) is not None or getattr(module, "eps", None) is not None
    return has_eps and (weight is None or (isinstance(weight, nn.Parameter) and weight.dim() == 1))


def is_layernorm(module: nn.Module) -> bool:
    """nn.LayerNorm over the last dim only."""
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def is_activation(module: nn.Module) -> bool:
    """An activation module with an FP8 kernel (SiLU, GELU, HF's GELU variants)."""
    return activation_name(module) is not None
