"""torch.compile can trace the compressed ops (reference path on CPU) without graph breaks."""

import pytest
import torch

from fp8train.nn.activation import activation
from fp8train.nn.gated_mlp import gated_product
from fp8train.nn.layernorm import layer_norm
from fp8train.nn.residual import residual_add
from fp8train.nn.rmsnorm import add_rms_norm, rms_norm


def _block(r, x, w, b):
    h, y = add_rms_norm(r, x, w, 1e-5)
    z = layer_norm(y, w, b, 1e-5)
    out = gated_product(z, activation(y, "gelu_tanh"), "silu")
    total, copy = residual_add(h, out, emit_fp8_copy=True)
    return rms_norm(total, w, 1e-6, x_saved=copy)


def test_no_graph_breaks_and_same_result():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    r, x = (torch.randn(6, 64, generator=gen).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    b = torch.zeros(64, dtype=torch.bfloat16, requires_grad=True)
    explanation = torch._dynamo.explain(_block)(r, x, w, b)
    assert explanation.graph_break_count == 0, [br.reason for br in explanation.break_reasons]
    eager = _block(r, x, w, b)
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)(r, x, w, b)
    assert torch.equal(eager, compiled)
    (g_eager,) = torch.autograd.grad(eager.float().sum(), x)
    (g_compiled,) = torch.autograd.grad(compiled.float().sum(), x)
    assert torch.equal(g_eager, g_compiled)
    torch._dynamo.reset()


if __name__ == "__main__":
    pytest.main([__file__])
