"""GPU checks and numbers for the memory / speed levers that CPU tests cannot settle (run by
benchmarks/gpu_suite.py --only levers, ~3 minutes on an H100).

Checks (tiny Llama on CUDA, the Triton kernels on):
  * levers/step-in-backward-same-params: fp8train.AdamW.step_in_backward (one kernel launch per parameter,
    inside backward) against step() after backward (one fused launch): fp32 parameters and FP8 moments bit for
    bit after 5 steps -- the kernel's arithmetic does not depend on how tensors are grouped into launches;
  * levers/weight-cache-same-bits: Recipe(cache_fp8_weights=True) with 2 accumulated micro-batches per step:
    losses and gradients bit for bit those of the uncached path, over 3 steps of fp8train.AdamW (whose kernel
    must bump the version counters so the cache refreshes);
  * levers/weight-cache-graph: a CUDA-graph step (GraphedStep) with the cache on: the loss after 3 replays
    + optimizer steps equals the eager cached run's (the graph reads the cached copies, which GraphedStep
    refreshes before each replay).
  * levers/fused-qkv-losses: Recipe(fused_qkv=True) trains the tiny Llama with losses within 2 % of separate
    q/k/v projections.
  * levers/grad-amax-handoff-same-bits: the gradient amaxes the rotary / norm backward kernels publish
    (fp8train.nn.grad_amax) give the q/k/o/down projections the same bits as their own amax passes;
  * levers/fused-residual-stream: Recipe.fused_residual (+ the q/k/v gradients summed in the norm kernel) gives
    the same loss and gradients no further from an fp32-master run than autograd's bf16 sums (ratio < 1.1).
Benchmark rows (953M Llama, batch 4 x 2048, each configuration in its own process through fp8train.bench):
fp8train_coat_lean (weight cache and saved product on, its defaults), fp8train_coat_lean_step_in_backward,
fp8train_coat_lean_no_weight_cache, and the CUDA-graph rows fp8train_coat_lean_graphed /
fp8train_coat_lean_no_weight_cache_graphed / fp8train_coat_lean_recomputed_product_graphed -- tokens/s and
peak memory, to decide whether the levers earn their place.  ``LEVERS_BENCH=0`` runs the checks only.
"""

from __future__ import annotations

import argparse
import os

import torch

import fp8train
from fp8train import bench
from fp8train.recipes import Recipe
from gpu.quant import tiny_llama

BENCH_CONFIGS = ("fp8train_coat_lean", "fp8train_coat_lean_step_in_backward", "fp8train_coat_lean_no_weight_cache",
                 "fp8train_coat_lean_graphed", "fp8train_coat_lean_no_weight_cache_graphed",
                 "fp8train_coat_lean_recomputed_product_graphed")


def _ids(step, micro=0):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, 512, (4, 128), generator=g).cuda()


def _loss(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids, use_cache=False).loss


