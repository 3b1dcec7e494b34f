"""FP8-saved attention inputs: the fused causal attention forward, unchanged, with q, k and v kept for backward as
1-byte (E4M3) copies instead of bf16 tensors.

    out = fp8_saved_attention(q, k, v, scale=None)   # (batch, heads, seq, head_dim), causal; k/v may have fewer heads
    fp8train.convert(model, fp8train.Recipe.named("coat").replace(fp8_attention_saves=True))   # what convert does

What SDPA's fused kernels (cuDNN, FlashAttention, the CPU flash kernel) keep for backward is q, k, v and the
output in the compute dtype plus the fp32 log-sum-exp: ``2 * (2 * heads + 2 * kv_heads) * head_dim + 4 * heads``
bytes per token and layer in bf16.  :class:`FP8SavedAttentionFunction` runs the very aten forward op that
``F.scaled_dot_product_attention`` picks for the inputs (``torch._fused_sdp_choice``), so the output is the same
bits, and saves q, k and v as

* their mean over the sequence (per batch, head and channel; compute dtype, ``head_dim`` values per head) and
* the rest in E4M3 (``saved_format="e4m3"``, the default) or symmetric int8 (``"int8"``), with one float32 absmax
  per 1xG group along head_dim -- G = 128 for head_dim 128, i.e. one scale per head and token
  (:func:`saved_group_size`): ``1 + 4 / G`` bytes per element instead of 2.  Subtracting the mean keeps a
  component shared by all tokens (channel biases of k, the usual outlier channels) from setting every row's
  scale.

Two modes:

* ``"recompute"`` (the default, what ``Recipe.fp8_attention_saves`` uses): nothing else is saved.  Backward
  dequantizes the copies and reruns the forward op on them, so the log-sum-exp and output it differentiates
  are consistent with the rounded q/k/v (probabilities that sum to one), then calls the fused backward op.
  Costs one attention forward per layer in backward; the output's bytes go to whoever else keeps it (o_proj:
  an FP8 copy with fp8train's FP8 linears).  Per layer and token under ``"coat"``: ``(h + 2 kv) d (1 + 4/G)``
  for the attention plus ``h d`` for o_proj's copy, against ``2 (2h + 2kv) d + 4h`` -- about half.
* ``"saved_lse"``: the forward's output and log-sum-exp are saved too, and backward uses them with the
  dequantized q/k/v.  No extra forward, but the probabilities it rebuilds from rounded q/k against the exact
  log-sum-exp do not sum to one, which roughly doubles the gradient error for sharp attention (measured below);
  the output stays in the compute dtype (o_proj reads it and keeps a reference, see
  ``fp8train.nn.linear.kept_by_attention``, so an FP8 copy would add bytes, not remove them).

Fidelity (tests/test_fp8_saved_attention.py; docs/convert.md has the table): relative error of dq/dk/dv against
float64 math for unit-variance q/k/v, head_dim 64: E4M3 "recompute" ~0.05 (bf16 SDPA itself: ~0.004),
"saved_lse" ~0.06; int8 "recompute" ~0.012.  On the q/k/v of a briefly trained 4-layer Llama (attention logits
up to ~90) E4M3 "recompute" gave 0.04-0.15, "saved_lse" 0.13-0.43, int8 "recompute" 0.01-0.03.

Backward dequantizes to the compute dtype in the tensors' original memory layout and calls the matching aten
backward op (``_scaled_dot_product_cudnn_attention_backward``, ``_scaled_dot_product_flash_attention_backward``
or ``_scaled_dot_product_flash_attention_for_cpu_backward``).  The ops are called by argument *name*, read from
their schemas, so signature differences between torch versions do not matter as long as every argument is one
this module knows; a backend whose schema it cannot fill is not used (fallback, below).

Scope and fallbacks: causal attention without a mask, without dropout, query length == key length > 1, and a
fused kernel that torch would choose for the inputs (CUDA: cuDNN or flash; CPU: the CPU flash kernel).  Grouped
query attention runs natively (the kernels take k/v with fewer heads; only the un-repeated k/v are saved).
Anything else -- a padding mask, dropout, a KV cache, a position bias, softcapping, an unsupported dtype or a
backend choice of math / memory-efficient attention -- runs Hugging Face's own ``sdpa_attention_forward`` with a
one-time warning naming the reason.  Without gradients (eval, ``generate()``) nothing is saved, so HF's SDPA runs
silently.  Inside ``torch.compile`` the op runs eagerly (graph break), like fp8train's other FP8 ops.

Hugging Face integration (:func:`install_fp8_saved_attention`, used by ``fp8train.convert`` for
``Recipe.fp8_attention_saves``): the function is registered in transformers' attention-function registry as
``"fp8train_fp8_saved_sdpa"`` (with SDPA's mask function in the mask registry, so masks are built exactly as for
``"sdpa"``), the model config's ``_attn_implementation`` is set to that name -- in place, as transformers'
``set_attn_implementation`` does -- and each converted attention module is marked.  Unmarked modules reading
that config (another model built from the same config object, excluded layers) run HF's SDPA unchanged.  Needs
transformers >= 4.53 (the mask registry); only models that use ``"sdpa"`` are switched.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import E4M3, INT8
from ..kernels import warn_once
from ..quant import Granularity, QuantizedTensor, quantize
from .attention_registry import hf_sdpa, is_llama_style_attention, plain_causal_fallback
from .eager_ops import autocast_off

__all__ = ["ATTENTION_NAME", "SAVED_FORMAT", "SAVED_FORMATS", "MODES", "saved_group_size", "choose_backend",
           "FP8SavedAttentionFunction", "fp8_saved_attention", "fp8_saved_sdpa_attention_forward",
           "register_attention_function", "install_fp8_saved_attention", "install_on_model",
           "remove_fp8_saved_attention", "uses_fp8_saved_attention", "attention_saved_bytes"]

ATTENTION_NAME = "fp8train_fp8_saved_sdpa"
SAVED_FORMAT = E4M3
SAVED_FORMATS = {"e4m3": E4M3, "int8": INT8}  # int8: the same bytes, ~4x smaller gradient error (docs)
MAX_GROUP = 128
_MARK = "_fp8train_fp8_attention_saves"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def saved_group_size(head_dim: int) -> int:
    """Elements per scale along head_dim: the largest power of two <= 128 that divides head_dim (128 for the
    usual head_dim 128, i.e. one scale per head and token; 64 for 64; 16 for 80)."""
    g = MAX_GROUP
    while g > 1 and head_dim % g:
        g //= 2
    return g


# -- warnings -------------------------------------------------------------------------------------------------------

# -- the aten ops, called by argument name ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Backend:
    name: str
    forward: str
    backward: str


_BACKENDS = {
    "cudnn": _Backend("cudnn", "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    "flash": _Backend("flash", "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "cpu_flash": _Backend("cpu_flash", "_scaled_dot_product_flash_attention_for_cpu",
                          "_scaled_dot_product_flash_attention_for_cpu_backward"),
}

# values of the forward's non-tensor arguments (causal, no dropout, no mask, keep the log-sum-exp)
_FORWARD_CONSTANTS = {"dropout_p": 0.0, "is_causal": True, "return_debug_mask": False, "compute_log_sumexp": True,
                      "attn_mask": None, "attn_bias": None}
# backward argument -> forward output that feeds it, where the names differ (derivatives.yaml passes the flash
# forward's rng_state / unused outputs as philox_seed / philox_offset)
_BACKWARD_ALIASES = {"philox_seed": ("philox_seed", "rng_state"), "philox_offset": ("philox_offset", "unused"),
                     "logsumexp": ("logsumexp", "log_sumexp"), "out": ("output",)}
_GRAD_NAMES = ("grad_out", "grad_out_", "grad_output", "grad")
_INPUT_NAMES = {"query": 0, "key": 1, "value": 2}


def _op(name: str):
    packet = getattr(torch.ops.aten, name, None)
    return None if packet is None else getattr(packet, "default", None)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How to call one backend's forward and backward op: which forward outputs the backward reads."""

    backend: _Backend
    forward_op: object
    backward_op: object
    forward_args: tuple  # names, in schema order
    forward_returns: tuple  # names (or "" for unnamed), in order
    backward_args: tuple  # (name, source): source "grad" | "input:i" | "out" | "scale" | "const" | "fwd:j"


