"""Profile one training step of a bench configuration and print the top CUDA kernels (GPU aid).

    python benchmarks/debug/profile_step.py --config fp8train_coat --model 1b --batch 4
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fp8train import bench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="fp8train_coat")
    p.add_argument("--model", default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    recipe, optimizer_kind, compiled = bench.CONFIGS[a.config]
    torch.manual_seed(0)
    model = bench.convert(bench.build_model(a.model), recipe)
    opt = bench.make_optimizer(optimizer_kind, model)
    fwd = torch.compile(model) if compiled else model
    tokens = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {a.config} {a.model} batch {a.batch}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
