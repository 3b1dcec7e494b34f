"""Quality of exported models: eval-split perplexity under simulated quantization, and the export report.

    evaluate("out/w4")                          # an exported checkpoint, as the runtime would compute it
    evaluate(model, tokens, format="w4a16", calibration=cal)   # quantize in memory, then measure
    results = compare(model, tokens, variants=default_variants(), calibration=cal)
    report_markdown(results)

Perplexity is exp(mean next-token cross-entropy) over ``[n, seq_len]`` windows of token ids.  The baseline
"bf16" is the model with every tensor rounded to bf16 (what an unquantized export serves), computed in float32
like the simulated formats, so differences come from quantization alone.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import E4M3, INT8
from .schemes import get_scheme

__all__ = ["perplexity", "evaluate", "Variant", "default_variants", "compare", "activation_error_table",
           "report_markdown"]


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, *,
               reference: Optional[list] = None, keep_log_probs: bool = False) -> dict:
    """Mean next-token NLL and perplexity of ``model`` on ``tokens`` [n, seq_len] (first token not scored).

    ``reference``: the ``log_probs`` of another model on the same tokens (from ``keep_log_probs=True``); adds
    ``kl_vs_reference`` (mean KL(reference || model) per token, nats) and ``top1_agreement`` (fraction of
    positions where both predict the same next token) -- far more sensitive than perplexity to small changes.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [windows, seq_len >= 2], got shape {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    total, count, kl, agree = 0.0, 0, 0.0, 0
    kept = []
    for n, i in enumerate(range(0, tokens.shape[0], batch_size)):
        batch = tokens[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()[:, :-1]
        log_probs = F.log_softmax(logits, dim=-1)
        total -= float(log_probs.gather(-1, batch[:, 1:].unsqueeze(-1)).sum())
        count += batch[:, 1:].numel()
        if reference is not None:
            ref = reference[n].to(device)
            kl += float((ref.exp() * (ref - log_probs)).sum())
            agree += int((ref.argmax(-1) == log_probs.argmax(-1)).sum())
        if keep_log_probs:
            kept.append(log_probs.cpu())
    loss = total / count
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    if reference is not None:
        result.update(kl_vs_reference=kl / count, top1_agreement=agree / count)
    if keep_log_probs:
        result["log_probs"] = kept
    return result


def _bf16_model(model: nn.Module) -> nn.Module:
    """The unquantized export: every tensor rounded to bf16, computed in float32."""
    from .exporter import _hf_config
    from .simulate import build_model, empty_model

    config = _hf_config(model)
    state = model.state_dict()
    ref = empty_model(config, "meta")
    keys = set(ref.state_dict())
    tensors = {k: state[k].detach().to(torch.bfloat16) for k in keys if k in state}
    device = next(model.parameters()).device
    return build_model(config, tensors, {}, {}, device=device if device.type != "meta" else None)


def _simulated(model: nn.Module, format, calibration, options: dict):
    from .exporter import quantize_model
    from .simulate import build_model

    qmodel = quantize_model(model, format, calibration=calibration, **options)
    device = next(model.parameters()).device
    sim = build_model(qmodel.config, qmodel.tensors, qmodel.weights, qmodel.activation_formats(), device=device)
    return sim, qmodel


def _activations_only(model: nn.Module, fmt) -> nn.Module:
    """bf16 weights everywhere, per-token ``fmt`` fake-quantization of the inputs of the layers a format would
    quantize (every linear but lm_head): isolates the activation half of W8A8."""
    from .simulate import SimulatedLinear, _set_module

    sim = _bf16_model(model)
    output = {n for n, m in sim.named_modules() if m is sim.get_output_embeddings()}
    for name, module in list(sim.named_modules()):
        if isinstance(module, nn.Linear) and name not in output:
            _set_module(sim, name, SimulatedLinear(module.weight.data, module.bias, fmt, name))
    return sim


def evaluate(model, tokens: Optional[torch.Tensor] = None, format=None, *, calibration=None,
             batch_size: int = 8, data=None, seq_len: int = 256, max_windows: Optional[int] = None,
             **options) -> dict:
    """Perplexity of an exported checkpoint, or of ``model`` quantized to ``format`` in memory (None: bf16).

    ``model``: an ``nn.Module`` or a directory (an export directory is loaded with :func:`fp8train.export.load`;
    a plain model directory is the bf16 baseline).  ``tokens``: [n, seq_len] token ids; or ``data`` (a text
    file/dir or .pt) read with the model directory's tokenizer and cut into ``seq_len`` windows.
    ``options`` go to :func:`fp8train.export.quantize_model` (method, smoothquant, lorc_rank, fp4_scales, ...).
    """
    started = time.time()
    info: dict = {}
    if isinstance(model, (str, pathlib.Path)):
        from .io import load_tokens, open_source, token_windows
        from .simulate import load

        source = open_source(model)
        if tokens is None:
            if data is None:
                raise ValueError("give tokens= (token ids) or data= (a text file/dir or .pt of token ids)")
            ids = load_tokens(data, source.tokenizer() if not str(data).endswith(".pt") else None)
            tokens = token_windows(ids, seq_len, max_windows)
        if format is None and source.quantized:
            sim = load(source.path)
            info = {"format": "checkpoint", "path": str(source.path)}
            return {**info, **perplexity(sim, tokens, batch_size), "seconds": round(time.time() - started, 2)}
        model = source.load_model()
    if tokens is None:
        raise ValueError("give tokens= ([n, seq_len] token ids)")
    if format is None:
        sim = _bf16_model(model)
        info = {"format": "bf16"}
    else:
        sim, qmodel = _simulated(model, format, calibration, options)
        info = {"format": qmodel.scheme.name, "method": qmodel.info["method"],
                "weight_rel_error": _mean_error(qmodel.info)}
    return {**info, **perplexity(sim, tokens, batch_size), "seconds": round(time.time() - started, 2)}


def _mean_error(info: dict) -> float:
    errors = [layer["weight_rel_error"] for layer in info["layers"].values()]
    return sum(errors) / len(errors) if errors else 0.0


# -- the comparison report ----------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    """One row of the report: a label, a format (None: bf16) and quantize_model options."""

    label: str
    format: Optional[str] = None
    options: dict = dataclasses.field(default_factory=dict)
    needs_calibration: bool = False
    activations_only: Optional[str] = None  # "fp8" / "int8": bf16 weights, quantized activations only
    exported: bool = True  # a checkpoint of this variant can be written (else simulation only)
    note: str = ""


def default_variants(lorc_ranks: Sequence[int] = (8, 32)) -> list[Variant]:
    v = [
        Variant("bf16", note="baseline: every tensor rounded to bf16"),
        Variant("fp8-dynamic", "fp8-dynamic", note="W8A8-FP: E4M3 per-channel weights, per-token E4M3 activations"),
        Variant("w8a8-int8 (RTN)", "w8a8-int8", note="INT8 per-channel weights, per-token INT8 activations"),
        Variant("w8a8-int8 + SmoothQuant 0.8", "w8a8-int8", {"smoothquant": 0.8}, True),
        Variant("w8a8-int8 + SmoothQuant 0.8 + GPTQ", "w8a8-int8", {"smoothquant": 0.8, "method": "gptq"}, True),
        Variant("weights only: E4M3 per channel", "fp8-dynamic", {"_weights_only": True}, exported=False),
        Variant("weights only: INT8 per channel", "w8a8-int8", {"_weights_only": True}, exported=False),
        Variant("activations only: E4M3 per token", activations_only="fp8", exported=False),
        Variant("activations only: INT8 per token", activations_only="int8", exported=False),
        Variant("w4a16 (RTN)", "w4a16", {"method": "rtn"}),
        Variant("w4a16 (GPTQ)", "w4a16", {"method": "gptq"}, True),
        Variant("w4a16 (GPTQ, act-order)", "w4a16", {"method": "gptq", "act_order": True}, True),
        Variant("w4a8-fp (RTN, M1 power-of-two scales)", "w4a8-fp", {"method": "rtn"}),
        Variant("w4a8-fp (GPTQ, M1 power-of-two scales)", "w4a8-fp", {"method": "gptq"}, True),
        Variant("w4a8-fp (GPTQ, M2 shared-max scales)", "w4a8-fp", {"method": "gptq", "fp4_scales": "pow2-shared-max"},
                True, exported=False),
        Variant("w4a8-fp (GPTQ, unconstrained scales)", "w4a8-fp", {"method": "gptq", "fp4_scales": "amax"}, True,
                exported=False),
    ]
    for r in lorc_ranks:
        v.append(Variant(f"w4a8-fp (GPTQ, M1) + LoRC rank {r}", "w4a8-fp", {"method": "gptq", "lorc_rank": r}, True))
    return v


def _weights_only(format: str):
    scheme = get_scheme(format)
    return dataclasses.replace(scheme, name=f"{scheme.name} (weights only)", activation_format=None)


def compare(model: nn.Module, tokens: torch.Tensor, variants: Optional[Sequence[Variant]] = None, *,
            calibration=None, batch_size: int = 8, progress=print) -> list[dict]:
    """Perplexity of every variant on ``tokens``; rows carry ``delta_vs_bf16`` (relative perplexity change) and,
    after the bf16 row, ``kl_vs_reference`` / ``top1_agreement`` against the bf16 model's predictions."""
    variants = list(variants) if variants is not None else default_variants()
    rows = []
    baseline, reference = None, None
    for variant in variants:
        if variant.needs_calibration and calibration is None:
            progress(f"skip {variant.label}: needs calibration data")
            continue
        started = time.time()
        options = dict(variant.options)
        weights_only = options.pop("_weights_only", False)
        row = {"label": variant.label, "format": variant.format, "exported": variant.exported, "note": variant.note,
               **{k: v for k, v in options.items()}}
        if variant.activations_only:
            sim = _activations_only(model, {"fp8": E4M3, "int8": INT8}[variant.activations_only])
        elif variant.format is None:
            sim = _bf16_model(model)
        else:
            fmt = _weights_only(variant.format) if weights_only else variant.format
            sim, qmodel = _simulated(model, fmt, calibration, options)
            row["weight_rel_error"] = _mean_error(qmodel.info)
            row["method"] = qmodel.info["method"]
        is_baseline = baseline is None and variant.format is None and not variant.activations_only
        scores = perplexity(sim, tokens, batch_size, reference=reference, keep_log_probs=is_baseline)
        del sim
        if is_baseline:
            baseline, reference = scores["perplexity"], scores.pop("log_probs")
        row.update(scores)
        row["delta_vs_bf16"] = (row["perplexity"] / baseline - 1.0) if baseline else None
        row["seconds"] = round(time.time() - started, 1)
        rows.append(row)
        delta = f"{100 * row['delta_vs_bf16']:+.2f}%" if row["delta_vs_bf16"] is not None else ""
        kl = f"KL {row['kl_vs_reference']:.2e}" if "kl_vs_reference" in row else ""
        progress(f"{variant.label:48s} ppl {row['perplexity']:.4f} {delta} {kl} ({row['seconds']} s)")
    return rows


@torch.no_grad()
def activation_error_table(model: nn.Module, tokens: torch.Tensor, max_layers: Optional[int] = None) -> list[dict]:
    """Per linear layer: relative error of per-token INT8 vs E4M3 on its real inputs, of per-channel INT8 vs
    E4M3 on its weight, and the kurtosis of both (heavy tails favour the float format)."""
    from .calibration import forward_all, input_hooks
    from .simulate import fake_quantize_tokens

    sim = _bf16_model(model)
    output = {n for n, m in sim.named_modules() if m is sim.get_output_embeddings()}
    linears = {n: m for n, m in sim.named_modules() if isinstance(m, nn.Linear) and n not in output}
    if max_layers:
        linears = dict(list(linears.items())[:max_layers])
    stats: dict[str, dict] = {n: {"x_err_int8": 0.0, "x_err_fp8": 0.0, "x_norm": 0.0, "x_kurt": []} for n in linears}

    def record(name, x):
        x = x.float().reshape(-1, x.shape[-1])
        s = stats[name]
        s["x_norm"] += float(x.pow(2).sum())
        s["x_err_int8"] += float((fake_quantize_tokens(x, INT8) - x).pow(2).sum())
        s["x_err_fp8"] += float((fake_quantize_tokens(x, E4M3) - x).pow(2).sum())
        s["x_kurt"].append(_kurtosis(x))

    with input_hooks(linears, record):
        forward_all(sim, [tokens])
    from ..quant import fake_quantize

    rows = []
    for name, module in linears.items():
        s = stats[name]
        w = module.weight.float()
        w_norm = float(w.norm())
        rows.append({
            "layer": name,
            "act_rel_err_int8": (s["x_err_int8"] / s["x_norm"]) ** 0.5 if s["x_norm"] else 0.0,
            "act_rel_err_fp8": (s["x_err_fp8"] / s["x_norm"]) ** 0.5 if s["x_norm"] else 0.0,
            "act_kurtosis": sum(s["x_kurt"]) / max(len(s["x_kurt"]), 1),
            "w_rel_err_int8": float((fake_quantize(w, INT8, "row") - w).norm()) / w_norm,
            "w_rel_err_fp8": float((fake_quantize(w, E4M3, "row") - w).norm()) / w_norm,
            "w_kurtosis": _kurtosis(w),
        })
    return rows


def _kurtosis(x: torch.Tensor) -> float:
    x = x.float().reshape(-1)
    centered = x - x.mean()
    var = centered.pow(2).mean()
    return float(centered.pow(4).mean() / var.pow(2)) if var > 0 else 0.0


def report_markdown(rows: list[dict], *, title: str = "Export quality", command: str = "", setup: str = "",
                    activation_rows: Optional[list[dict]] = None, goals: Optional[list[tuple[str, bool, str]]] = None
                    ) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    if setup:
        lines += [setup, ""]
    lines += ["| variant | checkpoint | perplexity | vs bf16 | KL vs bf16 (nats/token) | top-1 agrees with bf16 "
              "| mean weight rel. error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * r['delta_vs_bf16']:+.2f}%" if r.get("delta_vs_bf16") is not None else ""
        err = f"{r['weight_rel_error']:.4f}" if "weight_rel_error" in r else ""
        kl = f"{r['kl_vs_reference']:.2e}" if "kl_vs_reference" in r else ""
        top1 = f"{100 * r['top1_agreement']:.2f}%" if "top1_agreement" in r else ""
        kind = "yes" if r.get("exported") and r.get("format") else ("-" if not r.get("format") else "simulation")
        lines.append(f"| {r['label']} | {kind} | {r['perplexity']:.4f} | {delta} | {kl} | {top1} | {err} |")
    lines.append("")
    if goals:
        lines += ["## Goals", "", "| goal | met | measured |", "|---|---|---|"]
        lines += [f"| {g} | {'yes' if ok else '**no**'} | {m} |" for g, ok, m in goals]
        lines.append("")
    if activation_rows:
        n = len(activation_rows)
        mean = {k: sum(r[k] for r in activation_rows) / n for k in activation_rows[0] if k != "layer"}
        lines += ["## FP8 vs INT8, tensor by tensor", "",
                  "Relative error (||q(x) - x|| / ||x||) of per-token INT8 and E4M3 on each linear layer's real "
                  "inputs, and of per-channel INT8 and E4M3 on its weight; kurtosis 3 = Gaussian, larger = heavier "
                  "tails / outliers.", "",
                  "| layer | act INT8 | act E4M3 | act kurtosis | weight INT8 | weight E4M3 | weight kurtosis |",
                  "|---|---|---|---|---|---|---|"]
        for r in activation_rows + [{"layer": "**mean**", **mean}]:
            lines.append(f"| {r['layer']} | {r['act_rel_err_int8']:.4f} | {r['act_rel_err_fp8']:.4f} | "
                         f"{r['act_kurtosis']:.1f} | {r['w_rel_err_int8']:.4f} | {r['w_rel_err_fp8']:.4f} | "
                         f"{r['w_kurtosis']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"