@functools.lru_cache(maxsize=None)
def _plan(backend_name: str) -> Optional[_Plan]:
    """The call plan of a backend on this torch, or None when its schemas hold an argument this module cannot fill."""
    backend = _BACKENDS[backend_name]
    fwd, bwd = _op(backend.forward), _op(backend.backward)
    if fwd is None or bwd is None:
        return None
    forward_args = []
    for arg in fwd._schema.arguments:
        if arg.name in _INPUT_NAMES or arg.name in _FORWARD_CONSTANTS or arg.name == "scale":
            forward_args.append(arg.name)
        elif not arg.has_default_value():
            return None
    returns = tuple(r.name or "" for r in fwd._schema.returns)
    if not returns or returns[0] not in ("output", "out", ""):
        return None
    backward_args = []
    for arg in bwd._schema.arguments:
        name = arg.name
        if name in _GRAD_NAMES:
            source = "grad"
        elif name in _INPUT_NAMES:
            source = f"input:{_INPUT_NAMES[name]}"
        elif name in ("out", "output"):
            source = "out"
        elif name == "scale":
            source = "scale"
        elif name in _FORWARD_CONSTANTS:
            source = "const"
        elif name == "grad_input_mask":
            return None  # memory-efficient attention: not used here
        else:
            candidates = _BACKWARD_ALIASES.get(name, (name,))
            found = [returns.index(c) for c in candidates if c in returns]
            if found:
                source = f"fwd:{found[0]}"
            elif arg.has_default_value():
                continue
            else:
                return None
        backward_args.append((name, source))
    if not any(s == "grad" for _, s in backward_args) or sum(s.startswith("input:") for _, s in backward_args) != 3:
        return None
    return _Plan(backend, fwd, bwd, tuple(forward_args), returns, tuple(backward_args))


