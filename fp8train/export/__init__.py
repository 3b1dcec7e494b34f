"""Export for inference: FP8 / INT8 / INT4 / FP4 checkpoints in the compressed-tensors format (vLLM, transformers).

    from fp8train.export import export, evaluate, load
    export(model, "out/fp8", format="fp8-dynamic")                    # W8A8-FP, no calibration
    export(model, "out/w4", format="w4a16", calibration=token_ids)    # INT4 group 128, GPTQ
    evaluate(model, eval_tokens, formats=["fp8-dynamic", "w4a16"])   # perplexity under simulated quantization
    model = load("out/w4")                                            # fp8train's own reader (simulation)

``fp8train export`` / ``fp8train eval`` on the command line (see docs/export.md).  Importing this package is
cheap; torch and transformers load on first use.
"""

from __future__ import annotations

import importlib

from .cli import register

__all__ = ["export", "quantize_model", "evaluate", "compare", "load", "FORMAT_NAMES", "register"]

_LAZY = {
    "export": ("fp8train.export.exporter", "export"),
    "quantize_model": ("fp8train.export.exporter", "quantize_model"),
    "QuantizedModel": ("fp8train.export.exporter", "QuantizedModel"),
    "evaluate": ("fp8train.export.quality", "evaluate"),
    "compare": ("fp8train.export.quality", "compare"),
    "load": ("fp8train.export.simulate", "load"),
    "FORMAT_NAMES": ("fp8train.export.schemes", "FORMAT_NAMES"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fp8train.export' has no attribute {name!r}")
