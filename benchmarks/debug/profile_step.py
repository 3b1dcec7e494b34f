"""Profile one training step of a bench configuration: top CUDA kernels, and where the small aten ops come from
(GPU aid).

    python benchmarks/debug/profile_step.py --config fp8train_coat_lean --model 1b --batch 4
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fp8train import bench

# ops whose Python call sites are printed (copies, elementwise math and concatenations are where eager time hides)
TRACED_OPS = ("aten::copy_", "aten::mul", "aten::cat", "aten::add", "aten::add_", "aten::neg", "aten::to",
              "aten::zeros", "aten::fill_", "aten::sum", "aten::clone")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="fp8train_coat_lean")
    p.add_argument("--model", default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--stacks", action="store_true", help="also print the call sites of the small aten ops")
    a = p.parse_args()
    step, _ = bench.make_step(a.config, a.model, a.batch, a.seq)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=a.stacks) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {a.config} {a.model} batch {a.batch}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=70))
    if a.stacks:
        rows = [e for e in prof.key_averages(group_by_stack_n=6) if e.key in TRACED_OPS and e.self_device_time_total > 0]
        rows.sort(key=lambda e: -e.self_device_time_total)
        print("== call sites of small aten ops (self CUDA us, calls, op, stack)")
        for e in rows[:40]:
            stack = " <- ".join(s for s in e.stack if "torch/nn/modules/module.py" not in s)[:600]
            print(f"{e.self_device_time_total:10.0f} {e.count:5d} {e.key:14} {stack}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
