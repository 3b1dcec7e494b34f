"""`fp8train bench`: end-to-end training throughput and peak memory on one GPU.

Every configuration runs in its own subprocess, so peak memory, compile caches and out-of-memory failures
of one configuration never leak into the next.  Each trains a Llama-shaped model (random init, random
tokens: throughput does not depend on the data) with fp32 master weights and bf16 autocast:

    bf16_eager / bf16_compiled                 torch AdamW(fused=True), the baseline
    torchao_float8[_compiled]                  torchao float8 tensorwise linears (if torchao imports)
    torchao_float8_adamwfp8[_compiled]         ... plus torchao's AdamWFp8
    fp8train_fp8[_compiled]                    fp8train.convert(recipe="fp8") + torch AdamW(fused)
    fp8train_coat[_compiled]                   fp8train.convert(recipe="coat") + fp8train.AdamW
    fp8train_coat_lean[_compiled]              ... "coat-lean" (chunked loss) on bf16 params + stochastic rounding
    fp8train_coat_lean_step_in_backward        ... updating each parameter inside backward (no gradient buffer)
    fp8train_coat_lean_no_weight_cache         ... without its FP8 weight copies kept between steps (cache_fp8_weights)
    fp8train_coat_lean_recomputed_product      ... rebuilding act(gate)*up in backward (recompute_gated_product)
    fp8train_coat_lean_attention_saves         ... q/k/v saved as FP8 for the attention backward (experimental)
    fp8train_coat_lean_fused_qkv               ... q/k/v as one FP8 GEMM (Recipe.fused_qkv)
    fp8train_coat_lean_no_fused_residual       ... with autograd's residual-gradient adds (Recipe.fused_residual off)
    fp8train_coat_lean_saved_product           ... (coat-lean's default since session 5; also _weight_cache)
    fp8train_coat_lean_saved_attention_output  ... o_proj keeps its FP8 input for backward instead of requantizing the
                                               attention output (Recipe.requantize_attention_output off)
    fp8train_coat_lean_no_delayed_scaling      ... with just-in-time scales for the gated product (coat-lean predicts
                                               them since session 9: Recipe.delayed_scaling; _delayed_scaling adds it
                                               to other recipes)
    fp8train_coat_lean_gated_gemm              ... with gate/up + act(gate)*up (and dh + its backward) as one Triton
                                               FP8 GEMM each (Recipe.gated_gemm; experimental, slower on H100/H200)
    fp8train_coat_fast_accumulation            ... forward GEMMs without fp32 promotion (Recipe.fast_accumulation;
                                               coat-lean's default since session 16, _no_fast_accumulation: off)
    fp8train_coat_fast_accumulation_grad_input ... input-gradient GEMMs too (Recipe.fast_accumulation_grad_input;
                                               coat-lean's default, _no_fast_accumulation_grad_input: off)
    fp8train_coat_lean_loss_chunk_8192         ... the chunked loss 8192 tokens at a time (Recipe.loss_chunk_rows;
                                               any size: _loss_chunk_<tokens>)
    fp8train_coat_lean_no_flash_attention      ... SDPA's attention even where FlashAttention-4 is installed
                                               (Recipe.flash_attention; _flash_attention: warn when unusable)
    <name>_<lever>_<lever>                     lever suffixes combine: fp8train_coat_lean_fused_qkv_saved_product
    <any eager name>_graphed                   forward + backward replayed as one CUDA graph (GraphedStep)

Attention masks (``--masks``): ``plain-causal`` (default) runs every configuration's forward inside
:func:`fp8train.causal_masks.plain_causal_batches`, so SDPA takes the causal kernel in eager, compiled and
CUDA-graph runs alike; ``hf-default`` leaves transformers' choice, which builds a full mask under torch.compile
and graph capture (~3x slower attention) -- how a plain bf16 ``torch.compile`` baseline runs out of the box.

Rows: ``{name, batch, seq, tokens_per_s, peak_memory_bytes}`` (+ ``status`` and ``error`` when a
configuration failed, e.g. ``"oom"``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

MODEL_SHAPES = {
    # name: (hidden, layers, heads, ffn, vocab)
    "tiny": (256, 4, 4, 688, 32000),
    "1b": (2048, 16, 16, 5632, 32000),  # the 953M Llama of the COAT comparison
    "7b": (4096, 32, 32, 11008, 32000),  # Llama-2-7B shapes
    "13b": (5120, 40, 40, 13824, 32000),  # Llama-2-13B shapes
}

CONFIGS = {
    "bf16_eager": ("bf16", "torch", False),
    "bf16_compiled": ("bf16", "torch", True),
    "torchao_float8": ("torchao", "torch", False),
    "torchao_float8_compiled": ("torchao", "torch", True),
    "torchao_float8_adamwfp8_compiled": ("torchao", "torchao_fp8", True),
    "fp8train_fp8": ("fp8", "torch", False),
    "fp8train_fp8_compiled": ("fp8", "torch", True),
    "fp8train_coat": ("coat", "fp8train", False),
    "fp8train_coat_compiled": ("coat", "fp8train", True),
    # the memory levers beyond COAT: chunked loss, bf16 parameters with stochastic rounding (no fp32 master
    # copy, bf16 gradients)
    "fp8train_coat_lean": ("coat-lean", "fp8train", False),
    "fp8train_coat_lean_compiled": ("coat-lean", "fp8train", True),
    # ... with the optimizer step inside backward (fp8train.AdamW.step_in_backward: no gradient buffer)
    "fp8train_coat_lean_step_in_backward": ("coat-lean", "fp8train", False),
    # ... with each weight's FP8 copies made once per step (Recipe.cache_fp8_weights; +2 bytes per parameter)
    "fp8train_coat_lean_weight_cache": ("coat-lean", "fp8train", False),
    # ... with q/k/v kept as FP8 copies for the attention backward (Recipe.fp8_attention_saves; experimental)
    "fp8train_coat_lean_attention_saves": ("coat-lean", "fp8train", False),
    # ... with q/k/v as one FP8 GEMM (Recipe.fused_qkv)
    "fp8train_coat_lean_fused_qkv": ("coat-lean", "fp8train", False),
    # ... with act(gate) * up kept as E4M3 for backward instead of rebuilt (Recipe.recompute_gated_product=False)
    "fp8train_coat_lean_saved_product": ("coat-lean", "fp8train", False),
}
# configuration name suffix -> the Recipe field it sets and the value; suffixes combine in any order
# (fp8train_coat_lean_fused_qkv_saved_product_graphed)
# (coat-lean has the weight cache, the saved product and delayed scaling on by default; the "_no_..." /
# "_recomputed_..." suffixes turn them off.  Longer suffixes first: "_no_weight_cache" also ends in "_weight_cache".)
RECIPE_LEVERS = {"_no_fast_accumulation_grad_input": ("fast_accumulation_grad_input", False),
                 "_no_fast_accumulation": ("fast_accumulation", False),
                 "_no_weight_cache": ("cache_fp8_weights", False), "_weight_cache": ("cache_fp8_weights", True),
                 "_recomputed_product": ("recompute_gated_product", True),
                 "_saved_product": ("recompute_gated_product", False),
                 "_saved_attention_output": ("requantize_attention_output", False),
                 "_attention_saves": ("fp8_attention_saves", True), "_fused_qkv": ("fused_qkv", True),
                 "_no_fused_residual": ("fused_residual", False),
                 "_no_delayed_scaling": ("delayed_scaling", False), "_delayed_scaling": ("delayed_scaling", True),
                 "_gated_gemm": ("gated_gemm", True), "_fast_accumulation": ("fast_accumulation", True),
                 "_fast_accumulation_grad_input": ("fast_accumulation_grad_input", True),
                 "_no_flash_attention": ("flash_attention", False), "_flash_attention": ("flash_attention", True)}


# "_loss_chunk_<tokens>": Recipe.loss_chunk_rows, any positive size
_LOSS_CHUNK = re.compile(r"_loss_chunk_([1-9][0-9]*)$")


def _lever_suffix(rest: str) -> Optional[tuple[str, str, Any]]:
    """``(suffix, Recipe field, value)`` of the lever ``rest`` ends with, or None."""
    chunk = _LOSS_CHUNK.search(rest)
    if chunk is not None:
        return chunk.group(0), "loss_chunk_rows", int(chunk.group(1))
    suffix = next((s for s in RECIPE_LEVERS if rest.endswith(s)), None)
    return None if suffix is None else (suffix, *RECIPE_LEVERS[suffix])


def parse_config(name: str) -> tuple[str, dict, bool]:
    """``(base configuration, {Recipe field: value}, graphed)`` of a configuration name, or ValueError."""
    graphed = name.endswith("_graphed")
    rest = name.removesuffix("_graphed")
    levers: dict = {}
    while rest not in CONFIGS or _lever_suffix(rest) is not None:
        lever = _lever_suffix(rest)
        if lever is None:
            raise ValueError(f"unknown bench configuration {name!r}; choose from {', '.join(CONFIGS)}, "
                             f"optionally with {', '.join(RECIPE_LEVERS)}, _loss_chunk_<tokens> and _graphed")
        suffix, field, value = lever
        levers[field] = value
        rest = rest.removesuffix(suffix)
    return rest, levers, graphed
LEAN_OPTIONS = {"master": "bf16", "optimizer": {"master_weights": "bf16_stochastic"}}
DEFAULT_CONFIGS = ["bf16_eager", "bf16_compiled", "torchao_float8_compiled", "torchao_float8_adamwfp8_compiled",
                   "fp8train_fp8", "fp8train_coat", "fp8train_coat_compiled", "fp8train_coat_lean",
                   "fp8train_coat_lean_graphed"]


def build_model(shape: str, *, master_dtype=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, ffn, vocab = MODEL_SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    if master_dtype is not None:
        model.to(master_dtype)
    return model


def make_optimizer(kind: str, model, lr: float = 1e-4, **fp8train_options):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "torch":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if kind == "torchao_fp8":
        from torchao.optim import AdamWFp8

        return AdamWFp8(params, lr=lr)
    if kind == "fp8train":
        import fp8train

        return fp8train.AdamW(params, lr=lr, **fp8train_options)
    raise ValueError(f"unknown optimizer {kind!r}")


def convert(model, recipe: str):
    if recipe == "bf16":
        return model
    if recipe == "torchao":
        from torchao.float8 import convert_to_float8_training

        def keep_lm_head(module, fqn):
            return fqn != "lm_head"

        convert_to_float8_training(model, module_filter_fn=keep_lm_head)
        return model
    import fp8train

    return fp8train.convert(model, recipe=recipe)


MASKS = ("plain-causal", "hf-default")


def make_step(name: str, shape: str, batch: int, seq: int, master: str = "fp32",
              optimizer_options: dict | None = None, masks: str = "plain-causal"):
    """Build configuration ``name`` on the GPU; return ``(step, row)``: a function running one training step
    (forward, backward, optimizer) that returns the loss, and the row describing the configuration."""
    import torch

    from .causal_masks import plain_causal_batches

    base, levers, graphed = parse_config(name)
    recipe, optimizer_kind, compiled = CONFIGS[base]
    if graphed and compiled:
        raise ValueError(f"{name}: a configuration is either compiled or CUDA-graphed, not both")
    if name.startswith("fp8train_coat_lean"):
        master, optimizer_options = LEAN_OPTIONS["master"], {**LEAN_OPTIONS["optimizer"], **(optimizer_options or {})}
    row = {"name": name, "model": shape, "batch": batch, "seq": seq, "master": master, "masks": masks}
    plain_causal = masks == "plain-causal"
    torch.manual_seed(0)
    model = build_model(shape, master_dtype=torch.bfloat16 if master == "bf16" else None)
    if levers:
        from .recipes import resolve_recipe

        recipe = resolve_recipe(recipe).replace(**levers)
    model = convert(model, recipe)
    opt = make_optimizer(optimizer_kind, model, **(optimizer_options or {}))
    if base.endswith("_step_in_backward"):
        if graphed:
            raise ValueError(f"{name}: the update inside backward cannot be captured in a CUDA graph")
        opt.step_in_backward()
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def forward_backward():
        with plain_causal_batches(plain_causal), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if graphed:
        from .cuda_graphs import GraphedStep

        graph = GraphedStep(model, lambda m, b: m(**b, use_cache=False).loss,
                            {"input_ids": tokens, "labels": tokens}, plain_causal=plain_causal)

        def forward_backward():  # noqa: F811 - the graphed variant
            return graph({"input_ids": tokens, "labels": tokens})

        def step():  # noqa: F811 - the graphed variant of the same step
            loss = forward_backward()
            opt.step()
            return loss

    # the two halves, for the profiling aids (benchmarks/debug/): timed apart they show where a step's time goes
    step.forward_backward, step.optimizer = forward_backward, opt
    return step, row


def run_one(name: str, shape: str, batch: int, seq: int, steps: int, warmup: int,
            master: str = "fp32", optimizer_options: dict | None = None, masks: str = "plain-causal",
            memory_limit_gb: float | None = None) -> dict:
    """Train ``steps`` timed steps of one configuration in this process; return its row."""
    import torch

    if memory_limit_gb is not None:
        limit_memory(memory_limit_gb)
    torch.cuda.reset_peak_memory_stats()
    step, row = make_step(name, shape, batch, seq, master, optimizer_options, masks)
    for _ in range(warmup):
        loss = step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    # peak_memory_reserved_bytes: what the allocator holds, graph pools included -- the cross-check for
    # CUDA-graph rows, whose allocated peak has looked too low
    row.update(tokens_per_s=batch * seq * steps / elapsed, peak_memory_bytes=torch.cuda.max_memory_allocated(),
               peak_memory_reserved_bytes=torch.cuda.max_memory_reserved(),
               step_ms=1000 * elapsed / steps, final_loss=float(loss), status="ok")
    if memory_limit_gb is not None:
        row["memory_limit_gb"] = memory_limit_gb
    return row


def limit_memory(gb: float) -> None:
    """Cap this process's CUDA caching allocator at ``gb`` GB (CUDA graph pools, cuBLAS and cuDNN workspaces
    included: they allocate through it).  A cap above the card's memory is an error, not a silent no-op."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not 0 < gb * 1e9 <= total:
        raise SystemExit(f"--memory-limit-gb {gb}: this GPU has {total / 1e9:.1f} GB; give a positive cap at most "
                         "that")
    torch.cuda.set_per_process_memory_fraction(gb * 1e9 / total)