def _same(a, b) -> bool:
    if a.dtype.itemsize == 1 and a.is_floating_point():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _check_step_in_backward(report):
    models, opts = [], []
    for in_backward in (False, True):
        model = fp8train.convert(tiny_llama(), recipe="coat")
        opt = fp8train.AdamW(model.parameters(), lr=1e-3)
        if in_backward:
            opt.step_in_backward()
        for step in range(5):
            _loss(model, _ids(step)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        models.append(model)
        opts.append(opt)
    params_equal = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    states_equal = all(_same(opts[0].state[a][k], opts[1].state[b][k])
                       for a, b in zip(models[0].parameters(), models[1].parameters()) for k in opts[0].state[a])
    report.check("levers/step-in-backward-same-params", params_equal and states_equal,
                 params_equal=params_equal, states_equal=states_equal)


def _cached_run(cache: bool):
    model = fp8train.convert(tiny_llama(), recipe=Recipe.named("coat").replace(cache_fp8_weights=cache))
    opt = fp8train.AdamW(model.parameters(), lr=1e-3)
    losses, grads = [], None
    for step in range(3):
        for micro in range(2):
            loss = _loss(model, _ids(step, micro))
            loss.backward()
            losses.append(loss.detach())
        if step == 2:
            grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _check_weight_cache(report):
    (plain_losses, plain_grads), (cached_losses, cached_grads) = _cached_run(False), _cached_run(True)
    losses_equal = all(torch.equal(a, b) for a, b in zip(plain_losses, cached_losses))
    grads_equal = all(torch.equal(a, b) for a, b in zip(plain_grads, cached_grads))
    report.check("levers/weight-cache-same-bits", losses_equal and grads_equal, losses_equal=losses_equal,
                 grads_equal=grads_equal, losses=[round(float(x), 6) for x in cached_losses])


def _check_weight_cache_graph(report):
    from fp8train.cuda_graphs import GraphedStep

    # coat on fp32 weights (the one-by-one refresh) and coat-lean on bf16 weights (the batched refresh with the
    # optimizer's published amaxes): eager and graphed runs must give the same losses
    for name, bf16 in (("coat", False), ("coat-lean", True)):
        results = []
        for graphed in (False, True):
            model = tiny_llama()
            if bf16:
                model = model.to(torch.bfloat16)
            model = fp8train.convert(model, recipe=Recipe.named(name).replace(cache_fp8_weights=True))
            opt = fp8train.AdamW(model.parameters(), lr=1e-3,
                                 master_weights="bf16_stochastic" if bf16 else None)
            ids = _ids(0).clone()
            if graphed:
                step = GraphedStep(model, lambda m, b: m(**b, use_cache=False).loss, {"input_ids": ids, "labels": ids})
                for p in model.parameters():  # the capture's gradients are not a training step
                    p.grad = None
            losses = []
            for i in range(3):
                batch = _ids(i)
                if graphed:
                    loss = step({"input_ids": batch, "labels": batch})
                else:
                    loss = _loss(model, batch)
                    loss.backward()
                losses.append(float(loss.detach()))
                opt.step()
                opt.zero_grad(set_to_none=True)
            results.append(losses)
        worst = max(abs(a - b) / abs(a) for a, b in zip(*results))
        # the eager and graphed forwards differ only in the attention call path: allow bf16 reduction noise
        suffix = "" if name == "coat" else f" ({name}, bf16 weights)"
        report.check(f"levers/weight-cache-graph{suffix}", worst < 1e-3, eager=results[0], graphed=results[1],
                     worst_rel=worst)


def _grads(recipe, bf16=True, amax_handoff=True, autocast=True):
    from fp8train.nn import grad_amax

    model = tiny_llama()
    if bf16:
        model = model.to(torch.bfloat16)
    model = fp8train.convert(model, recipe=recipe)
    grad_amax.set_enabled(amax_handoff)
    try:
        ids = _ids(0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    finally:
        grad_amax.set_enabled(True)
    return loss.detach(), [p.grad.float() for p in model.parameters()]


def _check_residual_stream(report):
    """coat-lean on bf16 weights with the Triton kernels: (1) the gradient amaxes handed from the rotary and norm
    backward kernels to the q/k/o/down projections give the same bits as their amax passes; (2) the owned residual
    stream + q/k/v gradients summed in the norm kernel give the same loss and gradients no further from an
    fp32-master run than autograd's bf16 adds do."""
    lean = Recipe.named("coat-lean")
    loss_a, grads_a = _grads(lean)
    loss_b, grads_b = _grads(lean, amax_handoff=False)
    same = torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    report.check("levers/grad-amax-handoff-same-bits", same, loss=float(loss_a))
    loss_c, grads_c = _grads(lean.replace(fused_residual=False), amax_handoff=False)
    _, grads_t = _grads(lean.replace(fused_residual=False), bf16=False)
    ratios = [float((a - t).norm() / ((c - t).norm() + 1e-3 * t.norm())) for a, c, t in zip(grads_a, grads_c, grads_t)]
    report.check("levers/fused-residual-stream", torch.equal(loss_a, loss_c) and max(ratios) < 1.1,
                 same_loss=bool(torch.equal(loss_a, loss_c)), worst_error_ratio=max(ratios))


def _check_fused_qkv(report):
    """Recipe(fused_qkv=True): the converted tiny Llama trains 8 steps with losses within 2 % of separate q/k/v
    projections (one E4M3 scale for the stacked weights: close, not bit-identical) and the group is in place."""
    from fp8train.nn.fused_projections import fused_group

    runs = {}
    for fused in (False, True):
        model = fp8train.convert(tiny_llama(), recipe=Recipe.named("coat").replace(fused_qkv=fused))
        grouped = fused_group(model.model.layers[0].self_attn.q_proj) is not None
        opt = fp8train.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(8):
            loss = _loss(model, _ids(step))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[fused] = (grouped, losses)
    worst = max(abs(a - b) / abs(a) for a, b in zip(runs[False][1], runs[True][1]))
    report.check("levers/fused-qkv-losses", runs[True][0] and not runs[False][0] and worst < 0.02,
                 separate=runs[False][1], fused=runs[True][1], worst_rel=worst)


def run(report) -> None:
    for check in (_check_residual_stream, _check_step_in_backward, _check_weight_cache, _check_weight_cache_graph,
                  _check_fused_qkv):
        try:
            check(report)
        except Exception as exc:  # noqa: BLE001 - record and go on
            report.check(f"levers/{check.__name__.removeprefix('_check_')}", False, error=repr(exc)[:600])
        torch.cuda.empty_cache()
    if os.environ.get("LEVERS_BENCH", "1") == "0":  # the checks only (a short device call)
        return
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--configs", ",".join(BENCH_CONFIGS), "--steps", "6"])
    for row in bench.bench(args):
        report.add_bench(f"levers/{row['name']}", tokens_per_s=round(row["tokens_per_s"]),
                         peak_gb=round(row["peak_memory_bytes"] / 1e9, 2),
                         reserved_gb=round(row.get("peak_memory_reserved_bytes", 0) / 1e9, 2), status=row["status"])
