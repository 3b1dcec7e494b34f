"""Locate the first module whose output or input-gradient goes non-finite (GPU debugging aid).

    python benchmarks/debug/find_nonfinite.py --recipe fp8 --model 1b --steps 3
"""

import argparse
import sys

import torch

import fp8train
from fp8train import bench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="fp8")
    p.add_argument("--model", default="1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--optimizer", default="torch")
    a = p.parse_args()
    torch.manual_seed(0)
    model = bench.convert(bench.build_model(a.model), a.recipe)
    opt = bench.make_optimizer(a.optimizer, model)
    found = []

    def check(kind, name):
        def hook(module, inputs, outputs):
            outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                    if len(found) < 5:
                        found.append(f"{kind} {name} ({type(module).__name__})")
                        print("NONFINITE", found[-1], flush=True)
        return hook

    for name, module in model.named_modules():
        module.register_forward_hook(check("forward", name))
        module.register_full_backward_hook(check("backward", name))
    tokens = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device="cuda")
    for step in range(a.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        print(f"step {step} loss {loss.item():.4f} nonfinite grads: {bad[:4]} ({len(bad)})", flush=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if found:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
