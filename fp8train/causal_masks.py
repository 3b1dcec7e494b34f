"""Plain causal batches: let transformers' SDPA path use ``is_causal=True`` under CUDA-graph capture and
torch.compile, and skip its host sync in eager mode.

Before each forward transformers decides whether it may drop the causal mask and call SDPA with
``is_causal=True`` (the fast kernels).  It asks two data questions: are the position ids packed (several
documents per row, ids restarting at 0)?  does the padding mask hide any token?  Answering reads tensors on the
host -- a device sync per forward in eager mode -- and while dynamo traces or a CUDA graph is captured it may
not read anything, so there it builds a full ``[batch, 1, seq, seq]`` mask (transformers 5.17 does so even when
no padding mask exists at all).  cuDNN attention with that mask measured 2.7x slower forward and 3x slower
backward than the causal kernel on a 953M Llama at batch 4 x 2048 (H200, 16 ms of a 107 ms CUDA-graph step,
benchmarks/results/2026-11-27-h200-profile-graph-vs-eager.txt); bf16 ``torch.compile`` pays the same.

A caller that passes the model **no** ``position_ids`` knows the first answer without reading anything: the
ids are transformers' own ``arange``, never packed.  Inside :func:`plain_causal_batches` the packed-sequence
check answers "not packed" and "is a tensor being traced?" is answered "no" where there is no tensor to read (no
padding mask).  A padding ``attention_mask`` still goes through transformers' own path (a mask is built when
it cannot be read).  Do not use it around forwards that pass packed ``position_ids``, or around torch.export.

    with fp8train.causal_masks.plain_causal_batches():
        loss = model(input_ids=tokens, labels=tokens).loss     # no position_ids passed

:class:`fp8train.cuda_graphs.GraphedStep`, ``fp8train train`` and ``fp8train bench`` use it; on transformers
versions without these checks it changes nothing.
"""

from __future__ import annotations

import contextlib

__all__ = ["plain_causal_batches"]


def _not_packed(position_ids):
    """transformers' ``find_packed_sequence_indices`` for ids known to be one ``arange`` per row: no packing."""
    return None


@contextlib.contextmanager
def plain_causal_batches(enabled: bool = True):
    """Within the block, transformers treats every batch as unpacked (see the module docstring)."""
    try:
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing to patch
        masking_utils = None
    find_packed = getattr(masking_utils, "find_packed_sequence_indices", None)
    is_tracing = getattr(masking_utils, "is_tracing", None)
    if not enabled or find_packed is None or find_packed is _not_packed:  # disabled, absent or already inside
        yield
        return

    def tracing_only_with_a_tensor(tensor=None):
        # "may I read this tensor?": with no tensor (no padding mask) there is nothing to read
        return False if tensor is None else is_tracing(tensor)

    masking_utils.find_packed_sequence_indices = _not_packed
    if is_tracing is not None:
        masking_utils.is_tracing = tracing_only_with_a_tensor
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find_packed
        if is_tracing is not None:
            masking_utils.is_tracing = is_tracing