def run_isolated(name: str, args) -> dict:
    """Run one configuration in a fresh Python process; turn crashes and OOMs into a status row."""
    cmd = [sys.executable, "-m", "fp8train.bench", "--one", name, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--master", args.master,
           "--masks", args.masks]
    if getattr(args, "memory_limit_gb", None) is not None:
        cmd += ["--memory-limit-gb", str(args.memory_limit_gb)]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_ROW "):
            row = json.loads(line[len("BENCH_ROW "):])
            row["wall_s"] = round(time.time() - started, 1)
            return row
    tail = (proc.stderr or proc.stdout)[-2000:]
    status = "oom" if "OutOfMemory" in tail or "out of memory" in tail else "error"
    return {"name": name, "model": args.model, "batch": args.batch, "seq": args.seq, "tokens_per_s": 0.0,
            "peak_memory_bytes": 0, "status": status, "error": tail[-600:]}


def largest_batch_rows(name: str, args, run=run_isolated, limit: int = 512) -> list[dict]:
    """Rows of ``name`` at batch ``args.batch``, doubled until a run fails (out of memory), then one bisection
    step between the last batch that ran and the first that did not.  The largest batch that ran is marked
    ``max_batch: True``; a failure other than out-of-memory stops the search."""
    def at(batch):
        row = run(name, argparse.Namespace(**{**vars(args), "batch": batch}))
        rows.append(row)
        return row["status"] == "ok"

    rows: list[dict] = []
    batch, largest_ok, first_failed = args.batch, None, None
    while batch <= limit:
        if at(batch):
            largest_ok, batch = batch, batch * 2
            continue
        first_failed = batch
        break
    if rows and rows[-1]["status"] not in ("ok", "oom"):
        return rows
    if largest_ok is not None and first_failed is not None and first_failed - largest_ok > 1:
        middle = (largest_ok + first_failed) // 2
        if at(middle):
            largest_ok = middle
    for row in rows:
        if row["status"] == "ok" and row["batch"] == largest_ok:
            row["max_batch"] = True
    return rows


