"""Rotary position embedding in one fused kernel, bit-identical to Hugging Face's eager ``apply_rotary_pos_emb``.

    q_embed, k_embed = fused_rotary_embedding(q, k, cos, sin)        # same call as HF's apply_rotary_pos_emb
    install_fused_rotary(model.model.layers[0].self_attn)            # what fp8train.convert does per block

HF computes ``q * cos + rotate_half(q) * sin`` (rotate_half(x) = cat(-x2, x1)) as separate element-wise ops:
about ten kernels per layer forward and backward.  :func:`fused_rotary_embedding` does q and k in one Triton
launch forward and one backward, rounding exactly where torch does (see :mod:`fp8train.kernels.rotary`), so
outputs and gradients are the same bits as HF's, dtype promotion included: under autocast with fp32 cos/sin and
bf16 q/k the outputs are fp32, as HF's are.  Memory layouts match too (they decide the summation order of
later reductions): the outputs have the layout torch's element-wise ops give (q's, for HF's transposed views),
the q/k gradients are contiguous, as autograd's sums of HF's partial gradients are.

On CPU, for inputs the kernel does not cover (odd head_dim or above 256, other ranks, cos/sin that need a
gradient) and inside torch.compile, the plain torch ops run instead.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional

import torch
from torch import nn

from . import grad_amax

__all__ = ["rotary_embedding_reference", "rotary_embedding_backward_reference", "fused_rotary_embedding",
           "RotaryEmbeddingFunction", "kernel_supports", "install_fused_rotary", "remove_fused_rotary",
           "is_fused_rotary"]

MAX_HEAD_DIM = 256


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` with cos/sin unsqueezed at
    ``unsqueeze_dim`` -- Hugging Face's ``apply_rotary_pos_emb``, op for op."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_embedding_backward_reference(grad_out, cos, sin, dtype: torch.dtype, unsqueeze_dim: int = 1):
    """The gradient that autograd of :func:`rotary_embedding_reference` gives q (or k) of ``dtype``.

    Each partial gradient is a product in the output dtype that the engine then casts to ``dtype``: ``grad * cos``
    for the direct term, ``grad * sin`` through rotate_half's backward (``[y1, y2] -> [y2, -y1]``).  Autograd adds
    them with rotate_half's zero-padded slice gradients, so a zero sum is +0; ``+ 0.0`` does the same here.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    direct = (grad_out * cos).to(dtype)
    y1, y2 = (grad_out * sin).to(dtype).chunk(2, dim=-1)
    # autograd runs rotate_half's backward first (its nodes are newer), so the sum lands in its contiguous,
    # zero-padded gradient buffer: the result is contiguous whatever grad_out's layout
    grad = torch.cat((y2, -y1), dim=-1).contiguous()
    grad += direct
    return grad + 0.0


def _head_axis(unsqueeze_dim) -> Optional[int]:
    """The axis of q/k that holds heads (where cos/sin broadcast): 1 for (B, H, S, D), 2 for (B, S, H, D)."""
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int):
        return None
    axis = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim
    return axis if axis in (1, 2) else None


def _broadcasts_to(t: torch.Tensor, cos_unsqueezed: torch.Tensor) -> bool:
    """``torch.broadcast_shapes(t.shape, cos.shape) == t.shape``, in plain Python (torch's is ~20x slower, and this
    runs for every attention layer)."""
    t_shape, c_shape = t.shape, cos_unsqueezed.shape
    if len(c_shape) > len(t_shape):
        return False
    return all(c == 1 or c == n for c, n in zip(reversed(c_shape), reversed(t_shape)))


def _function_supports(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Inputs whose result has q's/k's shape and an even head_dim (what the explicit backward assumes)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)) or cos.shape != sin.shape:
        return False
    if not all(t.is_floating_point() for t in (q, k, cos, sin)) or q.shape[-1] % 2 or k.shape[-1] != q.shape[-1]:
        return False
    try:
        cos_u = cos.unsqueeze(unsqueeze_dim)
    except (IndexError, RuntimeError, TypeError):
        return False
    return _broadcasts_to(q, cos_u) and _broadcasts_to(k, cos_u)


