"""Loss-landscape sharpness for autoregressive LMs: the epsilon-sharpness of the last position's logits.

The measure of "To FP8 and Back Again" (Lee et al., arXiv 2405.18710), which adapts the epsilon-sharpness of
Keskar et al. (2017) from weights to the logits of the last token (that token attends to the whole context,
and the measure needs one forward pass).  For each sequence of a fixed batch, with ``z`` in R^V the logits at
the last position and ``y`` the token that follows it:

    f(z)     = CE(z, y) = logsumexp(z) - z_y
    C_eps(z) = { delta in R^V : |delta_i| <= eps * (|z_i| + 1) }            (a box around z)
    S(z, y)  = 100 * ( max_{delta in C_eps(z)} f(z + delta) - f(z) ) / (1 + f(z))

and the reported sharpness is the mean of S over the batch's sequences.  A steady rise of S before a loss
spike is the paper's early warning of instability.

The inner maximum has a closed form.  Write f(z + delta) = log sum_j exp((z_j + delta_j) - (z_y + delta_y)):
every term grows with delta_j for j != y and shrinks with delta_y, so the maximum sits at the corner

    delta*_j = +eps * (|z_j| + 1)   (j != y),        delta*_y = -eps * (|z_y| + 1).

(Projected sign-gradient ascent -- the notes' suggested solver -- lands on this corner after one full step,
because grad f = softmax(z + delta) - onehot(y) is positive for j != y and negative for y everywhere.)
:func:`last_token_sharpness` uses the closed form; :func:`epsilon_sharpness` is the generic projected ascent
for any per-row loss (used by the tests to confirm the corner, and for other losses).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["logit_box", "last_token_sharpness", "epsilon_sharpness", "model_sharpness", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-3  # Keskar et al. use 1e-3 and 5e-4


def logit_box(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Half-widths ``r = eps * (|z| + 1)`` of the box C_eps(z)."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return eps * (z.abs() + 1.0)


def _relative_increase(worst: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return 100.0 * (worst - base) / (1.0 + base)


def last_token_sharpness(logits: torch.Tensor, targets: torch.Tensor, eps: float = DEFAULT_EPS,
                         reduction: str = "mean") -> torch.Tensor:
    """S for last-position ``logits`` (B, V) and their ``targets`` (B,), exact (closed form, float64).

    ``reduction``: ``"mean"`` (a 0-d tensor) or ``"none"`` (one value per sequence).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, V) and targets (B,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}; pass the last position only (logits[:, -1])")
    z = logits.detach().double()
    y = targets.to(z.device).long().reshape(-1, 1)
    r = logit_box(z, eps)
    worst_delta = r.scatter(1, y, -r.gather(1, y))  # +r everywhere, -r at the target
    base = torch.logsumexp(z, 1) - z.gather(1, y).squeeze(1)
    moved = z + worst_delta
    worst = torch.logsumexp(moved, 1) - moved.gather(1, y).squeeze(1)
    s = _relative_increase(worst, base)
    if reduction == "none":
        return s
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return s.mean()


def epsilon_sharpness(loss: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, eps: float = DEFAULT_EPS,
                      steps: int = 20, step_size: float = 0.25) -> torch.Tensor:
    """S for any per-row ``loss`` (maps (B, V) to (B,)) by projected sign-gradient ascent in C_eps(z).

    Each step moves ``step_size`` of the box half-width along the sign of the gradient and projects back onto
    the box; the best value seen is kept.  Returns S per row (float64).  This is a local search: for losses
    that are not monotone along the box's edges it gives a lower bound of the maximum.
    """
    z = z.detach().double()
    r = logit_box(z, eps)
    base = loss(z).detach()
    best = base.clone()
    delta = torch.zeros_like(z)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            value = loss(z + delta)
            (grad,) = torch.autograd.grad(value.sum(), delta)
        best = torch.maximum(best, value.detach())
        delta = torch.clamp(delta.detach() + step_size * r * grad.sign(), -r, r)
    best = torch.maximum(best, loss(z + delta).detach())
    return _relative_increase(best, base)


def model_sharpness(model, batch: torch.Tensor, eps: float = DEFAULT_EPS, autocast: bool = False,
                    device: Optional[torch.device] = None) -> float:
    """Mean S of a causal LM on a token block ``batch`` of shape (B, T+1).

    The model reads ``batch[:, :-1]``; its logits at the last position are scored against ``batch[:, -1]``.
    Runs in eval mode without gradients (the model's mode is restored), under bf16 autocast when asked.
    """
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected a token block (B, T+1) with T >= 1, got shape {tuple(batch.shape)}")
    device = device or next(model.parameters()).device
    inputs, targets = batch[:, :-1].to(device), batch[:, -1].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            try:
                logits = model(input_ids=inputs, logits_to_keep=1).logits  # HF: LM head on the last position only
            except TypeError:
                logits = model(input_ids=inputs).logits
    finally:
        model.train(was_training)
    return float(last_token_sharpness(logits[:, -1].float(), targets, eps))
