"""Plots (matplotlib, Agg canvas: no display needed) and the markdown report of ``fp8train compare``."""

from __future__ import annotations

import os
import pathlib

from .metrics import format_bytes

MEMORY_PARTS = [("weights_bytes", "weights"), ("gradients_bytes", "gradients"),
                ("optimizer_state_bytes", "optimizer state"), ("activations_bytes", "activations")]


def _figure(width=7.5, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: pathlib.Path) -> None:
    path = pathlib.Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def _curves(ax, records: list[dict], label: str, color=None) -> None:
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    line, = ax.plot(steps, losses, lw=0.8, alpha=0.55, color=color, label=f"{label} train")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", ms=3.5, lw=1.6, color=line.get_color(), label=f"{label} eval")


def plot_loss(records: list[dict], path: pathlib.Path, title: str) -> None:
    """Train loss per step and eval loss at the evaluation steps of one run."""
    fig = _figure()
    ax = fig.add_subplot()
    _curves(ax, records, "")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_compare_losses(runs: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    for recipe, records in runs.items():
        _curves(ax, records, recipe)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_memory(summaries: dict[str, dict], path: pathlib.Path, title: str) -> None:
    """Stacked bars: weights / gradients / optimizer state / activations (MiB) per recipe."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    names = list(summaries)
    bottoms = [0.0] * len(names)
    for key, label in MEMORY_PARTS:
        values = [summaries[n]["memory_breakdown"][key] / 2**20 for n in names]
        ax.bar(names, values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set(ylabel="MiB", title=title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def gap_percent(loss: float, baseline: float) -> float:
    return 100.0 * (loss - baseline) / baseline


def compare_markdown(summaries: dict[str, dict], failures: dict[str, str], settings: dict) -> str:
    """``report.md``: settings, the results table, the plots and how each number was measured."""
    lines = ["# fp8train compare", ""]
    lines.append(", ".join(f"{k}: `{v}`" for k, v in settings.items()))
    lines.append("")
    baseline = summaries.get("bf16", {}).get("final_eval_loss")
    header = ["recipe", "optimizer", "final eval loss", "gap to bf16", "eval perplexity", "tokens/s",
              "peak memory"] + [label for _, label in MEMORY_PARTS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for recipe, s in summaries.items():
        gap = "—" if baseline is None else f"{gap_percent(s['final_eval_loss'], baseline):+.2f} %"
        row = [recipe, s["optimizer"], f"{s['final_eval_loss']:.4f}", gap, f"{s['eval_perplexity']:.2f}",
               f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] else "—", format_bytes(s["peak_memory_bytes"])]
        row += [format_bytes(s["memory_breakdown"][key]) for key, _ in MEMORY_PARTS]
        lines.append("| " + " | ".join(row) + " |")
    for recipe, error in failures.items():
        lines.append(f"| {recipe} | failed: {error.splitlines()[0] if error else 'see its run directory'} |"
                     + " |" * (len(header) - 2))
    kind = next(iter(summaries.values()))["peak_memory_kind"] if summaries else ""
    lines += ["", "![loss curves](loss_curves.png)", "", "![memory](memory.png)", "", "## How this was measured", "",
              "* Every recipe ran with the same seed, data order, model initialisation and steps; each run's own "
              "directory holds its `metrics.jsonl`, `summary.json` and checkpoints.",
              "* Final eval loss: mean cross-entropy over the fixed held-out windows at the last step; the gap is "
              "relative to bf16.",
              "* tokens/s: training tokens / time spent in training steps (the first step, which includes warm-up "
              "and compilation, is left out).",
              f"* Peak memory: `{kind}` over the whole run "
              + ("(on CPU this is the whole process's resident set, interpreter and libraries included)."
                 if kind == "cpu_max_rss" else "(the CUDA caching allocator's peak)."),
              "* Breakdown, measured on one micro-batch: weights = parameter bytes; gradients = `.grad` bytes; "
              "optimizer state = bytes of the tensors in the optimizer's state_dict; activations = bytes autograd "
              "saves for backward (via `torch.autograd.graph.saved_tensors_hooks`, each storage counted once, "
              "parameters excluded)."]
    if settings.get("device") == "cpu":
        lines.append("* On CPU there is no bf16 autocast: the bf16 recipe computes and saves fp32 activations, and the "
                     "FP8 recipes run fp8train's plain-torch reference ops, so tokens/s says nothing about GPU speed "
                     "and the activation savings are larger than against a real bf16 baseline.")
    lines.append("")
    return "\n".join(lines)
