"""Chunked fused linear + cross-entropy: the loss of a causal LM without materialising its logits.

A 32k-vocabulary model at 8k tokens per micro-batch holds 0.5 GB of bf16 logits, 1 GB of fp32 logits for the
loss and as much again for their gradient.  Here the lm_head product, the log-softmax and the gradient are
done ``chunk_rows`` tokens at a time: during the forward pass each chunk's gradient w.r.t. the hidden states
and the head weight is computed at once (softmax - one_hot), so nothing vocabulary-sized outlives its chunk.
Backward only scales the stored gradients by the incoming scalar.

The reference it is checked against is the plain ``F.cross_entropy(hidden @ weight.T, labels)``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import use_triton

IGNORE_INDEX = -100


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32: on CUDA with bf16/fp16 operands the GEMM adds its fp32 result into
    ``acc`` itself (torch.addmm with out_dtype: no rounded bf16 product, no cast, no separate add -- 0.6 ms of
    a 953M step); elsewhere, and under torch.compile (dynamo cannot trace addmm's ``out=`` with ``out_dtype``:
    graph break gb4315, a hard error inside an autograd.Function), the product is rounded to the operands'
    dtype and added."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) \
            and _fp32_out_gemm() and not torch.compiler.is_compiling():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a.matmul(b).to(acc.dtype)


@functools.lru_cache(maxsize=None)
def _fp32_out_gemm() -> bool:
    """torch.addmm takes out_dtype (torch >= 2.8)."""
    return hasattr(torch.ops.aten.addmm, "dtype_out")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows, ignore_index, denominator):
        n_rows = hidden.shape[0]
        compute_dtype = hidden.dtype
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 in exact tests
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) \
            if weight.requires_grad else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) \
            if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        wants_grad = grad_hidden is not None or grad_weight is not None
        # one Triton pass per chunk for loss and gradient (no bias: its gradient needs the fp32 rows)
        fused = acc_dtype == torch.float32 and grad_bias is None and use_triton("cross_entropy", hidden, weight)
        if fused:
            from ..kernels.cross_entropy import cross_entropy_rows

            grad_scale = 1.0 / denominator.to(torch.float32) if wants_grad else None
        for start in range(0, n_rows, chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = labels[start:start + chunk_rows]
            if fused:
                row_loss, grad_logits = cross_entropy_rows(F.linear(h, w, b), y, ignore_index, grad_scale)
                total += row_loss.sum()
                if grad_hidden is not None:
                    torch.matmul(grad_logits, w, out=grad_hidden[start:start + chunk_rows])
                if grad_weight is not None:
                    _accumulate_product(grad_weight, grad_logits.t(), h)
                continue
            logits = F.linear(h, w, b).to(acc_dtype)
            valid = y != ignore_index
            safe_y = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(loss)/d(logits) = (softmax - one_hot) / denominator on valid rows, 0 elsewhere
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits.scatter_add_(1, safe_y[:, None], torch.full_like(picked[:, None], -1.0))
            grad_logits *= (valid.to(acc_dtype) / denominator.to(acc_dtype))[:, None]
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = (grad_logits.to(compute_dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t().to(compute_dtype).matmul(h).to(acc_dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total / denominator.to(acc_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        dh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = None
        if grad_weight is not None:  # scaled and rounded in one pass (the fp32 product is never stored)
            dw = torch.mul(grad_weight, grad_output, out=torch.empty_like(grad_weight, dtype=ctx.weight_dtype))
        db = (grad_bias * grad_output).to(ctx.bias_dtype) if grad_bias is not None else None
        return dh, dw, db, None, None, None, None


def auto_chunk_rows(rows: int) -> int:
    """Tokens per chunk when none is given: an eighth of the batch, from 2048 to 8192.  Small batches keep
    2048-token chunks (the least memory: a chunk's bf16 logits and gradient, 0.26 GB at a 32k vocabulary);
    large ones take 8192, whose longer head GEMMs ran a 953M batch-32 step 0.85 % faster at the same peak
    (at batch 4 they would add 0.65 GB to a 10.75 GB peak for 0.5 %; docs/performance.md, "Session 15")."""
    return min(8192, max(2048, rows // 8))


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 bias: Optional[torch.Tensor] = None, *, chunk_rows: Optional[int] = None,
                                 ignore_index: int = IGNORE_INDEX,
                                 num_items_in_batch: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (rows = tokens).

    ``hidden`` is (tokens, H) or (..., H) with labels of the same leading shape.  Rows whose label is
    ``ignore_index`` do not count.  ``num_items_in_batch`` replaces the mean's denominator (transformers
    passes it for gradient accumulation).  ``chunk_rows``: tokens per chunk (None: :func:`auto_chunk_rows`);
    it changes memory and speed, and the result only by the order of fp32 sums.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if chunk_rows is None:
        chunk_rows = auto_chunk_rows(hidden.shape[0])
    labels = labels.reshape(-1).to(hidden.device)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    # the denominator stays on the device: no host sync, so the loss can be captured in a CUDA graph
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    else:
        denominator = (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    # torch.autocast, not eager_ops.autocast_off: this runs inside torch.compile'd models too (dynamo knows autocast)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_rows, ignore_index, denominator)


def enable_chunked_loss(model, chunk_rows: Optional[int] = None):
    """Make a Hugging Face causal LM compute its training loss with the chunked fused head + loss.

    Only calls that pass ``labels`` change: they return ``loss`` and ``logits=None``.  Everything else
    (generation, evaluation without labels) runs the model's own forward.  Models whose head is not a plain
    linear (e.g. logit soft-capping) are left alone with a warning.  ``chunk_rows``: tokens per chunk
    (``Recipe.loss_chunk_rows``).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if head is None or decoder is None or not isinstance(head, torch.nn.Linear) or \
            getattr(model.config, "final_logit_softcapping", None):
        warnings.warn(f"{type(model).__name__}: no plain linear lm_head found; chunked loss not enabled",
                      stacklevel=2)
        return model
    if getattr(model, "_fp8train_chunked_loss", False):
        return model
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None (scaled with the batch), got {chunk_rows!r}")
    original_forward = model.forward

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, shift_labels=None,
                **kwargs):
        if labels is None or kwargs.get("return_dict") is False:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        # a loss needs no key/value cache; transformers would otherwise build one (a concatenation of every
        # layer's keys and values, ~3 % of a 953M training step) unless told
        kwargs.setdefault("use_cache", False)
        outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = outputs.last_hidden_state
        if shift_labels is not None:  # transformers' convention: the targets of every position, already shifted
            targets = shift_labels
        else:
            # position t predicts token t + 1; the last position has nothing to predict and gets the ignore
            # label (cheaper than slicing the hidden states, which would copy them and their gradient)
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss = chunked_linear_cross_entropy(hidden, head.weight, targets, head.bias, chunk_rows=chunk_rows,
                                            num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)

    model.forward = forward
    model._fp8train_chunked_loss = True
    return model
