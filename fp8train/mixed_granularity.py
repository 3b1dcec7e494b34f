"""COAT's mixed-granularity rule, in one place.

* Inputs of **non-linear** ops (norms, activations, the gated product) are saved for backward as **E4M3 with
  one scale per 1x16 group** along the last dim: :func:`save_for_nonlinear`.  Non-linear backward formulas
  are element-wise in their input, so an outlier only costs precision inside its own 16 elements.
* Inputs of **linear** layers are **E4M3 per-tensor** (one scalar scale, so the FP8 GEMM stays a plain scaled
  matmul): :func:`quantize_for_linear`.  The scale is just-in-time, from the two-stage "group scaling" amax
  (maxima of 1x16 groups, then the max of those), not a delayed history (``Recipe.delayed_scaling`` predicts the
  gated product's scales instead, and those of linear inputs and gradients whose producer hands over no amax --
  ``prediction=`` below -- with a just-in-time repair: :mod:`fp8train.delayed_scaling`).
* Output gradients of linear layers are **E5M2 per-tensor** (gradients need range more than precision):
  :func:`quantize_grad_for_linear`.

Metadata of the 1x16 copies: the group maxima are stored as **bfloat16, rounded up** (``scale_dtype=bf16`` of
:func:`fp8train.quant.quantize`).  That costs 2 B per 16 elements instead of 4, so a saved activation takes
1.125 B/element instead of 1.25; rounding *up* means no element is pushed past 448 (no saturation), and the
encoder divides by the stored (rounded) amax, so encode and decode agree exactly.  The per-tensor amax of
linear inputs stays float32 (one number; torch._scaled_mm wants float32 scales).

On CUDA (and when Triton imports) the quantizers run the Triton kernels of :mod:`fp8train.kernels.quantize`
with ``nonfinite="propagate"`` semantics (no host sync: a NaN/inf makes its group's amax NaN/inf and the
group dequantizes to NaN/inf).  On CPU they call :func:`fp8train.quant.quantize` -- the reference both share.

Tests can switch quantization off with :func:`quantization_disabled` (then the "saved" tensors are the exact
inputs, so backward formulas can be gradchecked in float64).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Union

import torch

from .formats import E4M3, E5M2
from .kernels import use_triton
from .quant import GROUP16, PER_TENSOR, Granularity, QuantizedTensor, quantize

__all__ = [
    "NONLINEAR_FORMAT",
    "NONLINEAR_GRANULARITY",
    "NONLINEAR_SCALE_DTYPE",
    "LINEAR_FORMAT",
    "GRAD_FORMAT",
    "save_for_nonlinear",
    "quantize_for_linear",
    "quantize_grad_for_linear",
    "quantization_disabled",
    "is_quantization_disabled",
    "UnquantizedTensor",
    "is_kernel_copy",
    "use_kernels",
    "pack",
    "unpack",
]

NONLINEAR_FORMAT = E4M3
NONLINEAR_GRANULARITY = GROUP16
NONLINEAR_SCALE_DTYPE = torch.bfloat16
LINEAR_FORMAT = E4M3
GRAD_FORMAT = E5M2

_disabled = False


@contextlib.contextmanager
def quantization_disabled():
    """Inside this block :func:`save_for_nonlinear` keeps exact copies (tests only: float64 gradchecks)."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


def is_quantization_disabled() -> bool:
    return _disabled


@dataclasses.dataclass
class UnquantizedTensor(QuantizedTensor):
    """Stand-in for a QuantizedTensor that holds the exact values (``quantization_disabled`` mode)."""

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.data.to(dtype or self.dtype)


def _exact(x: torch.Tensor) -> UnquantizedTensor:
    data = x.detach()
    return UnquantizedTensor(data=data, amax=data.new_zeros(()), fmt=None, granularity=None, shape=x.shape,
                             dtype=x.dtype)


def save_for_nonlinear(x: torch.Tensor) -> QuantizedTensor:
    """The copy of a non-linear op's input that backward uses: E4M3, 1x16 groups, bf16 rounded-up amax.

    ``data`` has ``x``'s shape (float8_e4m3fn), ``amax`` has shape ``(*x.shape[:-1], ceil(K/16))`` (bfloat16).
    """
    if _disabled:
        return _exact(x)
    if use_triton("save_for_nonlinear", x):
        from .kernels.quantize import quantize_groups

        return quantize_groups(x, NONLINEAR_FORMAT, group_size=16, scale_dtype=NONLINEAR_SCALE_DTYPE)
    return quantize(x, NONLINEAR_FORMAT, NONLINEAR_GRANULARITY, scale_dtype=NONLINEAR_SCALE_DTYPE,
                    nonfinite="propagate")