def repeated_rows(names: list, args, run=run_isolated) -> list[dict]:
    """Each configuration ``args.repeat`` times, interleaved (A B C A B C ...: a slow spell of the host hits every
    configuration alike), one process per run.  Returns one row per configuration: its fastest run (host-bound
    eager steps only ever get slower from interference), with every run's tokens/s and the median beside it."""
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(max(1, args.repeat)):
        for name in names:
            row = run(name, args)
            runs[name].append(row)
            if args.repeat > 1:
                print(json.dumps(row), flush=True)
    return [_fastest(runs[name]) if args.repeat > 1 else runs[name][0] for name in names]


def _fastest(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return rows[0]
    best = dict(max(ok, key=lambda r: r["tokens_per_s"]))
    best.update(repeats=len(rows), tokens_per_s_runs=[round(r["tokens_per_s"], 1) for r in rows],
                tokens_per_s_median=round(statistics.median(r["tokens_per_s"] for r in ok), 1))
    return best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="1b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--master", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--masks", default="plain-causal", choices=MASKS,
                        help="plain-causal: SDPA's causal kernel in every mode (default); hf-default: transformers' "
                             "own choice (a full mask under torch.compile / CUDA graphs)")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per configuration")
    parser.add_argument("--out", default=None, help="write <out>/<date>-<gpu>.json (+ .md; rows are added when "
                                                    "the file exists) and <out>/bench-<model>.json")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every configuration N times, interleaved; report each one's fastest run (with all "
                             "runs and the median in the row): eager steps are host-bound and the lent hosts' speed "
                             "drifts")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="let each configuration's allocator use at most this many GB (1e9 bytes) of the GPU -- "
                             "to find on a larger card the batches a smaller one fits (an H100 80GB: 84.5)")
    parser.add_argument("--max-batch", action="store_true",
                        help="per configuration, double --batch until it runs out of memory (one bisection step "
                             "after); rows at the largest batch get max_batch=true and a speed ratio against "
                             "bf16_compiled at its own largest batch")


