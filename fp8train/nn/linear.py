"""FP8 linear layer: E4M3 x E4M3 forward, E5M2 gradients, fp32 accumulation, input saved in FP8.

    y = x W^T + b

Forward: ``x`` and ``W`` are quantized just in time to E4M3 with one scale per tensor (the amax of the
current tensor, computed by two-stage "group scaling"; no delayed amax history).  The GEMM multiplies the
FP8 operands, accumulates in fp32 and applies both scales in the epilogue; the output comes back in the
compute dtype (bf16 under autocast).

Backward: the output gradient ``dY`` is quantized to E5M2 per tensor, then

    dX = dY W        (E5M2 x E4M3 -> x's dtype)
    dW = dY^T X      (E5M2 x E4M3 -> W's dtype, fp32 for fp32 master weights)

What backward keeps: the FP8 copy of ``x`` (1 byte/element instead of 2) and its scale, a reference to
``W`` (a parameter, no extra memory) and W's amax scalar.  W is re-quantized in backward with that amax, so
no FP8 weight copy lives longer than one GEMM.

W's amax comes from ``fp8train.AdamW`` when it published one for the weight's current values
(:mod:`fp8train.nn.weight_amax`: the optimizer's kernel reduces it while writing the weight); then the forward
runs only the quantize pass.  Otherwise (another optimizer, a weight changed outside the step) it is computed here.

When several linears read the same tensor (q/k/v; gate/up) the first one attaches its FP8 copy to the tensor
(:mod:`fp8train.nn.handoff`) and the others reuse it: one quantization and one saved FP8 copy instead of three.
A producer that already has the FP8 form (an FP8 norm) can attach it the same way.

GEMM backends (one signature, :func:`scaled_matmul`):

* CUDA on sm89+ (Ada, Hopper and newer): ``torch._scaled_mm`` with per-tensor fp32 scales.  It wants a
  row-major first operand, a column-major second one and inner/outer dims that are multiples of 16 (the
  token dim of the weight-gradient GEMM is padded with zeros when it is not);
* elsewhere: the reference -- the FP8 values as fp32, an fp32 matmul, the two scales, a cast.  Products of
  FP8 values are exact in fp32, so both backends compute the same sums up to summation order.

Block scales (``"1x128"`` inputs/gradients, ``"128x128"`` weights, a DeepSeek-V3-style recipe) are emulated
on every device: operands are dequantized and multiplied in fp32.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn

from .. import mixed_granularity as mg
from ..delayed_scaling import BUFFER_NAME, encode_amax, new_prediction
from ..quant import Granularity, QuantizedTensor, group_scaling_amax, quantize
from ..recipes import Recipe, linear_formats, resolve_recipe
from . import grad_amax, handoff, weight_amax, weight_cache
from .eager_ops import autocast_off, eager_op

__all__ = [
    "FP8Linear",
    "fp8_linear",
    "fp8_linear_forward",
    "fp8_linear_backward",
    "LinearSaved",
    "LinearInput",
    "scaled_matmul",
    "quantize_linear_input",
    "attach_linear_input",
    "compute_dtype",
    "kept_by_attention",
    "fp8_gemm_supported",
    "linear_sharing_parameters",
    "drop_cached_weights",
]


# -- quantization of the three GEMM operands ---------------------------------------------------------------

class LinearInput(NamedTuple):
    """A linear layer's quantized input: the FP8 tensor and, where the GEMM backend wants it, the transposed
    FP8 data ``(K, M)`` for the weight-gradient GEMM (made in the same pass by the quantizer).  Backward keeps
    only one of the two: the transposed copy when it exists, else the row-major one."""

    q: QuantizedTensor
    data_t: Optional[torch.Tensor] = None


def wants_transpose(device: torch.device, recipe: Recipe) -> bool:
    """Whether quantizers should also write the transposed copy: only torch._scaled_mm needs it."""
    return recipe.per_tensor and fp8_gemm_supported(device)


def _quantize(x: torch.Tensor, fmt, granularity: Granularity, amax: Optional[torch.Tensor] = None,
              transpose: bool = False, prediction: Optional[torch.Tensor] = None) -> LinearInput:
    """Quantize one GEMM operand; the standard per-tensor E4M3 / E5M2 cases use the shared (Triton on CUDA)
    quantizers of :mod:`fp8train.mixed_granularity`, anything else the torch reference.  ``prediction`` (per-tensor
    only, used when ``amax`` is None): a 1-element view of a prediction buffer -- the amax is predicted from the
    previous call and repaired when wrong (:mod:`fp8train.delayed_scaling`)."""
    if granularity.kind != "tensor":
        prediction = None
    if granularity.kind == "tensor" and fmt in (mg.LINEAR_FORMAT, mg.GRAD_FORMAT):
        quantizer = mg.quantize_for_linear if fmt == mg.LINEAR_FORMAT else mg.quantize_grad_for_linear
        # the kernels read rows of contiguous memory; gradients and transposed weights may be strided views
        out = quantizer(x.contiguous(), amax=amax, with_transpose=transpose, prediction=prediction)
        return LinearInput(*out) if transpose else LinearInput(out)
    if granularity.kind == "tensor" and amax is None:
        amax = group_scaling_amax(x)
        if prediction is not None:
            amax = encode_amax(amax, prediction)
    # "propagate": no host sync on the hot path; a NaN/inf input turns its group into NaN/inf (never into a
    # finite wrong value), so the loss check of the training loop catches it.
    q = quantize(x, fmt, granularity, amax=amax, nonfinite="propagate")
    data_t = q.data.reshape(-1, q.shape[-1]).t().contiguous() if transpose else None
    return LinearInput(q, data_t)


def linear_input_key(recipe: Recipe) -> tuple:
    (fmt, granularity), _, _ = linear_formats(recipe)
    return ("linear_input", fmt.name, str(granularity))


def attach_linear_input(x: torch.Tensor, recipe: Recipe, value: LinearInput) -> None:
    """Let every FP8 linear that reads ``x`` use ``value`` (a producer that quantized ``x`` itself)."""
    handoff.attach(x, linear_input_key(resolve_recipe(recipe)), value)


def quantize_linear_input(x: torch.Tensor, recipe: Union[Recipe, str] = "fp8",
                          prediction: Optional[torch.Tensor] = None) -> LinearInput:
    """The FP8 copy of a linear input under ``recipe``, shared through :mod:`~fp8train.nn.handoff`.

    Returns the attached copy when ``x`` already has one (quantized by another linear or by its producer);
    otherwise quantizes it, with the amax predicted in ``prediction`` when given (see :func:`_quantize`).
    """
    recipe = resolve_recipe(recipe)
    key = linear_input_key(recipe)
    value = handoff.attached(x, key)
    if value is None:
        (fmt, granularity), _, _ = linear_formats(recipe)
        value = _quantize(x, fmt, granularity, transpose=wants_transpose(x.device, recipe), prediction=prediction)
        handoff.attach(x, key, value)
    return value


def _as_matrix(q: QuantizedTensor, data_t: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """View a quantized (..., K) tensor as (M, K); per-tensor and 1xG metadata reshape along.

    With ``data_t`` (the transposed copy) the matrix's data is ``data_t.t()``: a column-major view, which is
    the layout the weight-gradient GEMM wants for its second operand.
    """
    if data_t is None and len(q.shape) == 2 and q.granularity.kind == "tensor" and q.data.dim() == 2:
        return q  # already a matrix (weights, most gradients): nothing to rebuild
    k = q.shape[-1] if len(q.shape) else 1
    m = math.prod(q.shape[:-1]) if len(q.shape) else 1
    amax = q.amax
    if q.granularity.kind == "group":
        amax = amax.reshape(m, -1)
    elif q.granularity.kind == "row":
        amax = amax.reshape(m, 1)
    data = data_t.t() if data_t is not None else q.data.reshape(m, k)
    hint = q.scale_hint if q.granularity.kind == "tensor" else None
    return QuantizedTensor(data, amax, q.fmt, q.granularity, torch.Size((m, k)), q.dtype, scale_hint=hint)


# -- FP8 weights made once per optimizer step (Recipe.cache_fp8_weights; see fp8train.nn.weight_cache) ---------

def _cached_weight(weight: torch.Tensor, recipe: Recipe, w_fmt, w_gran) -> Optional[LinearInput]:
    """The weight's FP8 copies (both layouts where the GEMM backend needs the transpose), made once per step;
    None where the cache does not apply (the caller then quantizes as without it)."""
    if not recipe.cache_fp8_weights:
        return None
    return weight_cache.cached_weight(weight, w_fmt, w_gran, wants_transpose(weight.device, recipe))


drop_cached_weights = weight_cache.drop_cached_weights


def fp8_weight(weight: torch.Tensor, recipe: Recipe, amax: Optional[torch.Tensor] = None,
               transpose: bool = False) -> LinearInput:
    """The weight's FP8 operand: the per-step cached copies where the recipe caches them, else quantized now with
    ``amax`` (default: the amax the optimizer published for these values -- a device tensor, so a CUDA graph reads
    it at replay) and, with ``transpose``, its transposed copy."""
    _, (w_fmt, w_gran), _ = linear_formats(recipe)
    cached = _cached_weight(weight, recipe, w_fmt, w_gran)
    if cached is not None:
        return cached
    if amax is None and w_gran.kind == "tensor":
        amax = weight_amax.published_amax(weight)
    return _quantize(weight, w_fmt, w_gran, amax=amax, transpose=transpose)


def quantize_output_grad(dy: torch.Tensor, recipe: Recipe, transpose: bool,
                         prediction: Optional[torch.Tensor] = None) -> LinearInput:
    """A linear's output gradient in the recipe's gradient format (+ the transposed copy for the weight-gradient
    GEMM), reusing the amax its producer published (:mod:`fp8train.nn.grad_amax`: no amax pass then), else with
    the amax predicted in ``prediction`` when given (one pass), else just in time."""
    _, _, (g_fmt, g_gran) = linear_formats(recipe)
    amax = grad_amax.lookup(dy) if g_gran.kind == "tensor" else None
    return _quantize(dy, g_fmt, g_gran, amax=amax, transpose=transpose, prediction=prediction)


# -- the GEMM ------------------------------------------------------------------------------------------------

_warned_emulation = False


def fp8_gemm_supported(device: torch.device) -> bool:
    """True where torch._scaled_mm runs FP8 GEMMs on tensor cores (CUDA sm89+)."""
    if device.type != "cuda":
        return False
    return _cuda_has_fp8_tensor_cores(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_has_fp8_tensor_cores(index: int) -> bool:
    # asked several times per linear per step: the device query cost ~10 % of an eager step's host time
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded(data: torch.Tensor, rows: int, cols: int, column_major: bool) -> torch.Tensor:
    """``data`` (2-D) zero-padded to (rows, cols), row- or column-major."""
    if column_major:
        out = torch.zeros(cols, rows, dtype=data.dtype, device=data.device)
        out[: data.shape[1], : data.shape[0]].copy_(data.t())
        return out.t()
    out = torch.zeros(rows, cols, dtype=data.dtype, device=data.device)
    out[: data.shape[0], : data.shape[1]].copy_(data)
    return out


def _scalar_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as the 0-d float32 tensor torch._scaled_mm wants (the quantizers' scales already are: no ops)."""
    if scale.dtype == torch.float32 and scale.dim() == 0:
        return scale
    return scale.float().reshape(())


