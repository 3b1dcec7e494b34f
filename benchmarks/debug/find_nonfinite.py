"""Locate the first module whose output or input-gradient goes non-finite (GPU debugging aid).

    python benchmarks/debug/find_nonfinite.py --recipe fp8 --model 1b --steps 3
"""

import argparse
import sys

import torch

import fp8train
from fp8train import bench


from fp8train import kernels
from fp8train import mixed_granularity as mg
from fp8train.nn.linear import FP8Linear

_last_grad = {}


def capture_grad_output(module, grad_output):
    _last_grad[id(module)] = grad_output[0].detach().clone()


def describe(tag, t):
    t = t.float() if t.dtype.itemsize == 1 else t
    finite = torch.isfinite(t)
    print(f"   {tag}: shape {tuple(t.shape)} dtype {t.dtype} nonfinite {int((~finite).sum())} "
          f"absmax {float(t[finite].abs().max()) if finite.any() else float('nan'):.4g}", flush=True)


def diagnose(name):
    """On the first FP8Linear whose input-grad is non-finite: redo its backward quantizers with Triton and with
    the torch reference and show which piece goes wrong."""
    done = []

    def hook(module, grad_input, grad_output):
        if grad_input[0] is not None and not done:
            dy_ = _last_grad[id(module)].float()
            exact = dy_.reshape(-1, dy_.shape[-1]) @ module.weight.detach().float()
            got = grad_input[0].float().reshape(exact.shape)
            rel = float((got - exact).norm() / exact.norm().clamp_min(1e-30))
            if rel > 0.2 or not torch.isfinite(got).all():
                print(f"DGRAD-OFF {name}: rel err {rel:.3g} |dy| {float(dy_.abs().max()):.3g} "
                      f"|got| {float(got.abs().max()):.3g} |exact| {float(exact.abs().max()):.3g}", flush=True)
        if done or grad_input[0] is None:
            return
        done.append(True)
        dy = _last_grad[id(module)]
        dy = dy.reshape(-1, dy.shape[-1])
        print(f"DIAGNOSE {name}: weight {tuple(module.weight.shape)} {module.weight.dtype}", flush=True)
        describe("dy", dy)
        describe("weight", module.weight.detach())
        for label, ctx in (("triton", None), ("reference", kernels.force_reference)):
            if ctx is None:
                q, q_t = mg.quantize_grad_for_linear(dy.contiguous(), with_transpose=True)
                w_amax = module.weight.detach().abs().max().float()
                wq, wq_t = mg.quantize_for_linear(module.weight.detach().contiguous(), amax=w_amax, with_transpose=True)
            else:
                with ctx():
                    q, q_t = mg.quantize_grad_for_linear(dy.contiguous(), with_transpose=True)
                    wq, wq_t = mg.quantize_for_linear(module.weight.detach().contiguous(), amax=w_amax, with_transpose=True)
            print(f"  {label}: dy amax {q.amax.float().item():.4g} w amax {wq.amax.float().item():.4g}", flush=True)
            describe(f"{label} dy data", q.data)
            describe(f"{label} dy data_t", q_t)
            describe(f"{label} w data", wq.data)
            describe(f"{label} w data_t", wq_t)
            dx = (q.data.float() @ wq.data.float()) * (q.scale * wq.scale)
            describe(f"{label} dx (fp32 matmul of the FP8 operands)", dx)
            dx_mm = torch._scaled_mm(q.data, wq_t.t(), scale_a=q.scale.float().reshape(()),
                                     scale_b=wq.scale.float().reshape(()), out_dtype=torch.bfloat16)
            describe(f"{label} dx (_scaled_mm)", dx_mm)
            exact = dy.float() @ module.weight.detach().float()
            for tag, val in (("fp32 matmul", dx), ("_scaled_mm", dx_mm), ("module grad_input", grad_input[0])):
                val = val.float().reshape(exact.shape)
                print(f"   {label} {tag} rel err vs exact: {float((val - exact).norm() / exact.norm()):.3g}", flush=True)
            deq = q.dequantize(torch.float32)
            print(f"   {label} dy dequant rel err: {float((deq - dy.float()).norm() / dy.float().norm()):.3g}; "
                  f"w dequant rel err: {float((wq.dequantize(torch.float32) - module.weight.float()).norm() / module.weight.float().norm()):.3g}; "
                  f"data_t == data.T: {bool(torch.equal(q_t.float(), q.data.float().t()))} "
                  f"{bool(torch.equal(wq_t.float(), wq.data.float().t()))}", flush=True)

    return hook


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
        if isinstance(module, FP8Linear):
            module.register_full_backward_pre_hook(capture_grad_output)
            module.register_full_backward_hook(diagnose(name))
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