def _per_tensor(x: torch.Tensor, fmt, name: str, amax: Optional[torch.Tensor], with_transpose: bool,
                prediction: Optional[torch.Tensor] = None):
    if amax is not None:
        prediction = None  # a known amax needs no prediction (and must not update it)
    if use_triton(name, x):
        from .kernels.quantize import quantize_tensorwise

        return quantize_tensorwise(x, fmt, amax=amax, with_transpose=with_transpose, prediction=prediction)
    if prediction is not None and x.numel():
        from .delayed_scaling import encode_amax

        amax = encode_amax(x.detach().abs().amax().float(), prediction)
    q = quantize(x, fmt, PER_TENSOR, amax=amax, nonfinite="propagate")
    if not with_transpose:
        return q
    rows = q.data.numel() // q.shape[-1] if q.data.dim() else 1
    return q, q.data.reshape(rows, -1).t().contiguous()


def quantize_for_linear(x: torch.Tensor, *, amax: Optional[torch.Tensor] = None, with_transpose: bool = False,
                        prediction: Optional[torch.Tensor] = None
                        ) -> Union[QuantizedTensor, tuple[QuantizedTensor, torch.Tensor]]:
    """E4M3 per-tensor copy of a linear layer's input (amax: the two-stage group-scaling max, float32 0-d).

    ``amax`` may be given when the producer already knows it; else ``prediction`` (a 1-element float32 view of a
    prediction buffer) encodes with the amax predicted from the previous call, repaired when wrong
    (:mod:`fp8train.delayed_scaling`; one pass over x on the GPU instead of two).  With ``with_transpose=True``
    also returns the transposed data ``(K, M)`` of ``x`` viewed as ``(M, K)`` (row-major), which the
    weight-gradient GEMM needs: ``torch._scaled_mm`` wants its first operand row-major and its second
    column-major.
    """
    return _per_tensor(x, LINEAR_FORMAT, "quantize_for_linear", amax, with_transpose, prediction)


def quantize_grad_for_linear(g: torch.Tensor, *, amax: Optional[torch.Tensor] = None, with_transpose: bool = False,
                             prediction: Optional[torch.Tensor] = None
                             ) -> Union[QuantizedTensor, tuple[QuantizedTensor, torch.Tensor]]:
    """E5M2 per-tensor copy of an output gradient (same options as :func:`quantize_for_linear`)."""
    return _per_tensor(g, GRAD_FORMAT, "quantize_grad_for_linear", amax, with_transpose, prediction)


def use_kernels(op: str, *tensors) -> bool:
    """Whether ``op`` runs its fused Triton kernel (CUDA inputs the kernels cover, quantization enabled)."""
    return not _disabled and use_triton(op, *tensors)


def is_kernel_copy(q: QuantizedTensor) -> bool:
    """Whether ``q`` is a copy the fused kernels can read: CUDA, E4M3, 1x16 groups, contiguous."""
    return (not isinstance(q, UnquantizedTensor) and q.fmt == NONLINEAR_FORMAT and q.granularity == GROUP16
            and q.data.is_cuda and q.data.is_contiguous() and q.amax.is_contiguous())


# -- saving QuantizedTensors through autograd's save_for_backward ---------------------------------------------
# ctx.save_for_backward keeps saved-tensor hooks (activation offloading, checkpointing, our byte counts) working;
# a QuantizedTensor is not a tensor, so it travels as (data, amax) plus static metadata kept on ctx.

@dataclasses.dataclass(frozen=True)
class QuantMeta:
    fmt: object
    granularity: Optional[Granularity]
    shape: torch.Size
    dtype: torch.dtype
    exact: bool


def pack(q: QuantizedTensor) -> tuple[tuple[torch.Tensor, torch.Tensor], QuantMeta]:
    """``(tensors, meta)`` to store a QuantizedTensor with ``ctx.save_for_backward(*tensors)``."""
    meta = QuantMeta(q.fmt, q.granularity, q.shape, q.dtype, isinstance(q, UnquantizedTensor))
    return (q.data, q.amax), meta


def unpack(meta: QuantMeta, data: torch.Tensor, amax: torch.Tensor) -> QuantizedTensor:
    cls = UnquantizedTensor if meta.exact else QuantizedTensor
    return cls(data=data, amax=amax, fmt=meta.fmt, granularity=meta.granularity, shape=meta.shape, dtype=meta.dtype)
