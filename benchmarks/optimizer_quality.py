"""How much do FP8 Adam states cost?  Quantization error of real Adam moments, and the eval-loss gap of training.

    OMP_NUM_THREADS=1 python benchmarks/optimizer_quality.py            # ~5 min on one idle CPU core
    python benchmarks/optimizer_quality.py --steps 60 --out /tmp/q       # quick look

1. Train a small Llama (transformers LlamaForCausalLM, byte-level vocabulary of 256) on the Python standard
   library's own .py files with fp32 torch.optim.AdamW, and snapshot m and v during training.  For each snapshot,
   quantize m and v with plain absmax scaling and with Dynamic Range Expansion, in E4M3 and E5M2 (groups of 128
   along the last dim), and report the relative L2 error of m, of v and of the Adam direction m / (sqrt(v) + eps).
   Also: DRE with a bfloat16 group maximum instead of float32, in one round trip and after 50 requantizations.
2. Train the same model from the same seed on the same batches with torch.optim.AdamW (fp32 states),
   fp8train.AdamW(states="plain") and fp8train.AdamW(states="dre"), and report the eval loss and its gap to fp32.
   Two more fp32 runs measure the noise floor: weights nudged by 1e-6 of their std, and an lr 1 % higher.

Results: benchmarks/results/optimizer_quality.json and .md (written atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fp8train.dynamic_range_expansion import dre_dequantize, dre_quantize  # noqa: E402
from fp8train.optim import AdamW  # noqa: E402
from fp8train.quant import quantize  # noqa: E402


# -- data ---------------------------------------------------------------------------------------------------------
def stdlib_bytes(limit: int) -> torch.Tensor:
    """The standard library's .py files (sorted, so the corpus is the same on every run), as uint8 tokens."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch: int, seq: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])


