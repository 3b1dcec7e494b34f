"""fp8train.nn.eager_ops: eager_op keeps torch.compile out of the FP8 ops (a graph break there) and costs nothing
in eager mode; autocast_off switches autocast off inside its block and restores it, exceptions included."""

import pytest
import torch

from fp8train.nn.eager_ops import autocast_off, eager_op


class _Op(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.traced = []  # per call: was it being traced by torch.compile?

    @eager_op
    def forward(self, x):
        self.traced.append(torch.compiler.is_compiling())
        return x * 2


def test_eager_calls_run_the_method_itself():
    op = _Op()
    x = torch.ones(3)
    assert torch.equal(op(x), x * 2) and op.traced == [False]
    assert _Op.forward.__wrapped__.__name__ == "forward"  # functools.wraps: the original stays reachable


def test_under_torch_compile_the_op_runs_eagerly_behind_a_graph_break():
    torch._dynamo.reset()
    op = _Op()

    def model(x):
        return op(x + 1) * 3

    x = torch.randn(4)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 1
    op.traced.clear()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(compiled(x), model(x))
    assert op.traced and not any(op.traced)  # never traced: the method ran eagerly every time
    torch._dynamo.reset()


def test_autocast_off_switches_off_and_restores():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        with autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError):
            with autocast_off("cpu"):
                raise RuntimeError("inside")
        assert torch.is_autocast_enabled("cpu")
    with autocast_off("cpu"):  # outside autocast: nothing to switch
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