def _sdp_choice(q, k, v, scale) -> int:
    op = _op("_fused_sdp_choice")
    names = {a.name for a in op._schema.arguments}
    kwargs = {"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "scale": scale}
    if "enable_gqa" in names:
        kwargs["enable_gqa"] = k.shape[-3] != q.shape[-3]
    return int(op(q, k, v, **{n: val for n, val in kwargs.items() if n in names}))


def choose_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
                   ) -> tuple[Optional[str], str]:
    """``(backend, why)``: the fused kernel ``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=<fewer kv heads>)`` would run -- ``"cudnn"``, ``"flash"`` or ``"cpu_flash"`` -- or None with the
    reason when that is not one this module can save for (math, memory-efficient, an unusable schema)."""
    from torch.nn.attention import SDPBackend

    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not (q.dim() == k.dim() == v.dim() == 4):
        return None, "q/k/v are not 4-D (batch, heads, seq, head_dim) tensors"
    if any(t.is_nested for t in (q, k, v)):
        return None, "nested tensors"
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return None, f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (float16/bfloat16/float32, all alike, are supported)"
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1]:
        return None, "q/k/v head dims differ"
    if q.shape[-2] != k.shape[-2] or q.shape[-2] < 2:
        return None, "query length differs from key length (a KV cache) or is 1"
    if q.shape[-3] % k.shape[-3] or k.shape[-3] != v.shape[-3]:
        return None, "heads of q are not a multiple of the heads of k/v"
    if q.is_cuda and q.shape[-1] % 8:
        return None, f"head_dim {q.shape[-1]} is not a multiple of 8 (SDPA pads it for the CUDA kernels)"
    try:
        choice = _sdp_choice(q, k, v, scale)
    except Exception as exc:  # noqa: BLE001 - no viable kernel
        return None, f"torch found no SDPA kernel ({type(exc).__name__})"
    device = q.device.type
    if device == "cuda" and choice == int(SDPBackend.CUDNN_ATTENTION):
        name = "cudnn"
    elif device == "cuda" and choice == int(SDPBackend.FLASH_ATTENTION):
        name = "flash"
    elif device == "cpu" and choice == int(SDPBackend.FLASH_ATTENTION):
        name = "cpu_flash"
    else:
        label = {int(b): n for n, b in SDPBackend.__members__.items()}.get(choice, str(choice))
        return None, f"torch chose the {label} SDPA backend on {device} (only cuDNN / flash kernels are covered)"
    if _plan(name) is None:
        return None, f"this torch's {name} attention op schemas hold arguments this module does not know"
    return name, ""


