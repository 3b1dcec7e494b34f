"""Delayed scaling with overflow repair: per-tensor FP8 scales predicted from the previous call, in one pass.

Just-in-time per-tensor scaling (COAT's rule, :mod:`fp8train.mixed_granularity`) needs the tensor's amax before
the first value can be encoded, so a fused producer reads its inputs twice: once for the amax, once to write FP8.
For the gated product ``act(gate) * up`` and its two gradients that second read was a quarter to a third of
their kernels' time (benchmarks/results/2026-11-28-h100-session9-ops-final.md).

With ``Recipe(delayed_scaling=True)`` those three tensors -- and, since session 11, the inputs and output gradients
of FP8 linear layers whose producer hands over no amax (o_proj's input after attention, v_proj's gradient; see
:class:`fp8train.nn.linear.FP8Linear`) -- are encoded in the same pass that computes (or first reads) them, with
a *predicted* amax: ``MARGIN`` x the amax this site saw on its previous call (a per-module device buffer, so CUDA
graph replays and gradient accumulation keep it up to date).  Unlike TransformerEngine's delayed scaling, nothing
saturates: the pass also folds the true amax into a slot, and a repair pass that runs right after re-encodes the
tensor with the just-in-time scale whenever the prediction was wrong -- below the true amax (the first call, an
amax jump of more than ``MARGIN`` x, NaN/inf) or more than ``HEADROOM`` x above it (an amax collapse, or a buffer
holding garbage).  When no repair is needed its programs read four numbers and exit.

So values are never clipped, and the only difference to just-in-time scaling is a scale at most ``HEADROOM`` = 8x
larger than needed: at most 3 binades at the bottom of the format's range are given up (values up to 8x larger
than before become subnormal or flush to zero; E4M3 spans ~18 binades, E5M2 ~32).  The rule, per call, all on
the device (no host synchronisation):

    seen      = max |x|                                         (NaN if x has one)
    amax      = predicted if seen <= predicted <= HEADROOM * seen else seen   (encodes x; published with it)
    predicted = MARGIN * seen if that is finite else 0          (0: the next call is re-encoded just in time)

:func:`encode_amax` is the reference (used on CPU and as the oracle of the Triton kernels in
:mod:`fp8train.kernels.gated_product` and :mod:`fp8train.kernels.predicted_scale`).  The predictions live in the
``scale_prediction`` buffers of :class:`fp8train.nn.precision_flow.FlowMLP` (3 floats) and
:class:`fp8train.nn.linear.FP8Linear` (2) (non-persistent: model checkpoints keep HF's keys); :func:`prediction_state` /
:func:`load_prediction_state` let a trainer checkpoint carry them so that a resumed run continues bit for bit
(:func:`gathered_prediction_state` under FSDP: every rank's own).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

__all__ = ["MARGIN", "HEADROOM", "encode_amax", "new_prediction", "every_branch", "prediction_state",
           "gathered_prediction_state", "load_prediction_state", "predictions_unchanged"]

# powers of two: amax * MARGIN is exact; a prediction between seen and HEADROOM * seen costs at most 3 binades
MARGIN = 2.0
HEADROOM = 8.0
BUFFER_NAME = "scale_prediction"


def new_prediction(count: int, device=None) -> torch.Tensor:
    """``count`` zeroed predictions (float32): the first call of each site scales just in time."""
    return torch.zeros(count, dtype=torch.float32, device=device)


def encode_amax(seen: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """The amax to encode with (0-d float32), given the tensor's own amax ``seen``; updates ``prediction`` (a 0-d
    float32 view into a prediction buffer) in place for the next call."""
    seen = seen.detach().to(torch.float32).reshape(())
    predicted = prediction.reshape(())
    keep = (seen <= predicted) & (predicted <= seen * HEADROOM)  # False with a NaN on either side
    amax = torch.where(keep, predicted, seen)
    following = seen * MARGIN
    prediction.copy_(torch.where(following < float("inf"), following, torch.zeros_like(following)).reshape(
        prediction.shape))
    return amax


def every_branch(*predictions: torch.Tensor) -> Iterator[tuple[int, float]]:
    """``(call, factor)`` for five calls whose inputs, scaled by ``factor``, take every branch of the rule in turn
    -- first call (prediction 0: repaired), same input (kept), 4x larger (overflow: repaired), 1/64 (collapse:
    repaired), then a garbage NaN prediction (repaired): the prediction buffers given are filled with NaN before
    that call.  For the checks of every implementation (CPU interpreter and GPU)."""
    for call, factor in enumerate((1.0, 1.0, 4.0, 1 / 64, None)):
        if factor is None:
            for buffer in predictions:
                buffer.fill_(float("nan"))
            factor = 1.0
        yield call, factor


def _buffers(model: torch.nn.Module):
    for name, module in model.named_modules():
        buffer = getattr(module, BUFFER_NAME, None)
        if isinstance(buffer, torch.Tensor):
            yield name, module, buffer


def prediction_state(model: torch.nn.Module) -> dict:
    """``{module name: prediction buffer (CPU copy)}`` of every module with predicted scales (empty without)."""
    return {name: buffer.detach().cpu().clone() for name, _, buffer in _buffers(model)}


def gathered_prediction_state(model: torch.nn.Module) -> dict:
    """``{module name: [world, n] predictions of every rank}`` -- a collective: every rank of the default process
    group must call it.  Ranks see different data, so their predictions differ; a distributed checkpoint keeps
    them all and each rank of a resumed run takes its own row (:func:`load_prediction_state`)."""
    import torch.distributed as dist

    named = list(_buffers(model))
    if not named:
        return {}
    # one flat vector per rank (modules keep buffers of different lengths: FlowMLP 3, FP8Linear 2)
    local = torch.cat([buffer.detach().reshape(-1) for _, _, buffer in named])
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    every = torch.stack(rows).cpu()  # [world, total]
    out, start = {}, 0
    for name, _, buffer in named:
        out[name] = every[:, start:start + buffer.numel()].reshape(len(rows), *buffer.shape).clone()
        start += buffer.numel()
    return out


def load_prediction_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], rank: int = 0) -> None:
    """Restore :func:`prediction_state`'s buffers; modules missing from ``state`` start from zero (just in time).

    A :func:`gathered_prediction_state` (one row per rank) gives each rank its own row; ranks beyond the saved
    world size take rank 0's (any prediction is safe: a wrong one is repaired)."""
    updates = []  # checked first, so a state that does not fit leaves every buffer as it was
    for name, _, buffer in _buffers(model):
        saved = state.get(name)
        if saved is not None and saved.dim() == buffer.dim() + 1:
            saved = saved[rank] if rank < saved.shape[0] else saved[0]
        if saved is not None and saved.shape != buffer.shape:
            raise ValueError(f"prediction state of {name!r} has shape {tuple(saved.shape)}, the model's buffer "
                             f"{tuple(buffer.shape)}: was the checkpoint written by another fp8train version?")
        updates.append((buffer, saved))
    for buffer, saved in updates:
        if saved is None:
            buffer.zero_()
        else:
            buffer.copy_(saved.to(buffer.device))


@contextlib.contextmanager
def predictions_unchanged(model: torch.nn.Module) -> Iterator[None]:
    """Undo what the calls inside the block did to the predictions (CUDA-graph warm-up passes: a resumed run must
    not see the warm-up batch in its first step's scales)."""
    saved = [(buffer, buffer.clone()) for _, _, buffer in _buffers(model)]
    try:
        yield
    finally:
        for buffer, copy in saved:
            buffer.copy_(copy)