def _scaled_mm_tensorwise(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    out_dtype: torch.dtype, fast_accumulation: bool) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[1]
    kp, np_ = _round_up(k, 16), _round_up(n, 16)
    if kp != k or np_ != n:
        a = _padded(a, m, kp, column_major=False)
        b = _padded(b, kp, np_, column_major=True)
    else:
        if not (a.stride(1) == 1 and a.stride(0) >= max(1, k)):
            a = a.contiguous()
        if not (b.stride(0) == 1 and b.stride(1) >= max(1, kp)):
            b = b.t().contiguous().t()
    out = torch._scaled_mm(a, b, scale_a=_scalar_scale(a_scale), scale_b=_scalar_scale(b_scale),
                           out_dtype=out_dtype, use_fast_accum=fast_accumulation)
    return out[:, :n] if np_ != n else out


def scaled_matmul(a: QuantizedTensor, b: QuantizedTensor, out_dtype: torch.dtype, *,
                  transpose_b: bool = False, fast_accumulation: bool = False) -> torch.Tensor:
    """``dequant(a) @ dequant(b)`` (or ``@ dequant(b).T`` with ``transpose_b``) in fp32, cast to ``out_dtype``.

    ``a`` is (M, K); ``b`` is (K, N), or (N, K) with ``transpose_b``.  Per-tensor operands run on
    torch._scaled_mm where the device has FP8 tensor cores, else on the fp32 reference; block-scaled operands
    are always dequantized first (emulation).
    """
    b_data = b.data.t() if transpose_b else b.data
    per_tensor = a.granularity.kind == "tensor" and b.granularity.kind == "tensor"
    if per_tensor and fp8_gemm_supported(a.data.device):
        return _scaled_mm_tensorwise(a.data, a.scale, b_data, b.scale, out_dtype, fast_accumulation)
    if per_tensor:
        if a.data.is_cuda:
            _warn_emulation()
        acc = a.data.float() @ b_data.float()
        return (acc * (a.scale * b.scale)).to(out_dtype)
    b_values = b.dequantize(torch.float32)
    return (a.dequantize(torch.float32) @ (b_values.t() if transpose_b else b_values)).to(out_dtype)