def _run_forward(plan: _Plan, q, k, v, scale):
    values = {**_FORWARD_CONSTANTS, "query": q, "key": k, "value": v, "scale": scale}
    result = plan.forward_op(**{n: values[n] for n in plan.forward_args})
    return result if isinstance(result, (tuple, list)) else (result,)


def _run_backward(plan: _Plan, grad_out, q, k, v, out, scale, fwd_outputs):
    inputs = (q, k, v)
    kwargs = {}
    for name, source in plan.backward_args:
        if source == "grad":
            kwargs[name] = grad_out
        elif source == "out":
            kwargs[name] = out
        elif source == "scale":
            kwargs[name] = scale
        elif source == "const":
            kwargs[name] = _FORWARD_CONSTANTS[name]
        elif source.startswith("input:"):
            kwargs[name] = inputs[int(source[6:])]
        else:
            kwargs[name] = fwd_outputs[int(source[4:])]
    grads = plan.backward_op(**kwargs)
    return grads[0], grads[1], grads[2]


def _backward_sources(plan: _Plan) -> list:
    """Indices of the forward outputs the backward reads (besides the output itself)."""
    return sorted({int(s[4:]) for _, s in plan.backward_args if s.startswith("fwd:")} - {0})


# -- the FP8 copies ---------------------------------------------------------------------------------------------------

def _dense_order(x: torch.Tensor) -> Optional[list]:
    """A permutation of x's dims (last dim kept last) under which x is contiguous, or None."""
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        return None
    perm = sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)) + [x.dim() - 1]
    return perm if x.permute(perm).is_contiguous() else None


@dataclasses.dataclass(frozen=True)
class _CopyMeta:
    perm: tuple  # the (memory) order of x's dims the copy is stored in
    shape: torch.Size  # of the permuted copy
    dtype: torch.dtype
    group: int
    exact: bool
    fmt: object  # E4M3 or INT8


def _save_copy(x: torch.Tensor, fmt, group: int, exact: bool):
    """``(data, amax, mean, meta)``: x in its memory order as E4M3 with 1xG float32 absmax groups along head_dim,
    after subtracting its mean over the sequence (per batch, head and channel; kept in x's dtype and added back
    by :func:`_dequantize_copy`).  ``exact`` (the tests' switch) keeps x itself."""
    perm = _dense_order(x)
    y = x.detach().permute(perm) if perm is not None else x.detach().contiguous()
    perm = tuple(perm) if perm is not None else tuple(range(x.dim()))
    meta = _CopyMeta(perm, y.shape, x.dtype, group, exact, fmt)
    if exact:
        return y, None, None, meta
    # "smoothing": a component shared by all tokens (channel biases of k, the usual outlier channels) would
    # otherwise set the scale of every row and cost every element precision
    mean = y.mean(dim=perm.index(x.dim() - 2), keepdim=True, dtype=torch.float32).to(x.dtype)
    q = quantize(y - mean, fmt, Granularity("group", group), scale_dtype=torch.float32,
                 nonfinite="propagate")
    return q.data, q.amax, mean, meta


