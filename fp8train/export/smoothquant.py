"""SmoothQuant (Xiao et al., arXiv 2211.10438): move activation outliers into the weights before INT8.

For a group of linear layers that read the same input X, each input channel j gets a factor
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (W_j: column j of every weight in the group).  X is divided by s
and the weights' columns multiplied by it, so X W^T is unchanged while X's outlier channels shrink.  The
division of X is folded into whatever produced X:

* a norm layer (RMSNorm / LayerNorm): its weight (and bias) divided by s -- found by tracing which module's
  output tensor each linear layer receives (q/k/v after input_layernorm, gate/up after post_attention_layernorm);
* a gated MLP's ``up_proj``: the rows of up_proj divided by s feed ``down_proj`` through the elementwise
  product act(gate) * up, so ``down_proj``'s input is smoothed exactly.

Groups whose input also reaches a layer that is not being quantized (e.g. the final norm feeding lm_head) are
left alone.  The smoothed model is mathematically the same model; only its bf16 rounding differs.
"""

from __future__ import annotations

import dataclasses
import torch
from torch import nn

from .calibration import dense, forward_all, input_hooks

__all__ = ["SmoothGroup", "find_smoothing_groups", "collect_input_amax", "smooth"]


@dataclasses.dataclass
class SmoothGroup:
    producer: str  # module whose output is the consumers' input
    kind: str  # "norm" or "up_proj"
    consumers: list[str]


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and weight.numel() == width)


@torch.no_grad()
def find_smoothing_groups(model: nn.Module, sample: torch.Tensor, targets: dict[str, nn.Linear]) -> list[SmoothGroup]:
    """Trace one forward pass to find, for every target linear, the module whose output it reads."""
    produced: dict[tuple, str] = {}
    keep_alive = []
    linear_inputs: dict[str, tuple] = {}
    all_linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def key(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))

    handles = []
    for name, module in model.named_modules():
        if module is model:
            continue

        def out_hook(mod, args, out, _name=name):
            out = dense(out[0] if isinstance(out, (tuple, list)) and out else out)
            if isinstance(out, torch.Tensor):
                keep_alive.append(out)
                produced.setdefault(key(out), _name)  # the innermost module that made the tensor wins

        handles.append(module.register_forward_hook(out_hook))

    def record(name, x):
        keep_alive.append(x)
        linear_inputs[name] = key(x)

    try:
        with input_hooks(all_linears, record):
            forward_all(model, [sample[:1]])
    finally:
        for h in handles:
            h.remove()

    modules = dict(model.named_modules())
    by_producer: dict[str, list[str]] = {}
    for name, k in linear_inputs.items():
        producer = produced.get(k)
        if producer is not None and _is_norm(modules[producer], all_linears[name].in_features):
            by_producer.setdefault(producer, []).append(name)
    groups = [SmoothGroup(p, "norm", names) for p, names in by_producer.items()
              if all(n in targets for n in names)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        up = getattr(parent, "up_proj", None) if leaf == "down_proj" else None
        if isinstance(up, nn.Linear) and up.out_features == targets[name].in_features:
            groups.append(SmoothGroup(f"{parent_name}.up_proj" if parent_name else "up_proj", "up_proj", [name]))
    return groups


@torch.no_grad()
def collect_input_amax(model: nn.Module, batches, modules: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every module in ``modules`` over the calibration batches (float32)."""
    amax: dict[str, torch.Tensor] = {}

    def record(name, x):
        channel_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        amax[name] = channel_max if name not in amax else torch.maximum(amax[name], channel_max)

    with input_hooks(modules, record):
        forward_all(model, batches)
    return amax


@torch.no_grad()
def smooth(model: nn.Module, groups: list[SmoothGroup], input_amax: dict[str, torch.Tensor],
           alpha: float = 0.8) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant in place; returns the factor s of every group (keyed by producer)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    modules = dict(model.named_modules())
    factors = {}
    for group in groups:
        consumers = [modules[n] for n in group.consumers]
        x_max = torch.stack([input_amax[n] for n in group.consumers]).amax(dim=0)
        w_max = torch.cat([m.weight.detach().abs().float() for m in consumers], dim=0).amax(dim=0)
        s = (x_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        s = torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))
        producer = modules[group.producer]
        if group.kind == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        else:
            producer.weight.div_(s.unsqueeze(1).to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        for m in consumers:
            m.weight.mul_(s.to(m.weight.dtype))
        factors[group.producer] = s
    return factors