def _warn_emulation():
    global _warned_emulation
    if not _warned_emulation:
        _warned_emulation = True
        warnings.warn("this GPU has no FP8 tensor cores (needs compute capability 8.9+): FP8 linear layers are "
                      "emulated in fp32 (same numerics, no speed-up)", stacklevel=3)


# -- forward and backward as plain functions (the fast path calls these directly) ----------------------------

class LinearSaved(NamedTuple):
    """What backward needs from forward: the FP8 input as an (M, K) matrix, W's amax, the input's shape/dtype."""

    x: QuantizedTensor
    weight_amax: torch.Tensor
    input_shape: torch.Size
    input_dtype: torch.dtype


def _as_linear_input(x) -> Optional[LinearInput]:
    if isinstance(x, LinearInput):
        return x
    if isinstance(x, QuantizedTensor):
        return LinearInput(x)
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], QuantizedTensor):
        return LinearInput(*x)  # (q, data_t) as the ops' quantize_output=True, output_transpose=True return it
    return None


def fp8_linear_forward(x: Union[torch.Tensor, QuantizedTensor, LinearInput], weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, recipe: Union[Recipe, str] = "fp8",
                       out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, LinearSaved]:
    """``y = x W^T + b`` with FP8 operands; returns ``(y, saved)`` for :func:`fp8_linear_backward`.

    ``x`` is a tensor (quantized here, or its attached FP8 copy reused), an already quantized input
    (QuantizedTensor), or a :class:`LinearInput` / ``(QuantizedTensor, transposed data)`` pair.
    ``out_dtype`` defaults to x's dtype.  No autograd: wrap it (see :class:`FP8Linear`).
    """
    recipe = resolve_recipe(recipe)
    x_in = _as_linear_input(x)
    if x_in is None:
        x_in = quantize_linear_input(x, recipe)
    x_q = x_in.q
    out_dtype = out_dtype or x_q.dtype
    if weight.dim() != 2 or x_q.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8 linear: input of shape {tuple(x_q.shape)} does not match weight of shape "
                         f"{tuple(weight.shape)} (need input[..., {weight.shape[1] if weight.dim() == 2 else '?'}])")
    w_q = fp8_weight(weight, recipe).q
    y = scaled_matmul(_as_matrix(x_q), w_q, torch.float32 if bias is not None else out_dtype, transpose_b=True,
                      fast_accumulation=recipe.fast_accumulation)
    if bias is not None:
        y = (y + bias.float()).to(out_dtype)
    y = y.reshape(*x_q.shape[:-1], weight.shape[0])
    # backward keeps one FP8 copy: the transposed one when the quantizer made it (the wgrad GEMM's layout)
    return y, LinearSaved(_as_matrix(x_q, x_in.data_t), w_q.amax, x_q.shape, x_q.dtype)


