"""Simulated inference of an exported model: what the serving runtime computes, in float32 on any device.

A quantized linear layer computes ``fake_quant(x) @ (codes * scale)^T``: the weight is the exact dequantized
value (an FP8 / INT GEMM with the scale applied in the epilogue produces exactly these products), and the input
is fake-quantized per token the way a dynamic-activation kernel does (scale = max|x_token| / format max, round to
nearest, saturate).  Every other tensor is the checkpoint's bf16 value.  Arithmetic is float32, so the only
differences from the bf16 baseline are the quantization itself.

:func:`load` is fp8train's own reader of the checkpoints it writes (compressed-tensors is the independent one);
it also applies LoRC factors, which compressed-tensors readers ignore.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import IntFormat, Minifloat
from ..quant import fake_quantize
from .checkpoint import decode_module, read_checkpoint, scheme_from_config_group
from .weights import QuantizedWeight

__all__ = ["SimulatedLinear", "fake_quantize_tokens", "build_model", "empty_model", "load"]


def fake_quantize_tokens(x: torch.Tensor, fmt: "Minifloat | IntFormat") -> torch.Tensor:
    """Dynamic per-token (per-row) symmetric quantize-dequantize of ``x`` along its last dimension."""
    return fake_quantize(x, fmt, "row", nonfinite="propagate")


class SimulatedLinear(nn.Module):
    """A linear layer whose weight was dequantized from the checkpoint and whose input is fake-quantized."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], activation_format=None, name: str = ""):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.activation_format = activation_format
        self.name = name
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.activation_format is not None:
            x = fake_quantize_tokens(x, self.activation_format)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        act = self.activation_format.name if self.activation_format is not None else "bf16"
        return f"in={self.in_features}, out={self.out_features}, activations={act}"


def empty_model(config: dict, device=None) -> nn.Module:
    """A randomly initialised float32 causal LM of a config.json dict (``device="meta"``: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type; cannot build the model")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with torch.device(device if device is not None else "cpu"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


@torch.no_grad()
def build_model(config: dict, tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                activation_formats: dict[str, object], device=None) -> nn.Module:
    """A float32 model of ``config`` holding ``tensors``, with every layer in ``quantized`` simulated.

    ``activation_formats[name]`` is the per-token format of that layer's input (None: not quantized).
    """
    model = empty_model(config, device)
    model.eval()
    modules = dict(model.named_modules())
    expected = set(model.state_dict())
    provided = set(tensors)
    for name, qweight in quantized.items():
        module = modules.get(name)
        if module is None:
            raise KeyError(f"the checkpoint quantizes {name!r}, which the model of this config does not have")
        weight = qweight.dequantize(torch.float32).to(module.weight.device)
        if isinstance(module, nn.Embedding):
            module.weight.data = weight
        else:
            bias = tensors.get(f"{name}.bias")
            _set_module(model, name, SimulatedLinear(weight, bias, activation_formats.get(name), name))
        provided |= {f"{name}.weight", f"{name}.bias"} & expected
    tied = bool(config.get("tie_word_embeddings", False))
    missing = {k for k in expected - provided}
    if tied and model.get_output_embeddings() is not None:
        missing = {k for k in missing if not k.endswith(("lm_head.weight",))}
    missing = {k for k in missing if not k.endswith("rotary_emb.inv_freq")}
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {sorted(missing)[:5]}")
    plain = {k: v.float() for k, v in tensors.items() if k in expected and k.rpartition(".")[0] not in quantized}
    model.load_state_dict(plain, strict=False)
    if tied and "lm_head.weight" not in tensors:
        model.tie_weights()
    return model


def load(path, device=None) -> nn.Module:
    """Load a checkpoint written by :func:`fp8train.export.export` as a simulated-quantization float32 model.

    A plain (unquantized) Hugging Face model directory loads too: its weights are used as stored.
    """
    config, tensors = read_checkpoint(pathlib.Path(path))
    qconfig = config.get("quantization_config")
    quantized: dict[str, QuantizedWeight] = {}
    activation_formats: dict[str, object] = {}
    if qconfig is not None:
        if qconfig.get("quant_method") != "compressed-tensors":
            raise ValueError(f"{path}: quant_method {qconfig.get('quant_method')!r} is not compressed-tensors")
        groups = qconfig.get("config_groups", {})
        by_name = {t: g for g in groups.values() for t in g.get("targets", []) if t not in ("Linear", "Embedding")}
        linear_group = next((g for g in groups.values() if "Linear" in g.get("targets", [])), None)
        embedding_group = next((g for g in groups.values() if "Embedding" in g.get("targets", [])), None)
        model_skeleton = empty_model(config, "meta")
        kinds = {n: type(m) for n, m in model_skeleton.named_modules()}
        for key in tensors:
            if not key.endswith(".weight_scale"):
                continue
            name = key[: -len(".weight_scale")]
            is_embedding = issubclass(kinds.get(name, nn.Module), nn.Embedding)
            group = by_name.get(name) or (embedding_group if is_embedding else linear_group)
            if group is None:
                raise ValueError(f"{path}: {name} is quantized but no config group targets it")
            scheme = scheme_from_config_group(group)
            quantized[name] = decode_module(tensors, name, scheme)
            activation_formats[name] = None if is_embedding else scheme.activation_format
        tensors = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in quantized}
    return build_model(config, tensors, quantized, activation_formats, device=device)
