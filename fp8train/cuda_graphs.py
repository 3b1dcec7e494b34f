"""Replay a whole forward + backward pass as one CUDA graph.

Eager FP8 training launches several small kernels per op from Python; on a fast GPU the host then becomes the
bottleneck (a 953M Llama step measured 230 ms of CPU time against 129 ms of GPU time, see
benchmarks/results/2026-11-27-h200-profile-coat-eager.txt).  Capturing the micro-batch's forward and backward
once and replaying it removes that Python cost; fp8train's kernels never synchronise with the host, so the
whole pass is capturable.

    step = GraphedStep(model, lambda m, b: m(**b).loss, {"input_ids": ids, "labels": ids})
    for batch in loader:                     # every batch must have the example's shapes and dtypes
        loss = step(batch)                   # copies the batch in, replays forward + backward
        optimizer.step()                     # eager (one fused launch for fp8train.AdamW)

Gradients live in the graph's memory pool and are overwritten (not accumulated) by each replay, so call the
optimizer after every replay; ``optimizer.zero_grad()`` is harmless (the gradients are re-attached).
Shapes are fixed: a batch with another shape needs another GraphedStep.

With ``Recipe(cache_fp8_weights=True)`` the graph reads each weight's FP8 copies from buffers that
:func:`fp8train.nn.weight_cache.refresh_stale` rewrites before each replay (after the optimizer changed the
weights), instead of quantizing every weight inside the graph.

FSDP2 (:func:`fp8train.distributed.shard_model`): the capture records the units' all-gathers and gradient
reduce-scatters with the rest (NCCL collectives replay inside a CUDA graph), so a sharded step costs no FSDP host
time either.  The capture then runs in ``thread_local`` error mode -- NCCL's watchdog thread queries events while
the main thread captures -- and makes the capturing stream wait for FSDP's communication streams before it
ends, since a stream forked into a capture must be joined back.  Every rank must capture and replay the same
steps in the same order, as with any collective.  An eager forward between replays (evaluation) leaves the
root unit's weights gathered and no replayed backward frees them: call :func:`fp8train.distributed.reshard`
after it, or the next evaluation reads stale weights (the trainer does).

Attention masks: a batch without ``position_ids`` is captured inside
:func:`fp8train.causal_masks.plain_causal_batches`, so transformers' SDPA path records the causal kernel
(``is_causal=True``) instead of a full ``[batch, 1, seq, seq]`` mask -- it cannot inspect the position ids while
capturing, and the masked kernel measured ~3x slower.  Pass ``plain_causal=False`` if ``loss_fn`` packs several
sequences per row through position ids it makes itself.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .causal_masks import plain_causal_batches
from .delayed_scaling import predictions_unchanged
from .nn import weight_cache


class GraphedStep:
    def __init__(self, model: torch.nn.Module, loss_fn: Callable, example_batch: dict, *, warmup: int = 3,
                 autocast_dtype: torch.dtype = torch.bfloat16, plain_causal: Optional[bool] = None):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs a CUDA GPU; run the eager training step on this machine instead")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.static_batch = {k: v.clone() for k, v in example_batch.items()}
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        if plain_causal is None:
            plain_causal = "position_ids" not in example_batch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with plain_causal_batches(plain_causal):
            # warm-up: Triton compiles, cuBLAS workspaces, lazy module state (but not Recipe(delayed_scaling)'s
            # scale predictions: the first replay must see the ones an eager step would)
            with torch.cuda.stream(side), predictions_unchanged(model):
                for _ in range(warmup):
                    self._zero_to_none()
                    self._forward_backward()
            torch.cuda.current_stream().wait_stream(side)
            self._zero_to_none()  # backward in the capture creates the .grad tensors inside the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            fsdp_streams = _fsdp_streams(model)
            if fsdp_streams is not None:
                # weights FSDP2 left gathered (a forward without backward) would be captured at their eager
                # addresses, which the capture's own backward then frees: start from sharded weights
                from .distributed import reshard

                reshard(model)
            # FSDP2: NCCL's watchdog thread queries events during the capture; only this thread's calls may count
            mode = "thread_local" if fsdp_streams is not None else "global"
            with torch.cuda.graph(self.graph, capture_error_mode=mode):
                self.static_loss = self._forward_backward()
                _join_capturing(fsdp_streams or ())
        self.grads = [p.grad for p in self.params]

    def _zero_to_none(self):
        for p in self.params:
            p.grad = None

    def _forward_backward(self) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.autocast_dtype):
            loss = self.loss_fn(self.model, self.static_batch)
        loss.backward()
        return loss.detach()

    def __call__(self, batch: dict) -> torch.Tensor:
        for key, value in batch.items():
            static = self.static_batch[key]
            if value.shape != static.shape or value.dtype != static.dtype:
                raise ValueError(f"GraphedStep was captured for {key} of shape {tuple(static.shape)} "
                                 f"({static.dtype}); got {tuple(value.shape)} ({value.dtype}): pad batches to the "
                                 "captured shape or build another GraphedStep")
            static.copy_(value, non_blocking=True)
        weight_cache.refresh_stale(self.params)  # Recipe(cache_fp8_weights): the graph reads copies made after the last step
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.static_loss


def _fsdp_streams(model: torch.nn.Module) -> Optional[list]:
    """FSDP2's communication streams of a sharded ``model`` (``fully_shard`` applied to it), else None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return None
    if not isinstance(model, FSDPModule):
        return None
    comm = getattr(model._get_fsdp_state(), "_comm_ctx", None)
    names = ("all_gather_copy_in_stream", "all_gather_stream", "reduce_scatter_stream", "all_reduce_stream")
    return [s for s in (getattr(comm, name, None) for name in names) if s is not None]


def _join_capturing(streams) -> None:
    """Make the capturing stream wait for every stream of ``streams`` that joined the capture (work forked to
    a side stream must be joined back before the capture ends; a stream outside the capture is left alone)."""
    current = torch.cuda.current_stream()
    for stream in streams:
        with torch.cuda.stream(stream):
            capturing = torch.cuda.is_current_stream_capturing()
        if capturing:
            current.wait_stream(stream)
