"""Cross-entropy of one chunk of logits and its gradient, in one kernel: loss per row and (softmax - one_hot) * scale.

The torch reference (``fp8train.nn.chunked_cross_entropy``) upcasts the chunk's bf16 logits to fp32 and then runs
logsumexp, gather, softmax, scatter_add and a scaling as separate kernels, and casts the gradient back to bf16 twice
for the two GEMMs that consume it: about ten passes over a (rows x vocabulary) fp32 tensor.  Here each program owns
one row: a first sweep keeps a running maximum and sum of exponentials per lane (online softmax), a second sweep
writes the gradient straight in the GEMMs' dtype.  Two reads of the bf16 row (the second mostly from L2) and one
write.  Vocabulary size and row count are runtime values: no recompiles for new shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from .launch import fast_launch, next_power_of_2

__all__ = ["cross_entropy_rows"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@fast_launch
@triton.jit(do_not_specialize=["V", "ignore_index"])
def _cross_entropy_rows_kernel(logits_ptr, stride_logits, labels_ptr, scale_ptr, loss_ptr, grad_ptr, stride_grad,
                               V, ignore_index, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    lanes = tl.arange(0, BLOCK_V)

    # sweep 1: per-lane running max and sum of 2^((x - max) * log2 e); merged across lanes at the end
    lane_max = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        # lanes that have only seen -inf keep a zero sum (avoid inf - inf)
        keep = tl.where(lane_max == float("-inf"), 0.0, tl.exp2((lane_max - new_max) * _LOG2E))
        add = tl.where(x == float("-inf"), 0.0, tl.exp2((x - new_max) * _LOG2E))
        lane_sum = lane_sum * keep + add
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    scaled = tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp2((lane_max - row_max) * _LOG2E))
    lse = row_max + tl.log2(tl.sum(scaled, axis=0)) * _LN2

    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.minimum(tl.maximum(tl.where(valid, label, 0), 0), V - 1)  # never read outside the row
    picked = tl.load(row_ptr + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))

    if WRITE_GRAD:
        # d loss / d logits = (softmax - one_hot) * scale on rows with a label, 0 on ignored rows
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        out_ptr = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp2((x - lse) * _LOG2E)
            p = tl.where(cols == safe_label, p - 1.0, p)
            tl.store(out_ptr + cols, (p * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                       grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss (float32, 0 on ignored rows) of 2-D ``logits`` and, when ``grad_scale`` (a 0-d float32
    device tensor) is given, the gradient ``(softmax - one_hot) * grad_scale`` in logits' dtype."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if grad_scale is not None else None
    if rows == 0:
        return loss, grad
    block_v = min(4096, next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, grad_scale if grad_scale is not None else loss, loss,
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0, vocab, ignore_index,
        BLOCK_V=block_v, WRITE_GRAD=grad is not None, num_warps=8)
    return loss, grad
