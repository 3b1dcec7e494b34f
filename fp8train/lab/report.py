"""The sweep's report: ``results.json``, ``report.md``, ``heatmap.png``, ``loss_curves.png``, ``sharpness.png``.

Plots use matplotlib's Agg canvas (no display needed); every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import pathlib
import statistics
from typing import Optional

LINESTYLES = ("-", "--", ":", "-.")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: pathlib.Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "--" if value is None else f"{value:.{digits}f}"


def stability_table(formats: list[str], lrs: list[float], results: list[dict]) -> dict:
    """{(format, lr): {"stable", "finished", "runs", "fraction", "eval_loss", "sharpness"}} over seeds.

    ``fraction`` = stable / finished runs (None when none finished); ``eval_loss`` and ``sharpness`` are means
    over the stable runs' final values, ``eval_loss_all`` over every finished run with a finite eval loss.
    """
    table = {}
    for fmt in formats:
        for lr in lrs:
            cell = [r for r in results if r["format"] == fmt and r["lr"] == lr]
            finished = [r for r in cell if r["state"] == "complete"]
            stable = [r for r in finished if r["stable"]]
            table[fmt, lr] = {"stable": len(stable), "finished": len(finished), "runs": len(cell),
                              "fraction": len(stable) / len(finished) if finished else None,
                              "eval_loss": _mean(r["final_eval_loss"] for r in stable),
                              "eval_loss_all": _mean(r["final_eval_loss"] for r in finished),
                              "sharpness": _mean(r["final_sharpness"] for r in stable)}
    return table


def _format_facts(fmt: str) -> str:
    if fmt in ("bf16", "fp8", "coat"):
        return "recipe (control, no simulation)"
    from .simulated_linear import parse_simulated_format

    f = parse_simulated_format(fmt)
    if not hasattr(f, "exp_bits"):
        return f"{f.name}: integer, max {f.max:g}"
    return (f"{f.name}: {f.exp_bits} exponent / {f.man_bits} mantissa bits, bias {f.bias}, max {f.max:.4g}, "
            f"min normal {f.min_normal:.3g}, min subnormal {f.min_subnormal:.3g}")


def plot_heatmap(formats, lrs, table, path: pathlib.Path, title: str, control: Optional[str] = None) -> None:
    """Two panels, format x learning rate: the fraction of seeds that stayed stable (k/n), and the mean final eval
    loss of the finished runs (with the difference to ``control`` at the same learning rate)."""
    import matplotlib
    import numpy as np

    fraction = np.full((len(formats), len(lrs)), np.nan)
    loss = np.full((len(formats), len(lrs)), np.nan)
    for i, fmt in enumerate(formats):
        for j, lr in enumerate(lrs):
            t = table[fmt, lr]
            if t["fraction"] is not None:
                fraction[i, j] = t["fraction"]
            if t["eval_loss_all"] is not None:
                loss[i, j] = t["eval_loss_all"]
    fig = _figure(2.4 + 3.0 * len(lrs), 1.3 + 0.55 * len(formats))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    image = left.imshow(np.ma.masked_invalid(fraction), aspect="auto", vmin=0.0, vmax=1.0,
                        cmap=matplotlib.colormaps["RdYlGn"].with_extremes(bad="#dddddd"))
    fig.colorbar(image, ax=left, label="fraction of seeds stable")
    finite = loss[np.isfinite(loss)]
    image = right.imshow(np.ma.masked_invalid(loss), aspect="auto",
                         cmap=matplotlib.colormaps["viridis_r"].with_extremes(bad="#dddddd"),
                         vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    fig.colorbar(image, ax=right, label="final eval loss (mean over finished seeds)")
    for i, fmt in enumerate(formats):
        for j, lr in enumerate(lrs):
            t = table[fmt, lr]
            left.text(j, i, "n/a" if t["fraction"] is None else f"{t['stable']}/{t['finished']}", ha="center",
                      va="center", fontsize=8)
            if t["eval_loss_all"] is None:
                continue
            text = f"{t['eval_loss_all']:.3f}"
            base = table.get((control, lr), {}).get("eval_loss_all") if control else None
            if base is not None and fmt != control:
                text += f"\n{t['eval_loss_all'] - base:+.3f}"
            shade = (t["eval_loss_all"] - finite.min()) / max(1e-9, finite.max() - finite.min())
            right.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if shade > 0.6 else "black")
    for ax, name in ((left, "stable seeds"), (right, "final eval loss" + (f" (vs {control})" if control else ""))):
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(formats)), formats)
        ax.set(xlabel="peak learning rate", title=name)
    left.set_ylabel("format")
    fig.suptitle(title)
    _save_png(fig, path)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if math.isfinite(a)]
        out.append(statistics.fmean(finite) if finite else math.nan)
    return out


def plot_curves(formats, lrs, results, curves: dict, key: str, path: pathlib.Path, ylabel: str, steps: int) -> None:
    """One panel per learning rate; a color per format, a line style per seed; x marks a divergence."""
    fig = _figure(1.0 + 3.6 * len(lrs), 3.8)
    colors = __import__("matplotlib").colormaps["tab10"]
    axes = [fig.add_subplot(1, len(lrs), j + 1) for j in range(len(lrs))]
    window = max(1, steps // 50) if key == "loss" else 1
    first_losses = [c[0]["loss"] for c in curves.values() if c and math.isfinite(c[0].get("loss", math.nan))]
    for j, lr in enumerate(lrs):
        ax = axes[j]
        for i, fmt in enumerate(formats):
            runs = sorted((r for r in results if r["format"] == fmt and r["lr"] == lr), key=lambda r: r["seed"])
            for k, r in enumerate(runs):
                records = [rec for rec in curves.get(r["name"], []) if rec.get(key) is not None]
                if not records:
                    continue
                xs = [rec["step"] for rec in records]
                ys = _smooth([rec[key] for rec in records], window)
                ax.plot(xs, ys, LINESTYLES[k % len(LINESTYLES)], color=colors(i % 10), lw=1.1, alpha=0.85,
                        label=fmt if k == 0 else None)
                if r["stable"] is False and r["divergence_step"] is not None:
                    ys_finite = [y for x, y in zip(xs, ys) if x <= r["divergence_step"] and math.isfinite(y)]
                    if ys_finite:
                        ax.plot([min(r["divergence_step"], xs[-1])], [ys_finite[-1]], "x", color=colors(i % 10), ms=8)
        ax.set(title=f"lr {lr:g}", xlabel="step")
        if key == "loss" and first_losses:
            low = min((y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)), default=0.0)
            ax.set_ylim(max(0.0, low - 0.1), 1.6 * max(first_losses))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=8, title="format (line style = seed)", title_fontsize=7)
    _save_png(fig, path)


def write_report(root: pathlib.Path, settings, thresholds, formats: list[str], lrs: list[float], results: list[dict],
                 command: Optional[str] = None) -> pathlib.Path:
    """Write results.json, the PNGs and report.md into ``root``; returns the report's path."""
    from ..train.checkpoint import write_json_atomic
    from .sweep import read_metrics, simulate_spec

    root = pathlib.Path(root)
    table = stability_table(formats, lrs, results)
    write_json_atomic(root / "results.json", {
        "settings": dataclasses.asdict(settings), "thresholds": dataclasses.asdict(thresholds),
        "formats": formats, "lrs": lrs, "cells": results,
        "stable_fraction": {f"{fmt}@{lr:g}": t["fraction"] for (fmt, lr), t in table.items()}})
    curves = {r["name"]: read_metrics(root / "runs" / r["name"] / "metrics.jsonl") for r in results}
    seeds = sorted({r["seed"] for r in results})
    title = f"{settings.model}, {settings.steps} steps, {len(seeds)} seed(s), scaling {settings.scaling}"
    control = next((f for f in formats if f in ("bf16", "fp8", "coat")), None)
    plot_heatmap(formats, lrs, table, root / "heatmap.png", title, control)
    has_curves = any(curves.values())
    if has_curves:
        plot_curves(formats, lrs, results, curves, "loss", root / "loss_curves.png",
                    "training loss (moving mean)", settings.steps)
        plot_curves(formats, lrs, results, curves, "sharpness", root / "sharpness.png",
                    f"last-token sharpness (eps {settings.sharpness_eps:g})", settings.steps)

    lines = [f"# Stability sweep: {len(formats)} formats x {len(lrs)} learning rates x {len(seeds)} seeds", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.  Each cell is one `fp8train train` run in "
              f"`runs/<format>_lr<lr>_seed<seed>/`.", "",
              "| setting | value |", "|---|---|"]
    shown = dataclasses.asdict(settings)
    shown["sharpness_every"] = settings.resolved_sharpness_every()
    for key, value in shown.items():
        if value not in (None, ""):
            lines.append(f"| {key} | {value} |")
    lines += [f"| divergence | a non-finite loss, or the {thresholds.window}-step moving mean of the training loss > "
              f"{thresholds.spike_factor:g} x its running minimum"
              + (f" or > {thresholds.loss_cap:g}" if thresholds.loss_cap is not None else "") + " |", ""]

    lines += ["## Formats", ""]
    for fmt in formats:
        spec = simulate_spec(fmt, settings)
        lines.append(f"- `{fmt}` -- {_format_facts(fmt)}" + (f"; `--simulate-format {spec}`" if spec else ""))
    lines.append("")

    lines += ["## Stable fraction (format x learning rate)", "",
              "Stable seeds / finished seeds; below, the mean final eval loss of the stable seeds "
              "(and their mean final sharpness).", "",
              "| format | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | all lrs |",
              "|---|" + "---|" * (len(lrs) + 1)]
    for fmt in formats:
        row = []
        for lr in lrs:
            t = table[fmt, lr]
            if t["fraction"] is None:
                row.append("n/a" if t["runs"] else "")
                continue
            row.append(f"{t['stable']}/{t['finished']}: {_fmt(t['eval_loss'])} (S {_fmt(t['sharpness'], 2)})")
        stable = sum(table[fmt, lr]["stable"] for lr in lrs)
        finished = sum(table[fmt, lr]["finished"] for lr in lrs)
        lines.append(f"| {fmt} | " + " | ".join(row) + f" | {stable}/{finished} |")
    lines += ["", "Left: stable seeds / finished seeds.  Right: mean final eval loss of all finished runs"
              + (f" and its difference to `{control}` at the same learning rate" if control else "") + ".", "",
              "![stability heat-map](heatmap.png)", ""]
    if has_curves:
        lines += ["## Curves", "", "Training loss (moving mean over steps/50 steps; x = divergence detected):", "",
                  "![loss curves](loss_curves.png)", "",
                  "Last-token epsilon-sharpness S on a fixed eval batch (docs/lab.md):", "",
                  "![sharpness](sharpness.png)", ""]

    lines += ["## Runs", "", "| format | lr | seed | outcome | final eval loss | final S | max S | steps | time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["state"] != "complete":
            outcome = r["state"] + (f": {r['error']}" if r.get("error") else "")
        elif r["stable"]:
            outcome = "stable"
        else:
            outcome = f"diverged at step {r['divergence_step']}: {r['reason']}"
        lines.append(f"| {r['format']} | {r['lr']:g} | {r['seed']} | {outcome} | {_fmt(r['final_eval_loss'])} | "
                     f"{_fmt(r['final_sharpness'], 3)} | {_fmt(r['max_sharpness'], 3)} | {r['steps_done']} | "
                     f"{_fmt(r['wall_time_s'], 0)} |")
    pending = [r for r in results if r["state"] != "complete"]
    if pending:
        lines += ["", f"{len(pending)} cell(s) not finished: run the same command again to continue."]
    lines.append("")
    path = root / "report.md"
    _write_text(path, "\n".join(lines))
    return path
