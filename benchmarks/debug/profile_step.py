"""Profile one training step of a bench configuration: top CUDA kernels, and where the small aten ops come from
(GPU aid).

    python benchmarks/debug/profile_step.py --config fp8train_coat_lean --model 1b --batch 4
"""

import argparse
import collections
import sys
import traceback

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from fp8train import bench


class OpCensus(TorchDispatchMode):
    """Counts every aten op that touches a large tensor, by op and by where it was called from: the innermost
    fp8train/transformers frames, or the autograd node that ran it during backward.  The profiler says how long
    copies and elementwise kernels take; this says who asked for them."""

    def __init__(self, min_elements=1 << 20, ops=()):
        super().__init__()
        self.min_elements = min_elements
        self.ops = set(ops)  # these ops are counted whatever their tensors' sizes
        self.counts = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in ("detach", "_unsafe_view"):
            return out  # no data moves
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        tensors += [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if (func.overloadpacket.__name__ not in self.ops
                and not any(t.numel() >= self.min_elements for t in tensors)):
            return out
        frames = [f for f in traceback.extract_stack()[:-2]
                  if ("fp8train" in f.filename or "transformers" in f.filename) and "profile_step" not in f.filename]
        site = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[-3:][::-1])
        if not site:
            node = torch._C._current_autograd_node()
            site = f"autograd {type(node).__name__}" if node is not None else "?"
        key = (str(func.overloadpacket.__name__), site)
        self.counts[key] += 1
        self.bytes[key] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def step_parser(rows: int) -> argparse.ArgumentParser:
    """The options of the profiling aids: which bench configuration, model shape and batch to profile."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="fp8train_coat_lean")
    p.add_argument("--model", default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows", type=int, default=rows)
    return p


def warmed_step(a):
    """The configuration's training step, after three warm-up steps (Triton compiles, lazy optimizer state)."""
    step, _ = bench.make_step(a.config, a.model, a.batch, a.seq)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def main():
    p = step_parser(rows=40)
    p.add_argument("--census", action="store_true", help="also count large-tensor aten ops by call site")
    p.add_argument("--census-ops", default="", help="comma-separated aten ops the census counts at any size "
                                                    "(e.g. add_,copy_: who launches the many small kernels)")
    a = p.parse_args()
    step = warmed_step(a)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {a.config} {a.model} batch {a.batch}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=70))
    if a.census:
        census = OpCensus(ops=[o for o in a.census_ops.split(",") if o])
        with census:
            step()
        torch.cuda.synchronize()
        print("== large-tensor aten ops by call site (calls, GB touched, op, site); GEMMs and attention included")
        for key, calls in sorted(census.counts.items(), key=lambda kv: -census.bytes[kv[0]])[:60]:
            print(f"{calls:5d} {census.bytes[key] / 1e9:8.2f} {key[0]:28} {key[1]}")
        if census.ops:
            print("== the --census-ops by call count")
            for key, calls in sorted(census.counts.items(), key=lambda kv: -kv[1]):
                if key[0] in census.ops:
                    print(f"{calls:5d} {census.bytes[key] / 1e9:8.2f} {key[0]:28} {key[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
