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


def device_events(fn) -> list:
    """The device activities (kernels, memsets, copies) of one call of ``fn``, ordered by start."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(events, key=lambda e: e.time_range.start)


def report_gaps(events: list, top: int) -> None:
    """Idle device time between consecutive activities: the total, how it splits by gap size, the largest gaps
    with the activities on either side -- where a CUDA graph's wall time beyond its kernels goes."""
    gaps, end, previous = [], None, None
    for e in events:
        if end is not None and e.time_range.start > end:
            gaps.append((e.time_range.start - end, previous.name, e.name))
        if end is None or e.time_range.end > end:
            end, previous = e.time_range.end, e
    span = (end - events[0].time_range.start) / 1000 if events else 0.0
    idle = sum(g for g, _, _ in gaps) / 1000
    print(f"   {len(events)} device activities over {span:.1f} ms, idle between them {idle:.2f} ms in {len(gaps)} gaps",
          flush=True)
    for low, high in ((0, 2), (2, 5), (5, 20), (20, 1e12)):
        chosen = [g for g, _, _ in gaps if low <= g < high]
        print(f"   gaps of {low}-{high if high < 1e12 else 'more'} us: {len(chosen)}, {sum(chosen) / 1000:.2f} ms")
    for g, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"   {g:8.1f} us  after {before[:60]}  before {after[:60]}")


def main():
    p = step_parser(rows=0)
    p.add_argument("--configs", default="fp8train_coat_lean_graphed")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--gaps", type=int, default=0, help="also list idle device time between activities and the N "
                                                        "largest gaps")
    a = p.parse_args()
    for name in a.configs.split(","):
        step, _ = bench.make_step(name, a.model, a.batch, a.seq)
        for _ in range(3):
            step()
        full = wall_ms(step, a.repeats)
        halves = wall_ms(step.forward_backward, a.repeats), wall_ms(step.optimizer.step, a.repeats)
        events = device_events(step)
        kernels = sum(e.device_time_total for e in events) / 1000
        print(f"== {name} {a.model} batch {a.batch}: step {full:.1f} ms wall ({1000 * a.batch * a.seq / full:,.0f} tokens/s), "
              f"forward+backward {halves[0]:.1f} ms, optimizer {halves[1]:.1f} ms, kernels of one step "
              f"{kernels:.1f} ms", flush=True)
        if a.gaps:
            report_gaps(events, a.gaps)
        del step
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
