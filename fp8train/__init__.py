"""fp8train: memory-efficient FP8 training for PyTorch (COAT: FP8 optimizer states + FP8 activations).

    import fp8train
    model = fp8train.convert(model, recipe="coat")     # "bf16" | "fp8" | "coat"
    opt = fp8train.AdamW(model.parameters(), lr=3e-4)  # FP8 Adam moments with Dynamic Range Expansion

Importing the package is cheap: submodules load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_MODULES = {"formats", "quant", "dynamic_range_expansion", "optim", "nn", "recipes", "kernels", "train",
                 "lab", "export", "distributed", "cli", "causal_masks", "cuda_graphs", "bench"}
_LAZY_ATTRS = {
    "convert": ("fp8train.convert", "convert"),
    "Recipe": ("fp8train.recipes", "Recipe"),
    "AdamW": ("fp8train.optim", "AdamW"),
    "quantize": ("fp8train.quant", "quantize"),
}

__all__ = ["convert", "Recipe", "AdamW", "quantize", "formats", "quant", "__version__"]


def __getattr__(name: str):
    if name in _LAZY_ATTRS:
        module, attr = _LAZY_ATTRS[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"fp8train.{name}")
    else:
        raise AttributeError(f"module 'fp8train' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | _LAZY_MODULES | set(_LAZY_ATTRS))