def fp8_linear_backward(dy: Union[torch.Tensor, LinearInput], saved: LinearSaved, weight: torch.Tensor, *,
                        recipe: Union[Recipe, str] = "fp8", has_bias: bool = False,
                        needs_input_grad: bool = True, needs_weight_grad: bool = True,
                        prediction: Optional[torch.Tensor] = None
                        ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`fp8_linear_forward` from the output gradient ``dy``.

    ``dy`` may also be an already quantized gradient (:class:`LinearInput`, e.g. from a producer that
    quantized it in its own pass).  dx comes back in the forward input's dtype and shape, dweight in the
    weight's dtype, dbias (an exact fp32 sum of dy) in the weight's dtype.  ``prediction``: see
    :func:`quantize_output_grad`.
    """
    recipe = resolve_recipe(recipe)
    n = weight.shape[0]
    dy_in = _as_linear_input(dy)
    if dy_in is None:
        dbias = dy.reshape(-1, n).float().sum(0) if has_bias else None
        dy_in = quantize_output_grad(dy, recipe, transpose=needs_weight_grad and wants_transpose(dy.device, recipe),
                                     prediction=prediction)
    else:
        dbias = dy_in.q.dequantize(torch.float32).reshape(-1, n).sum(0) if has_bias else None
    dy2 = _as_matrix(dy_in.q)
    dx = dweight = None
    if needs_input_grad:
        # dX = dY W: W is the second operand and must be column-major, i.e. the transposed FP8 weight
        w_in = fp8_weight(weight, recipe, amax=saved.weight_amax, transpose=wants_transpose(weight.device, recipe))
        w_q = w_in.q if w_in.data_t is None else _as_matrix(w_in.q, w_in.data_t)
        dx = scaled_matmul(dy2, w_q, saved.input_dtype,
                           fast_accumulation=recipe.fast_accumulation_grad_input).reshape(saved.input_shape)
    if needs_weight_grad:
        dweight = _weight_grad(dy_in, saved.x, weight.dtype)
    if dbias is not None:
        dbias = dbias.to(weight.dtype)
    return dx, dweight, dbias


def _weight_grad(dy: LinearInput, x: QuantizedTensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dW = dY^T X (contracting over tokens)."""
    q = dy.q
    if q.granularity.kind == "tensor" and x.granularity.kind == "tensor":
        dy_t = dy.data_t if dy.data_t is not None else q.data.reshape(-1, q.shape[-1]).t()
        dy_matrix = QuantizedTensor(dy_t, q.amax, q.fmt, q.granularity, dy_t.shape, q.dtype, scale_hint=q.scale_hint)
        return scaled_matmul(dy_matrix, x, out_dtype)
    # block scales run along the last dim, not along tokens: dequantize both (emulation)
    return (_as_matrix(q).dequantize(torch.float32).t() @ x.dequantize(torch.float32)).to(out_dtype)


# -- autograd ------------------------------------------------------------------------------------------------

def pack_quantized(q: QuantizedTensor):
    """``(tensors, meta)`` so a QuantizedTensor can go through ``ctx.save_for_backward``.  The GEMM scale the
    quantizer stored beside the amax travels too (a view of the same small buffer): without it backward would
    divide amax by the format's max again, one more launch per weight-gradient GEMM."""
    return (q.data, q.amax, q.scale_hint), (q.fmt, q.granularity, q.shape, q.dtype)


def unpack_quantized(meta, data, amax, scale=None) -> QuantizedTensor:
    fmt, granularity, shape, dtype = meta
    return QuantizedTensor(data, amax, fmt, granularity, shape, dtype, scale_hint=scale)


def save_linear(saved: LinearSaved):
    """``(tensors, meta)`` of a LinearSaved: tensors for save_for_backward (4: data, amax, scale, weight amax), meta
    to keep on ctx."""
    tensors, meta = pack_quantized(saved.x)
    return [*tensors, saved.weight_amax], (meta, saved.input_shape, saved.input_dtype)


def load_linear(meta, data, amax, scale, weight_amax) -> LinearSaved:
    q_meta, input_shape, input_dtype = meta
    return LinearSaved(unpack_quantized(q_meta, data, amax, scale), weight_amax, input_shape, input_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_in, recipe, out_dtype, save_reference, prediction):
        with autocast_off(x.device.type):
            y, saved = fp8_linear_forward(x_in if x_in is not None else x, weight, bias, recipe=recipe,
                                          out_dtype=out_dtype)
        if save_reference:
            # x is kept alive by another op anyway (attention's output): keep a reference and its amax, and
            # re-quantize in backward -- the same FP8 values, no second copy.  A detached alias, not x: saving x
            # would keep x's Python object alive, and with it the FP8 copies attached to it (nn.handoff) --
            # 2 bytes per element held until backward instead of none
            tensors, ctx.saved_meta = [x.detach(), saved.x.amax, saved.weight_amax], None
            ctx.input_shape = saved.input_shape
        else:
            tensors, ctx.saved_meta = save_linear(saved)
        # save_for_backward (not ctx attributes) so saved-tensor hooks -- offloading, checkpointing, the
        # memory accounting of the tests -- see every tensor backward keeps
        ctx.save_for_backward(*tensors, weight)
        ctx.recipe, ctx.has_bias = recipe, bias is not None
        ctx.grad_prediction = prediction[1:2] if prediction is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        *tensors, weight = ctx.saved_tensors
        with autocast_off(dy.device.type):
            if ctx.saved_meta is None:
                x, x_amax, weight_amax = tensors
                (fmt, granularity), _, _ = linear_formats(ctx.recipe)
                x_in = _quantize(x, fmt, granularity, amax=x_amax, transpose=wants_transpose(x.device, ctx.recipe))
                saved = LinearSaved(_as_matrix(x_in.q, x_in.data_t), weight_amax, ctx.input_shape, x.dtype)
            else:
                saved = load_linear(ctx.saved_meta, *tensors)
            dx, dweight, dbias = fp8_linear_backward(
                dy, saved, weight, recipe=ctx.recipe, has_bias=ctx.has_bias and ctx.needs_input_grad[2],
                needs_input_grad=ctx.needs_input_grad[0], needs_weight_grad=ctx.needs_input_grad[1],
                prediction=ctx.grad_prediction)
        return dx, dweight, dbias, None, None, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``x`` produces: the autocast dtype when autocast is on for x's device, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


_VIEW_NODES = {"ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0", "PermuteBackward0", "AliasBackward0",
               "AsStridedBackward0", "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0",
               "ReshapeAliasBackward0"}


def kept_by_attention(x: torch.Tensor) -> bool:
    """Whether ``x`` is a pure view of an attention kernel's output that the kernel saves for its backward.

    SDPA's flash / memory-efficient / cuDNN / CPU-flash kernels and flash-attn keep their output; when o_proj
    reads it through views only (no copy), o_proj can keep a reference instead of a second, FP8 copy.
    """
    node = x.grad_fn
    for _ in range(8):
        if node is None:
            return False
        name = type(node).__name__
        if getattr(node, "keeps_attention_output", False):  # fp8train.nn.fp8_saved_attention, mode "saved_lse"
            return True
        if "ScaledDotProduct" in name or "FlashAttn" in name:
            return hasattr(node, "_saved_output") or "FlashAttn" in name
        if name not in _VIEW_NODES:
            return False
        parents = [n for n, _ in node.next_functions if n is not None]
        if len(parents) != 1:
            return False
        node = parents[0]
    return False


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               recipe: Union[Recipe, str] = "fp8", save_input: str = "auto",
               prediction: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable ``F.linear`` with FP8 GEMMs (what :class:`FP8Linear` calls).

    Honours autocast: the output has the autocast dtype when autocast is on, else x's dtype.
    ``save_input="fp8"`` keeps the FP8 copy of x for backward; ``"reference"`` keeps x itself and
    re-quantizes it in backward (free when another op keeps x alive anyway); ``"auto"`` picks
    ``"reference"`` when x is a view of an attention output that the attention kernel saves
    (:func:`kept_by_attention`) and ``recipe.requantize_attention_output`` is on, else ``"fp8"``.
    ``prediction`` (``Recipe.delayed_scaling``): a 2-element float32 prediction buffer -- x's amax (when nothing
    attached an FP8 copy to x) and the output gradient's (when its producer published none) are predicted from the
    previous call instead of measured in a pass of their own.
    """
    if save_input not in ("auto", "fp8", "reference"):
        raise ValueError(f"save_input must be 'auto', 'fp8' or 'reference', got {save_input!r}")
    recipe = resolve_recipe(recipe)
    x_in = quantize_linear_input(x, recipe, prediction=prediction[0:1] if prediction is not None else None)
    reference = save_input == "reference" or (save_input == "auto" and recipe.requantize_attention_output
                                              and torch.is_grad_enabled() and kept_by_attention(x))
    return _FP8LinearFunction.apply(handoff.grad_input(x), weight, bias, x_in, recipe, compute_dtype(x), reference,
                                    prediction)


# -- the module ------------------------------------------------------------------------------------------------

def linear_sharing_parameters(linear: nn.Linear, cls: type, **kwargs) -> nn.Linear:
    """A ``cls`` layer (an nn.Linear subclass, or nn.Linear itself) holding ``linear``'s weight and bias
    Parameters -- no copy, so optimizers, checkpoints and FSDP keep seeing the same tensors."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
    new = cls(linear.in_features, linear.out_features, bias=False, device="meta", **kwargs)
    new.weight = linear.weight
    new.bias = linear.bias
    new.train(linear.training)
    return new