def kernel_supports(q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:
    """Whether the Triton kernel handles these inputs: CUDA float32/bf16/fp16, 4-D q/k with equal batch and
    sequence sizes, 3-D (batch or 1, seq, head_dim) cos/sin of one dtype, unsqueeze_dim 1 or 2, head_dim even and
    at most 256."""
    from ..kernels import use_triton

    return _kernel_shapes(q, k, cos, sin, unsqueeze_dim) and use_triton("rotary_embedding", q, k, cos, sin, group=1)


def _kernel_shapes(q, k, cos, sin, unsqueeze_dim) -> bool:
    axis = _head_axis(unsqueeze_dim)
    if axis is None or not _function_supports(q, k, cos, sin, unsqueeze_dim):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.dtype != sin.dtype:
        return False
    if q.shape[-1] > MAX_HEAD_DIM or k.shape[0] != q.shape[0] or k.shape[3 - axis] != q.shape[3 - axis]:
        return False
    return len({q.device, k.device, cos.device, sin.device}) == 1


def _as_bshd(t: torch.Tensor, axis: int) -> torch.Tensor:
    """A (batch, position, head, dim) view of a 4-D q/k-shaped tensor whose head axis is ``axis``."""
    return t if axis == 2 else t.transpose(1, 2)


def _run_kernel(q, k, q_out, k_out, cos, sin, axis: int, backward: bool, amax_slots=None) -> None:
    from ..kernels.rotary import rotary_apply

    q4 = _as_bshd(q, axis)
    batch, seq, _, dim = q4.shape
    rotary_apply(q4, _as_bshd(k, axis), _as_bshd(q_out, axis), _as_bshd(k_out, axis),
                 cos.expand(batch, seq, dim), sin.expand(batch, seq, dim), backward=backward,
                 amax_slots=amax_slots)


@functools.lru_cache(maxsize=256)
def _output_strides(q_shape, q_stride, q_dtype, cos_shape, cos_stride, cos_dtype, unsqueeze_dim):
    """The strides of Hugging Face's output: torch's element-wise ops order the output's dimensions like their
    inputs' (q's layout for its transposed views); meta tensors run the same layout logic without data."""
    q = torch.empty_strided(q_shape, q_stride, dtype=q_dtype, device="meta")
    cos = torch.empty_strided(cos_shape, cos_stride, dtype=cos_dtype, device="meta")
    return rotary_embedding_reference(q, q, cos, cos, unsqueeze_dim)[0].stride()


def _empty_output(x, cos, unsqueeze_dim):
    strides = _output_strides(tuple(x.shape), x.stride(), x.dtype, tuple(cos.shape), cos.stride(), cos.dtype,
                              unsqueeze_dim)
    return torch.empty_strided(x.shape, strides, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)


@functools.lru_cache(maxsize=256)
def _dense_strides_like(shape, stride):
    """torch.empty_like's layout for a tensor of ``shape`` / ``stride``: the same strides when those are dense,
    else dense strides in the same dimension order (meta tensors: no allocation)."""
    return torch.empty_like(torch.empty_strided(shape, stride, device="meta")).stride()


def _empty_like_layout(shape, stride, dtype, device) -> torch.Tensor:
    """An empty tensor laid out like one of ``shape`` / ``stride`` (see :func:`_dense_strides_like`) -- for a
    q/k view with gaps (a slice of a fused q/k/v projection) still the projection's order, so the view backward
    copies nothing."""
    return torch.empty_strided(shape, _dense_strides_like(tuple(shape), tuple(stride)), dtype=dtype, device=device)


class RotaryEmbeddingFunction(torch.autograd.Function):
    """Rotary embedding of q and k with an explicit backward: the Triton kernels on CUDA (when
    :func:`kernel_supports`), the torch references elsewhere.  cos/sin get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        use_kernel = kernel_supports(q, k, cos, sin, unsqueeze_dim)
        if use_kernel:
            q_out, k_out = _empty_output(q, cos, unsqueeze_dim), _empty_output(k, cos, unsqueeze_dim)
            _run_kernel(q, k, q_out, k_out, cos, sin, _head_axis(unsqueeze_dim), backward=False)
        else:
            q_out, k_out = rotary_embedding_reference(q, k, cos, sin, unsqueeze_dim)
        ctx.save_for_backward(cos, sin)
        ctx.use_kernel = use_kernel
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.inputs = [(q.shape, q.stride(), q.dtype), (k.shape, k.stride(), k.dtype)]
        return q_out, k_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q_out, grad_k_out):
        cos, sin = ctx.saved_tensors
        if ctx.use_kernel:
            # in q's / k's own layout -- for Hugging Face's transposed views of a projection's output that makes
            # autograd's transpose and view backward free (autograd's gradients of HF's ops come contiguous and
            # cost a copy back into the projection's layout: 1.5 ms of a 953M step).  Same values bit for bit;
            # a later reduction over them (a q_norm's weight gradient) may sum in another order than HF's.
            grad_q, grad_k = (_empty_like_layout(shape, stride, dtype, cos.device)
                              for shape, stride, dtype in ctx.inputs)
            # the kernel also finds max|grad| of q and k for the projections' E5M2 quantizers (grad_amax)
            slots = grad_amax.new_slot(cos.device, count=2) if grad_amax.enabled() else None
            _run_kernel(grad_q_out, grad_k_out, grad_q, grad_k, cos, sin, _head_axis(ctx.unsqueeze_dim),
                        backward=True, amax_slots=slots)
            if slots is not None:
                grad_amax.publish(grad_q, slots[0])
                grad_amax.publish(grad_k, slots[1])
        else:
            (_, _, q_dtype), (_, _, k_dtype) = ctx.inputs
            grad_q = grad_k = None
            if ctx.needs_input_grad[0]:
                grad_q = rotary_embedding_backward_reference(grad_q_out, cos, sin, q_dtype, ctx.unsqueeze_dim)
            if ctx.needs_input_grad[1]:
                grad_k = rotary_embedding_backward_reference(grad_k_out, cos, sin, k_dtype, ctx.unsqueeze_dim)
        return grad_q, grad_k, None, None, None


def fused_rotary_embedding(q, k, cos, sin, unsqueeze_dim: int = 1):
    """``(q_embed, k_embed)`` as Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``, with the
    same bits forward and backward.  One Triton launch for q and k on CUDA; the torch reference elsewhere, and
    plain autograd of the reference when cos/sin need a gradient."""
    if not _function_supports(q, k, cos, sin, unsqueeze_dim) or (
            torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return rotary_embedding_reference(q, k, cos, sin, unsqueeze_dim)
    return RotaryEmbeddingFunction.apply(q, k, cos, sin, unsqueeze_dim)


# -- installation into Hugging Face model families ------------------------------------------------------------

_MARK = "_fp8train_fused_rotary"
_NAME = "apply_rotary_pos_emb"
_rejected: dict[str, int] = {}  # module name -> id of the function found to differ from the reference


def is_fused_rotary(fn) -> bool:
    """Whether ``fn`` is a wrapper made by :func:`install_fused_rotary`."""
    return bool(getattr(fn, _MARK, False))


def _use_fused(q, k, cos, sin, unsqueeze_dim) -> bool:
    """The installed wrapper's choice: CUDA inputs the kernel covers, outside torch.compile (compiled graphs fuse
    the torch ops themselves), cos/sin without gradients; everything else keeps the original function."""
    return (isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
            and kernel_supports(q, k, cos, sin, unsqueeze_dim))


def _make_wrapper(original):
    @functools.wraps(original)  # also sets wrapper.__wrapped__ = original
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _use_fused(q, k, cos, sin, unsqueeze_dim):
            return RotaryEmbeddingFunction.apply(q, k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, _MARK, True)
    return apply_rotary_pos_emb


def _behaves_like_reference(fn) -> bool:
    """Whether ``fn(q, k, cos, sin, unsqueeze_dim)`` gives the reference's bits and gradients on small CPU inputs
    (both layouts, fp32 / bf16 / bf16 with fp32 cos, GQA, cos halves that differ).  Partial-rotary or
    interleaved variants fail this and are left alone."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    if names != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return False
    gen = torch.Generator().manual_seed(0)  # a private generator: the model's RNG stream stays untouched
    for q_dtype, cos_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (torch.bfloat16, torch.float32)):
        for unsqueeze_dim in (1, 2):
            shape_q, shape_k = ((2, 4, 3, 8), (2, 2, 3, 8)) if unsqueeze_dim == 1 else ((2, 3, 4, 8), (2, 3, 2, 8))
            q = torch.randn(shape_q, generator=gen).to(q_dtype)
            k = torch.randn(shape_k, generator=gen).to(q_dtype)
            cos, sin = (torch.randn(2, 3, 8, generator=gen).to(cos_dtype) for _ in range(2))
            dq = torch.randn(shape_q, generator=gen).to(torch.promote_types(q_dtype, cos_dtype))
            dk = torch.randn(shape_k, generator=gen).to(dq.dtype)
            results = []
            for f in (fn, rotary_embedding_reference):
                qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
                try:
                    with torch.enable_grad():
                        out_q, out_k = f(qq, kk, cos, sin, unsqueeze_dim)
                        grads = torch.autograd.grad((out_q, out_k), (qq, kk), (dq, dk))
                except Exception:  # noqa: BLE001 - a function that cannot take these inputs is not HF's
                    return False
                results.append((out_q, out_k, *grads))
            if not all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                       for a, b in zip(*results)):
                return False
    return True