def bench(args) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("fp8train bench needs a CUDA GPU (it measures GPU throughput and memory); none is visible")
    names = [c for c in args.configs.split(",") if c]
    for name in names:
        try:
            parse_config(name)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    if args.max_batch and args.repeat > 1:
        raise SystemExit("--repeat and --max-batch do not combine: search the largest batch first, then repeat at it")
    rows = []
    for row in ([r for name in names for r in largest_batch_rows(name, args)] if args.max_batch
                else repeated_rows(names, args)):
        rows.append(row)
        print(json.dumps(row), flush=True)
    at_max = {r["name"]: r for r in rows if r.get("max_batch")}
    if "bf16_compiled" in at_max:
        for r in at_max.values():
            r["speed_vs_bf16_compiled_at_max_batch"] = round(
                r["tokens_per_s"] / at_max["bf16_compiled"]["tokens_per_s"], 3)
    baseline = next((r for r in rows if r["name"] == "bf16_compiled" and r["status"] == "ok"
                     and r["batch"] == args.batch), None)
    if baseline:
        for r in rows:
            if r["status"] == "ok":
                r["speed_vs_bf16_compiled"] = round(r["tokens_per_s"] / baseline["tokens_per_s"], 3)
                r["memory_vs_bf16_compiled"] = round(r["peak_memory_bytes"] / baseline["peak_memory_bytes"], 3)
    if args.out:
        write_results(rows, args.out, args.model, torch.cuda.get_device_name())
    return rows