def _dequantize_copy(data: torch.Tensor, amax: Optional[torch.Tensor], mean: Optional[torch.Tensor],
                     meta: _CopyMeta, reference: Optional[bool] = None) -> torch.Tensor:
    """The compute-dtype tensor backward uses, with the original tensor's shape and strides.

    Reference (CPU; ``reference=True``): :meth:`fp8train.quant.QuantizedTensor.dequantize` plus the mean.  CUDA:
    the same in fewer passes (E4M3 -> compute dtype is exact; then one in-place multiply by the fp32 scale
    amax / 448, computed in fp32 and rounded once, and the mean added) instead of the reference's fp32
    temporaries; the two agree up to rare one-ulp ties (tested).
    """
    if meta.exact:
        y = data
    else:
        if reference is None:
            reference = not data.is_cuda
        if reference:
            y = QuantizedTensor(data=data, amax=amax, fmt=meta.fmt, granularity=Granularity("group", meta.group),
                                shape=meta.shape, dtype=meta.dtype).dequantize()
        else:
            y = data.to(meta.dtype)
            groups = y.view(*meta.shape[:-1], meta.shape[-1] // meta.group, meta.group)
            groups.mul_((amax.float() / meta.fmt.max).unsqueeze(-1))
        y = y.add_(mean)
    inverse = [0] * len(meta.perm)
    for i, d in enumerate(meta.perm):
        inverse[d] = i
    return y.permute(inverse)


def _quantization_disabled() -> bool:
    from ..mixed_granularity import is_quantization_disabled

    return is_quantization_disabled()


MODES = ("recompute", "saved_lse")


class FP8SavedAttentionFunction(torch.autograd.Function):
    """Causal attention with the fused aten op of ``backend``; saves q/k/v as E4M3 copies (see the module
    docstring).  ``mode="recompute"``: nothing else is saved; backward reruns the forward op on the dequantized
    copies for a log-sum-exp and output consistent with them.  ``mode="saved_lse"``: the output and the forward's
    log-sum-exp are saved too, and the output's autograd node carries ``keeps_attention_output = True`` (a
    consumer such as o_proj may keep a reference to the output instead of a copy)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, backend: str, mode: str, saved_format: str, reference: Optional[bool]):
        plan = _plan(backend)
        results = _run_forward(plan, q, k, v, scale)
        out = results[0]
        group = saved_group_size(q.shape[-1])
        exact = _quantization_disabled()
        copies = [_save_copy(t, SAVED_FORMATS[saved_format], group, exact) for t in (q, k, v)]
        tensors = [t for data, amax, mean, _ in copies for t in (data, amax, mean)]
        ctx.metas = [meta for *_, meta in copies]
        ctx.plan, ctx.n_outputs, ctx.scale, ctx.mode, ctx.reference = plan, len(results), scale, mode, reference
        ctx.sources = _backward_sources(plan)
        if mode == "saved_lse":
            aux = [results[i] for i in ctx.sources]
            ctx.aux_tensor = [isinstance(a, torch.Tensor) or a is None for a in aux]
            ctx.aux_values = [None if t else a for a, t in zip(aux, ctx.aux_tensor)]
            tensors += [out] + [a for a, t in zip(aux, ctx.aux_tensor) if t]
            ctx.keeps_attention_output = True
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v = (_dequantize_copy(*saved[3 * i:3 * i + 3], ctx.metas[i], ctx.reference) for i in range(3))
        if ctx.mode == "recompute":
            fwd_outputs = list(_run_forward(ctx.plan, q, k, v, ctx.scale))
            out = fwd_outputs[0]
        else:
            out = saved[9]
            rest = iter(saved[10:])
            aux = [next(rest) if is_tensor else value for is_tensor, value in zip(ctx.aux_tensor, ctx.aux_values)]
            fwd_outputs = [None] * ctx.n_outputs
            for i, a in zip(ctx.sources, aux):
                fwd_outputs[i] = a
        grad_q, grad_k, grad_v = _run_backward(ctx.plan, grad_out, q, k, v, out, ctx.scale, fwd_outputs)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _autocast_inputs(q, k, v):
    """What autocast does to SDPA's inputs (a lower-precision op on CUDA and CPU): floating tensors other than
    float64 are cast to the autocast dtype.  Done outside the Function, so autograd records the casts as for HF."""
    device = q.device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype not in (dtype, torch.float64) else t
                 for t in (q, k, v))


@torch.compiler.disable  # eager op: torch.compile compiles the model around it, as for fp8train's other FP8 ops
def _fp8_saved_core(q, k, v, scale, backend, mode, saved_format, reference):
    with autocast_off(q.device.type):
        return FP8SavedAttentionFunction.apply(q, k, v, scale, backend, mode, saved_format, reference)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_format(saved_format: str) -> str:
    if saved_format not in SAVED_FORMATS:
        raise ValueError(f"saved_format must be one of {tuple(SAVED_FORMATS)}, got {saved_format!r}")
    return saved_format


def _plain_sdpa(q, k, v, scale):
    gqa = q.dim() == 4 and k.dim() == 4 and k.shape[-3] != q.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **({"enable_gqa": True} if gqa else {}))


def fp8_saved_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: Optional[float] = None, mode: str = "recompute", saved_format: str = "e4m3",
                        reference: Optional[bool] = None) -> torch.Tensor:
    """Causal ``F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=...)``
    (same output bits) that saves query/key/value for backward as E4M3 copies.

    Shapes ``(batch, heads, seq, head_dim)``; key/value may have fewer heads (grouped-query attention).  Honours
    autocast like SDPA.  ``mode``: ``"recompute"`` (default) or ``"saved_lse"``, see
    :class:`FP8SavedAttentionFunction`; ``saved_format``: ``"e4m3"`` (default) or ``"int8"`` (same bytes, symmetric
    int8 with the same row scales: about 4x smaller gradient error, see docs/convert.md).  Where the FP8-saving path
    does not apply (see :func:`choose_backend`) it runs plain SDPA with a one-time warning; without gradients it
    runs plain SDPA silently.  ``reference=True`` forces the plain-torch dequantization (the default off CUDA).
    """
    _check_mode(mode)
    _check_format(saved_format)
    q, k, v = _autocast_inputs(query, key, value)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return _plain_sdpa(q, k, v, scale)
    backend, why = choose_backend(q, k, v, scale)
    if backend is None:
        warn_once(f"fp8-saved-attention-{why}",
                  f"fp8train FP8-saved attention: {why}; running plain SDPA (bf16 saves) for these inputs")
        return _plain_sdpa(q, k, v, scale)
    return _fp8_saved_core(q, k, v, scale, backend, mode, saved_format, reference)


# -- Hugging Face attention interface -------------------------------------------------------------------------------

def fp8_saved_sdpa_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                     scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """Hugging Face attention function (the ``"fp8train_fp8_saved_sdpa"`` entry of ``ALL_ATTENTION_FUNCTIONS``):
    HF's ``sdpa_attention_forward`` for unmarked modules, inference and unsupported cases; the FP8-saving causal
    attention otherwise.  Returns ``(attn_output (batch, seq, heads, head_dim), None)`` as HF's does."""
    sdpa = hf_sdpa()
    setting = getattr(module, _MARK, None)
    if setting is None or not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)
    why = plain_causal_fallback(module, query, key, attention_mask, dropout, is_causal, kwargs)
    backend = None
    if why is None:
        q, k, v = _autocast_inputs(query, key, value)
        backend, why = choose_backend(q, k, v, scaling)
    if backend is None:
        warn_once(f"fp8-saved-attention-{why}",
                  f"fp8train FP8-saved attention: {why}; this call runs Hugging Face's SDPA (bf16 saves) instead")
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                    **kwargs)
    out = _fp8_saved_core(q, k, v, scaling, backend, *setting, None)
    return out.transpose(1, 2).contiguous(), None