# set on the FP8Linear layers of a fused projection group (fp8train.nn.fused_projections)
PROJECTION_GROUP_ATTR = "_fp8train_projection_group"


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 and whose saved input is FP8.

    A subclass of nn.Linear with the same ``weight``/``bias`` parameters, so state dicts, safetensors
    checkpoints, exporters and FSDP see an ordinary Linear.  Build one from an existing layer with
    :meth:`from_linear` (it reuses that layer's Parameters) or directly like nn.Linear plus ``recipe=``.

    ``save_input`` (attribute): ``"auto"`` (default) saves the FP8 copy of the input for backward, except
    when the input is a view of an attention kernel's output that the kernel keeps anyway (o_proj after SDPA
    or FlashAttention) and ``Recipe.requantize_attention_output`` is on: then a reference costs no memory and
    backward re-quantizes it.  ``"fp8"`` / ``"reference"`` force one behaviour.

    With ``Recipe.delayed_scaling`` the layer keeps a 2-float ``scale_prediction`` buffer (non-persistent, like
    :class:`~fp8train.nn.precision_flow.FlowMLP`'s): the amaxes of its input and output gradient are predicted
    from the previous call wherever no producer hands them over (o_proj's input after attention, v_proj's
    gradient), so each is encoded in one pass (:mod:`fp8train.delayed_scaling`).
    """

    save_input: str = "auto"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: Union[Recipe, str] = "fp8"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = resolve_recipe(recipe)
        if not self.recipe.fp8_linears:
            raise ValueError(f"recipe {self.recipe.name!r} has fp8_linears=False; use nn.Linear instead")
        self._place_prediction()

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        # every assignment of a Parameter lands here: mark the weight for fp8train.AdamW's published amax
        super().register_parameter(name, param)
        if name == "weight" and param is not None:
            weight_amax.want(param)
            self._place_prediction()

    def _place_prediction(self) -> None:
        """(Re)create the prediction buffer beside the weight (from_linear builds the layer on the meta device
        and then hands it the real weight)."""
        recipe = self.__dict__.get("recipe")
        if recipe is None or not recipe.delayed_scaling or not recipe.per_tensor:
            return
        current = self._buffers.get(BUFFER_NAME)
        if current is None or current.device != self.weight.device:
            self.register_buffer(BUFFER_NAME, new_prediction(2, device=self.weight.device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Union[Recipe, str] = "fp8") -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s weight and bias Parameters (no copy)."""
        return linear_sharing_parameters(linear, cls, recipe=recipe)

    @eager_op  # eager FP8 ops; torch.compile compiles the model around them
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get(PROJECTION_GROUP_ATTR)  # Recipe.fused_qkv: one GEMM for q/k/v
        if group is not None:
            return group(self, x)
        return self.forward_single(x)

    def forward_single(self, x: torch.Tensor) -> torch.Tensor:
        """This layer on its own (what a fused projection group falls back to)."""
        return fp8_linear(x, self.weight, self.bias, recipe=self.recipe, save_input=self.save_input,
                          prediction=self._buffers.get(BUFFER_NAME))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts buffers too; the prediction stays float32 (the kernels read float32 amaxes)
        super()._apply(fn, recurse)
        prediction = self._buffers.get(BUFFER_NAME)
        if prediction is not None and prediction.dtype != torch.float32:
            self._buffers[BUFFER_NAME] = prediction.float()
        return self

    def extra_repr(self) -> str:
        saves = "" if self.save_input == "auto" else f", save_input={self.save_input}"
        return f"{super().extra_repr()}, recipe={self.recipe.name}{saves}"

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's Parameters (to undo a conversion)."""
        return linear_sharing_parameters(self, nn.Linear)
