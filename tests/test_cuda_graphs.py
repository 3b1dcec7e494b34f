"""fp8train.cuda_graphs on the CPU: what can be checked without a GPU.  The capture itself (one GPU, and FSDP2 on
two) is checked on the GPU by benchmarks/gpu_multi.py's ``graph`` check (losses equal to the eager run's)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from fp8train.cuda_graphs import GraphedStep, _fsdp_streams


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_graphed_step_asks_for_a_gpu():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        GraphedStep(model, lambda m, b: m(b["x"]).sum(), {"x": torch.randn(2, 4)})


def test_an_unsharded_model_has_no_fsdp_streams():
    assert _fsdp_streams(torch.nn.Linear(4, 4)) is None


def test_fsdp_streams_are_found_on_a_sharded_model():
    """The capture joins FSDP2's communication streams through torch's private ``_comm_ctx``; if a torch release
    renames it, this fails here instead of as a CUDA 'unjoined capture' error on the GPU."""
    script = textwrap.dedent("""
        import torch
        import fp8train.distributed as fd
        from fp8train.cuda_graphs import _fsdp_streams

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return x

        fd.init_distributed(backend="gloo")
        model = fd.shard_model(Net())
        model(torch.randn(3, 8)).sum().backward()   # FSDP2 makes its streams on the first forward
        streams = _fsdp_streams(model)
        assert len(streams) == 4, streams
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