def register_attention_function() -> bool:
    """Register :func:`fp8_saved_sdpa_attention_forward` as ``"fp8train_fp8_saved_sdpa"`` with transformers, and
    SDPA's mask function under the same name (so masks are built as for ``"sdpa"``).  False when this transformers
    has no mask registry (< 4.53)."""
    from .attention_registry import register

    return register(ATTENTION_NAME, fp8_saved_sdpa_attention_forward)


def uses_fp8_saved_attention(module: nn.Module) -> bool:
    """Whether ``module`` (an attention module) runs the FP8-saving attention."""
    config = getattr(module, "config", None)
    return getattr(module, _MARK, None) is not None and getattr(config, "_attn_implementation", None) == ATTENTION_NAME


def install_fp8_saved_attention(attention: nn.Module, mode: str = "recompute", saved_format: str = "e4m3"
                                ) -> Optional[str]:
    """Switch a Hugging Face attention module (anything whose forward dispatches on
    ``self.config._attn_implementation``) to the FP8-saving attention.  Returns None on success, else why nothing
    changed (the config is not ``"sdpa"``, or transformers is too old).  Other modules sharing the config keep
    HF's SDPA: only marked modules save FP8.  ``mode`` and ``saved_format``: see :func:`fp8_saved_attention`."""
    _check_mode(mode)
    _check_format(saved_format)
    config = getattr(attention, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", ATTENTION_NAME):
        return f"attn_implementation={current!r} (only 'sdpa' models are switched)"
    if not register_attention_function():
        return "this transformers has no attention-mask registry (transformers >= 4.53 is needed)"
    config._attn_implementation = ATTENTION_NAME
    setattr(attention, _MARK, (mode, saved_format))
    return None


def remove_fp8_saved_attention(model: nn.Module) -> int:
    """Unmark every attention module of ``model`` and set their configs back to ``"sdpa"``; returns how many."""
    from .attention_registry import unmark_all

    return unmark_all(model, _MARK, ATTENTION_NAME)


def attention_saved_bytes(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, *, mode: Optional[str],
                          dtype_bytes: int = 2) -> int:
    """Bytes one causal attention call keeps for backward, the kernels' few bookkeeping bytes aside.

    ``mode=None`` (plain SDPA): q, k, v, the output (compute dtype) and the fp32 log-sum-exp.  ``"saved_lse"``:
    q/k/v as E4M3 with float32 1xG scales and their means, plus the output and the log-sum-exp.  ``"recompute"``:
    the E4M3 q/k/v (and scales, means) alone -- the output's bytes then move to whoever else keeps it (o_proj:
    an FP8 copy under fp8train's FP8 linears, the bf16 tensor under a plain nn.Linear).
    """
    tokens = batch * seq
    lse = tokens * heads * 4
    out = tokens * heads * head_dim * dtype_bytes
    qkv = tokens * (heads + 2 * kv_heads) * head_dim
    if mode is None:
        return qkv * dtype_bytes + out + lse
    fp8 = qkv + qkv // saved_group_size(head_dim) * 4 + batch * (heads + 2 * kv_heads) * head_dim * dtype_bytes
    return fp8 + (out + lse if _check_mode(mode) == "saved_lse" else 0)


def install_on_model(model: nn.Module, is_excluded=None, mode: str = "recompute", saved_format: str = "e4m3") -> dict:
    """What ``fp8train.convert`` does for ``Recipe.fp8_attention_saves``: switch every Llama-style attention
    module of ``model`` (linear ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and a Hugging Face ``config``) that
    ``is_excluded(name, module)`` does not exclude.  Returns ``{"installed": [names], "skipped": {name: why}}``
    and warns once, listing the modules left on their own attention."""
    installed, skipped = [], {}
    for name, module in model.named_modules():
        if not is_llama_style_attention(module):
            continue
        if is_excluded is not None and is_excluded(name, module):
            continue
        why = install_fp8_saved_attention(module, mode=mode, saved_format=saved_format)
        if why is None:
            installed.append(name)
        else:
            skipped[name] = why
    if skipped:
        reasons = sorted(set(skipped.values()))
        warnings.warn(f"fp8train.convert: fp8_attention_saves left {len(skipped)} attention module(s) on their own "
                      f"attention: {'; '.join(reasons)}", stacklevel=3)
    return {"installed": installed, "skipped": skipped}
