"""The batched weight quantizer (every weight's amax in one launch, every weight's two FP8 copies in another)
gives the per-weight quantizer's bits, under the Triton CPU interpreter (both run through the interpreter, so
its float8 rounding quirks cancel; the GPU check is benchmarks/gpu/quant.py's weight-copies entry)."""

import os

import pytest

from triton_interpreter import run_under_interpreter


def test_batched_weight_copies_match_the_per_weight_quantizer():
    pytest.importorskip("triton")
    run_under_interpreter(__file__, marker="weight copies: ok")


def check():
    import torch

    import triton_interpreter as ti
    from fp8train.formats import E4M3
    from fp8train.kernels.quantize import SLOT, quantize_tensorwise
    from fp8train.kernels.weight_copies import WeightBuffers, quantize_weights

    ti.patch_interpreter()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        # tiles of 64 x 128 (the quantize plan's transposed tile): shapes cut through tiles on both sides
        weights = [(torch.randn(m, n, generator=g) * s).to(dtype)
                   for (m, n), s in (((48, 80), 0.02), ((130, 160), 3.0), ((16, 16), 1.0), ((70, 256), 0.5))]
        weights[2].zero_()  # an all-zero weight encodes zeros with amax 0
        buffers = [WeightBuffers(w.shape, w.device) for w in weights]
        for _ in range(2):  # the second call reuses the cached device tables
            quantize_weights(weights, buffers)
            for w, b in zip(weights, buffers):
                q, data_t = quantize_tensorwise(w, E4M3, with_transpose=True)
                assert torch.equal(b.amax, q.amax), (b.amax, q.amax)
                assert torch.equal(b.scales[SLOT.value], q.scale_hint)
                assert torch.equal(b.data.view(torch.uint8), q.data.view(torch.uint8))
                assert torch.equal(b.data_t.view(torch.uint8), data_t.view(torch.uint8))
            # with given amaxes (the optimizer's published ones): no amax pass, same bits
            given = [w.float().abs().amax() for w in weights]
            quantize_weights(weights, buffers, amaxes=given)
            for w, b in zip(weights, buffers):
                q, data_t = quantize_tensorwise(w, E4M3, with_transpose=True)
                assert torch.equal(b.amax, q.amax) and torch.equal(b.data_t.view(torch.uint8), data_t.view(torch.uint8))
            weights[1].mul_(-2)  # new values, same storage: the next call must see them
    _check_cache_batched_path()
    with pytest.raises(TypeError, match="bf16 or fp16"):
        quantize_weights([torch.zeros(16, 16)], [WeightBuffers((16, 16), torch.device("cpu"))])
    print("weight copies: ok")


def _check_cache_batched_path():
    """fp8train.nn.weight_cache on its batched path (CUDA-only; the device check is patched away here): one
    refresh remakes the whole group, in place, after any change; same bits as the per-weight quantizer."""
    import torch

    from fp8train import mixed_granularity as mg
    from fp8train.kernels.quantize import quantize_tensorwise
    from fp8train.nn import weight_cache
    from fp8train.quant import PER_TENSOR

    weight_cache._batchable = lambda w, e: e.transpose and w.dtype in (torch.bfloat16, torch.float16)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(m, n, generator=g).to(torch.bfloat16) for m, n in ((64, 32), (80, 48), (16, 160))]
    weight_cache.group_weights(weights)
    first = weight_cache.cached_weight(weights[0], mg.LINEAR_FORMAT, PER_TENSOR, True)
    buffers = [weight_cache._entries[w].buffers for w in weights]
    assert all(b is not None for b in buffers), "one refresh makes the whole group"
    for step in range(2):
        for w, b in zip(weights, buffers):
            got = weight_cache.cached_weight(w, mg.LINEAR_FORMAT, PER_TENSOR, True)
            want, want_t = quantize_tensorwise(w, mg.LINEAR_FORMAT, with_transpose=True)
            assert got.q.data is b.data and got.data_t is b.data_t  # same buffers every step
            assert torch.equal(got.q.data.view(torch.uint8), want.data.view(torch.uint8))
            assert torch.equal(got.data_t.view(torch.uint8), want_t.view(torch.uint8))
            assert torch.equal(got.q.amax, want.amax) and got.q.dtype == w.dtype
        with torch.no_grad():
            weights[-1].mul_(0.25)  # version bump: stale
    assert weight_cache.refresh_stale(weights) == 1 and weight_cache.refresh_stale(weights) == 0
    assert first.q.data is buffers[0].data


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    check()
