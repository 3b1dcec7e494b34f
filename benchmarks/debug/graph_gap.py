"""Where a step's wall time goes beyond its kernels (GPU aid): wall ms of the whole step, of forward + backward
alone and of the optimizer alone, against the summed kernel time of one profiled step.

    python benchmarks/debug/graph_gap.py --configs fp8train_coat_lean_graphed,bf16_compiled --model 1b --batch 4

A CUDA-graph step should take its kernel time; a larger wall time means gaps between kernels (launch latency,
a host sync, a slow host between replays) or a GPU running slower than during the profile (clocks, power).
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fp8train import bench
from profile_step import step_parser  # same folder


def wall_ms(fn, repeats: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def kernel_ms(fn) -> float:
    """Summed device time of the kernels one call of ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000


def main():
    p = step_parser(rows=0)
    p.add_argument("--configs", default="fp8train_coat_lean_graphed")
    p.add_argument("--repeats", type=int, default=8)
    a = p.parse_args()
    for name in a.configs.split(","):
        step, _ = bench.make_step(name, a.model, a.batch, a.seq)
        for _ in range(3):
            step()
        full = wall_ms(step, a.repeats)
        halves = wall_ms(step.forward_backward, a.repeats), wall_ms(step.optimizer.step, a.repeats)
        kernels = kernel_ms(step)
        print(f"== {name} {a.model} batch {a.batch}: step {full:.1f} ms wall ({1000 * a.batch * a.seq / full:,.0f} tokens/s), "
              f"forward+backward {halves[0]:.1f} ms, optimizer {halves[1]:.1f} ms, kernels of one step "
              f"{kernels:.1f} ms", flush=True)
        del step
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
