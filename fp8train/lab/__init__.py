"""Stability lab: train with number formats the hardware does not have, and watch for instability.

    from fp8train.lab import SimulatedFormats
    recipe = fp8train.Recipe(simulate=SimulatedFormats(activations="e3m4", weights="e3m4", gradients="e5m2"))
    model = fp8train.convert(model, recipe=recipe)     # every converted linear -> SimulatedLinear

Modules (one idea each):

* :mod:`~fp8train.lab.simulated_linear` -- fake-quantized GEMM inputs (any ExMy minifloat, per-tensor / group /
  no scaling) for activations, weights and output gradients of every converted linear;
* :mod:`~fp8train.lab.sharpness` -- the epsilon-sharpness of the last position's logits ("To FP8 and Back
  Again", after Keskar et al.);
* :mod:`~fp8train.lab.sweep` -- ``fp8train sweep``: formats x learning rates x seeds of short trainings,
  divergence bookkeeping, resume;
* :mod:`~fp8train.lab.report` -- the sweep's report.md, heat-map and curves.

Importing this package does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "SimulatedFormats": "fp8train.lab.simulated_linear",
    "SimulatedLinear": "fp8train.lab.simulated_linear",
    "simulate_quantize": "fp8train.lab.simulated_linear",
    "fake_quantized_linear": "fp8train.lab.simulated_linear",
    "last_token_sharpness": "fp8train.lab.sharpness",
    "model_sharpness": "fp8train.lab.sharpness",
    "epsilon_sharpness": "fp8train.lab.sharpness",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fp8train.lab' has no attribute {name!r}")
