"""Where the host (Python) time of an eager training step goes: cProfile of a few steps (GPU aid).

    python benchmarks/debug/host_profile.py --config fp8train_coat_lean --model 1b --batch 4

Eager FP8 training is host-bound (the CPU needs more time per step than the GPU); this lists the functions that
spend it, sorted by own time and by cumulative time.
"""

import cProfile
import io
import pstats
import sys
import time

import torch

from profile_step import step_parser, warmed_step  # same folder


def main():
    p = step_parser(rows=45)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    step = warmed_step(a)
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    print(f"== {a.config} {a.model} batch {a.batch}: {1000 * (time.perf_counter() - start) / a.steps:.1f} ms/step "
          "wall, unprofiled")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(a.rows)
        print(f"== sorted by {key} ({a.steps} steps)")
        print(out.getvalue()[-12000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