def install_fused_rotary(attention: nn.Module) -> Optional[str]:
    """Make the model family of ``attention`` use :func:`fused_rotary_embedding`; returns the Python module
    patched (or already patched), None when nothing was changed.

    The module that defines ``type(attention)`` (e.g. ``transformers.models.llama.modeling_llama``) must have a
    module-level ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` that behaves exactly like Hugging
    Face's standard one (checked once on small CPU inputs); it is replaced by a wrapper that calls the fused op
    for CUDA inputs it supports outside torch.compile, and the original (``wrapper.__wrapped__``) otherwise.
    The attention forward looks the name up at call time, so this affects every model of that family in the
    process -- harmless, because the results are bit-identical.  Installing twice wraps once;
    :func:`remove_fused_rotary` undoes it.
    """
    module = sys.modules.get(type(attention).__module__)
    original = getattr(module, _NAME, None)
    if module is None or not callable(original):
        return None
    if is_fused_rotary(original):
        return module.__name__
    if _rejected.get(module.__name__) == id(original):
        return None
    if not _behaves_like_reference(original):
        _rejected[module.__name__] = id(original)
        return None
    setattr(module, _NAME, _make_wrapper(original))
    return module.__name__


def remove_fused_rotary(attention: nn.Module) -> bool:
    """Restore the original ``apply_rotary_pos_emb`` of ``attention``'s model family; True if one was installed."""
    module = sys.modules.get(type(attention).__module__)
    fn = getattr(module, _NAME, None)
    if not is_fused_rotary(fn):
        return False
    setattr(module, _NAME, fn.__wrapped__)
    return True