def gpu_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100" (the file-name form of a GPU)."""
    words = name.split()
    return (words[1] if len(words) > 1 and words[0].upper() == "NVIDIA" else "-".join(words)).lower()


def _versions() -> dict:
    import torch

    found = {"torch": torch.__version__}
    for module in ("triton", "transformers", "torchao"):
        try:
            found[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - not installed (or broken): leave it out
            pass
    return found


def write_results(rows: list, out: str, model: str, gpu: str, date: str | None = None) -> str:
    """Write ``<out>/<date>-<gpu>.json`` -- ``{gpu, torch, triton, transformers, date, end_to_end: rows}``; rows
    are added to ``end_to_end`` when the file exists (another bench or gpu_suite run of the same call) -- with a
    markdown table beside it, and ``<out>/bench-<model>.json`` (the rows alone).  Returns the JSON path."""
    import datetime

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"bench-{model}.json"), "w") as f:
        json.dump(rows, f, indent=2)
    date = date or datetime.date.today().isoformat()
    path = os.path.join(out, f"{date}-{gpu_slug(gpu)}.json")
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    result.update({k: v for k, v in {"gpu": gpu, **_versions(), "date": date}.items() if k not in result})
    result["end_to_end"] = list(result.get("end_to_end", [])) + rows
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# fp8train bench, {gpu}, {date}", "",
             ", ".join(f"{k} {result[k]}" for k in ("torch", "triton", "transformers", "torchao") if k in result),
             "", "| name | model | batch | seq | tokens/s | peak GB | vs bf16 compiled | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["end_to_end"]:
        lines.append(f"| {r['name']} | {r.get('model', '')} | {r['batch']} | {r['seq']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_memory_bytes'] / 1e9:.2f} | {r.get('speed_vs_bf16_compiled', '')} | {r['status']} |")
    with open(path[:-5] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="GPU: end-to-end tokens/s and peak memory per recipe")
    add_arguments(parser)
    parser.set_defaults(func=lambda args: print_table(bench(args)) or 0)


def print_table(rows: list[dict]) -> None:
    print(f"{'name':36} {'batch':>5} {'tokens/s':>10} {'peak GB':>8} {'vs bf16c':>8} status")
    for r in rows:
        print(f"{r['name']:36} {r['batch']:5d} {r['tokens_per_s']:10,.0f} {r['peak_memory_bytes'] / 1e9:8.2f} "
              f"{r.get('speed_vs_bf16_compiled', ''):>8} {r['status']}")


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fp8train.bench")
    add_arguments(parser)
    parser.add_argument("--one", default=None, help="run one configuration in this process (internal)")
    args = parser.parse_args()
    if args.one:
        row = run_one(args.one, args.model, args.batch, args.seq, args.steps, args.warmup, master=args.master,
                      masks=args.masks, memory_limit_gb=args.memory_limit_gb)
        print("BENCH_ROW " + json.dumps(row), flush=True)
        return 0
    print_table(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