def make_model(args, perturb: float = 0.0):
    """The model from ``args.seed``; ``perturb`` > 0 nudges every weight by that fraction of its std (noise floor)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).float()
    if perturb:
        gen = torch.Generator().manual_seed(args.seed + 7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * perturb * (p.std() if p.numel() > 1 else 1.0))
    return model


def loss_of(model, chunk):
    logits = model(input_ids=chunk[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, eval_chunks):
    model.eval()
    loss = sum(loss_of(model, c).item() for c in eval_chunks) / len(eval_chunks)
    model.train()
    return loss


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args, make_optimizer, train_tokens, eval_chunks, snapshot_steps=(), perturb=0.0, lr_scale=1.0):
    model = make_model(args, perturb)
    opt = make_optimizer(model.parameters())
    snapshots, curve = [], []
    for step, chunk in enumerate(batches(train_tokens, args.batch, args.seq, args.steps, args.seed + 1)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args) * lr_scale
        loss = loss_of(model, chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step + 1 in snapshot_steps:
            snapshots.append((step + 1, [(n, opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(),
                                          opt.state[p]["step"].item()) for n, p in model.named_parameters()]))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, round(loss.item(), 5), round(eval_loss(model, eval_chunks), 5)))
    return curve, snapshots


# -- quantization error of recorded moments --------------------------------------------------------------------
def fake_quantize(x, method, fmt):
    if method == "plain":
        return quantize(x, fmt, "1x128").dequantize()
    amax_dtype = torch.bfloat16 if method == "dre-bf16-amax" else torch.float32
    return dre_dequantize(*dre_quantize(x, fmt, amax_dtype=amax_dtype), fmt)


def moment_errors(snapshot, betas, eps):
    """Relative L2 error (over all parameters) of m, v and the Adam direction, per method and format."""
    out = {}
    for method in ("plain", "dre", "dre-bf16-amax"):
        for fmt in ("e4m3", "e5m2"):
            err = {"m": [0.0, 0.0], "v": [0.0, 0.0], "direction": [0.0, 0.0]}
            for _, m, v, step in snapshot:
                mq, vq = fake_quantize(m, method, fmt), fake_quantize(v, method, fmt)
                c1, c2 = 1 - betas[0] ** step, 1 - betas[1] ** step
                d = (m / c1) / ((v / c2).sqrt() + eps)
                dq = (mq / c1) / ((vq / c2).sqrt() + eps)
                for key, exact, approx in (("m", m, mq), ("v", v, vq), ("direction", d, dq)):
                    err[key][0] += (approx - exact).double().pow(2).sum().item()
                    err[key][1] += exact.double().pow(2).sum().item()
            out[f"{method}/{fmt}"] = {k: math.sqrt(a / b) for k, (a, b) in err.items()}
    return out


def requantization_drift(snapshot, steps=50, decay=0.9):
    """m decaying with zero gradients, requantized after every step: float32 vs bfloat16 group maximum."""
    out = {}
    for amax_dtype in (torch.float32, torch.bfloat16):
        num = den = 0.0
        for _, m, _, _ in snapshot:
            x = m.clone()
            for _ in range(steps):
                x = dre_dequantize(*dre_quantize(x * decay, amax_dtype=amax_dtype))
            exact = m * decay**steps
            num += (x - exact).double().pow(2).sum().item()
            den += exact.double().pow(2).sum().item()
        out[str(amax_dtype).split(".")[-1]] = math.sqrt(num / den)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=352)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.time()

    tokens = stdlib_bytes(args.corpus_bytes)
    split = int(tokens.numel() * 0.9)
    train_tokens, eval_tokens = tokens[:split], tokens[split:]
    eval_chunks = list(batches(eval_tokens, args.batch, args.seq, args.eval_batches, seed=12345))
    betas, eps = (0.9, 0.95), 1e-8

    optimizers = {
        # the noise floor: fp32 AdamW from weights nudged by 1e-6 of their std -- how far two runs drift apart
        # for reasons that have nothing to do with the optimizer's precision
        "fp32-nudged": lambda ps: torch.optim.AdamW(ps, lr=args.lr, betas=betas, eps=eps,
                                                    weight_decay=args.weight_decay),
        # ... and from an lr 1 % higher: how sensitive the run is to a slightly longer Adam step
        "fp32-lr+1%": lambda ps: torch.optim.AdamW(ps, lr=args.lr, betas=betas, eps=eps,
                                                   weight_decay=args.weight_decay),
        "fp32": lambda ps: torch.optim.AdamW(ps, lr=args.lr, betas=betas, eps=eps, weight_decay=args.weight_decay),
        "fp8-plain": lambda ps: AdamW(ps, lr=args.lr, betas=betas, eps=eps, weight_decay=args.weight_decay,
                                      states="plain"),
        "fp8-dre": lambda ps: AdamW(ps, lr=args.lr, betas=betas, eps=eps, weight_decay=args.weight_decay,
                                    states="dre"),
    }
    snapshot_steps = sorted({max(1, args.steps // 6), args.steps // 2, args.steps})
    runs, errors, drift = {}, {}, {}
    for name, make in optimizers.items():
        t0 = time.time()
        curve, snapshots = train(args, make, train_tokens, eval_chunks, snapshot_steps if name == "fp32" else (),
                                 perturb=1e-6 if name == "fp32-nudged" else 0.0,
                                 lr_scale=1.01 if name == "fp32-lr+1%" else 1.0)
        runs[name] = {"curve": curve, "final_eval_loss": curve[-1][2], "seconds": round(time.time() - t0, 1)}
        print(f"{name}: eval loss {curve[-1][2]:.4f} ({runs[name]['seconds']} s)", flush=True)
        for step, snapshot in snapshots:
            errors[step] = moment_errors(snapshot, betas, eps)
            if step == args.steps:
                drift = requantization_drift(snapshot)
    base = runs["fp32"]["final_eval_loss"]
    for name, run in runs.items():
        run["gap_percent"] = round(100 * (run["final_eval_loss"] - base) / base, 3)

    last = errors[args.steps]
    ratio = {f"{k}/{fmt}": last[f"plain/{fmt}"][k] / last[f"dre/{fmt}"][k] for k in ("m", "v", "direction")
             for fmt in ("e4m3", "e5m2")}
    goals = {
        "dre_error_1.7x_below_plain_e4m3_m": ratio["m/e4m3"] >= 1.7,
        "dre_error_1.7x_below_plain_e4m3_v": ratio["v/e4m3"] >= 1.7,
        "dre_eval_loss_gap_le_0.3_percent": abs(runs["fp8-dre"]["gap_percent"]) <= 0.3,
        "noise_floor_below_0.3_percent (else the gap goal cannot be resolved at this scale)":
            max(abs(runs["fp32-nudged"]["gap_percent"]), abs(runs["fp32-lr+1%"]["gap_percent"])) <= 0.3,
    }
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/optimizer_quality.py " + " ".join(argv or sys.argv[1:]),
        "config": vars(args) | {"betas": betas, "eps": eps, "torch": torch.__version__},
        "params": sum(p.numel() for p in make_model(args).parameters()),
        "moment_relative_error": {str(k): v for k, v in errors.items()},
        "plain_over_dre_error_ratio": ratio,
        "requantization_drift_50_steps": drift,
        "training": runs,
        "goals": goals,
        "seconds": round(time.time() - started, 1),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "optimizer_quality.json", json.dumps(result, indent=2) + "\n")
    write_atomically(out / "optimizer_quality.md", to_markdown(result))
    print(to_markdown(result))
    return 0


def write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# FP8 Adam states: quantization error and training quality",
        "",
        f"`{r['command']}` -- Llama {c['layers']} layers, hidden {c['hidden']}, ffn {c['ffn']}, {r['params']:,} "
        f"parameters, byte-level vocabulary, Python stdlib source; {c['steps']} steps of batch {c['batch']} x "
        f"{c['seq']}, lr {c['lr']} (warmup {c['warmup']}, cosine), betas {tuple(c['betas'])}, weight decay "
        f"{c['weight_decay']}, grad clip 1.0; torch {c['torch']}; {r['seconds']} s.",
        "",
        "## Relative L2 error of the recorded fp32 Adam moments after quantization (groups of 128, last dim)",
        "",
        "| step | method/format | m | v | m/(sqrt(v)+eps) |",
        "|---|---|---|---|---|",
    ]
    for step, by_method in r["moment_relative_error"].items():
        for key, e in by_method.items():
            lines.append(f"| {step} | {key} | {e['m']:.4f} | {e['v']:.4f} | {e['direction']:.4f} |")
    lines += ["", "Plain error / DRE error at the last step: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in r["plain_over_dre_error_ratio"].items()), ""]
    if r["requantization_drift_50_steps"]:
        d = r["requantization_drift_50_steps"]
        lines += [f"m decayed 50 times by 0.9 with a DRE requantization after each step (zero gradients): relative "
                  f"error {d['float32']:.4f} with a float32 group maximum, {d['bfloat16']:.4f} with a bfloat16 one "
                  "(rounded up, so it ratchets upwards).", ""]
    lines += ["## Training: same seed, same batches", "", "| optimizer | eval loss | gap vs fp32 | seconds |",
              "|---|---|---|---|"]
    for name, run in r["training"].items():
        lines.append(f"| {name} | {run['final_eval_loss']:.4f} | {run['gap_percent']:+.3f} % | {run['seconds']} |")
    lines += ["", "Eval loss during training (step: fp32 / fp32-nudged / fp32-lr+1% / plain / dre):", ""]
    curves = [r["training"][k]["curve"] for k in ("fp32", "fp32-nudged", "fp32-lr+1%", "fp8-plain", "fp8-dre")]
    for points in zip(*curves):
        lines.append(f"- {points[0][0]}: " + " / ".join(f"{p[2]:.4f}" for p in points))
    lines += ["", "## Goals", ""] + [f"- {k}: {'met' if v else '**missed**'}" for k, v in r["goals"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
