"""``fp8train export`` and ``fp8train eval`` (registered in fp8train/cli.py).  Imports torch only when run.

Exit codes: 0 ok, 1 a problem the user can fix (printed as one ``error: ...`` line), 2 bad arguments.

    fp8train export RUN_DIR_OR_MODEL_DIR --format fp8-dynamic --out DIR [--overwrite]
    fp8train export MODEL_DIR --format w4a16 --out DIR --calibration-data corpus/ --calibration-samples 128
    fp8train eval EXPORT_DIR --data eval.txt                      # perplexity of a checkpoint (simulated)
    fp8train eval MODEL_DIR --data eval.txt --formats all --calibration-data train/ --report-out report.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

FORMATS = ("fp8-dynamic", "w8a8-int8", "w4a16", "w4a8-fp")


def _plain_warnings() -> None:
    """Warnings as one ``warning: ...`` line on stderr instead of file:line noise."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def _user_errors(command):
    """Run ``command(args)``; errors the user can fix become ``error: ...`` and exit code 1."""
    def run(args) -> int:
        _plain_warnings()
        try:
            return command(args)
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return run


def register(subparsers) -> None:
    exp = subparsers.add_parser("export", help="quantize a trained model into a compressed-tensors checkpoint",
                                description="Quantize a model (run directory or Hugging Face model directory) for "
                                            "inference and write a compressed-tensors checkpoint (vLLM, transformers).")
    exp.add_argument("model", help="run directory or model directory (config.json + *.safetensors)")
    exp.add_argument("--format", required=True, choices=FORMATS, help="export format")
    exp.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _calibration_args(exp)
    exp.add_argument("--method", choices=("rtn", "gptq"), default=None,
                     help="weight rounding: rtn or gptq (default: gptq for 4-bit formats when calibration data is given)")
    exp.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                     help="apply SmoothQuant with this migration strength first (e.g. 0.8; formats with quantized activations)")
    exp.add_argument("--lorc-rank", type=int, default=0, help="low-rank error compensation rank (0: off)")
    exp.add_argument("--group-size", type=int, default=None, help="w4a16 group size (default 128)")
    exp.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal")
    exp.add_argument("--damping", type=float, default=0.01, help="GPTQ dampening, fraction of mean(diag H)")
    exp.add_argument("--quantize-lm-head", action="store_true", help="quantize the output projection too")
    exp.add_argument("--quantize-embeddings", action="store_true", help="quantize the embedding table (weight-only)")
    exp.add_argument("--eval-data", default=None,
                     help="text file/dir or .pt of token ids: measure bf16 and exported perplexity after export")
    exp.add_argument("--seq-len", type=int, default=None, help="window length for --eval-data (default 256)")
    exp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    exp.set_defaults(func=_user_errors(_run_export))

    ev = subparsers.add_parser("eval", help="perplexity of an exported (or bf16) model under simulated quantization",
                               description="Eval-split perplexity: of an exported checkpoint as the runtime computes "
                                           "it, or of a model quantized in memory to one or more formats.")
    ev.add_argument("model", help="export directory, model directory or run directory")
    ev.add_argument("--data", default=None,
                    help="evaluation text (file or directory) or .pt of token ids (default for an fp8train run, or "
                         "an export of one: the run's eval split)")
    ev.add_argument("--formats", default="",
                    help="comma-separated formats to compare with bf16, or 'all' for the full report "
                         "(FP8 vs INT8, RTN vs GPTQ, FP4 scale rules, LoRC); empty: evaluate the model as it is")
    _calibration_args(ev)
    ev.add_argument("--seq-len", type=int, default=None,
                    help="evaluation window length in tokens (default: the run's seq_len, else 256)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--report-out", default=None, help="write a markdown report here")
    ev.add_argument("--json-out", default=None, help="write the results as JSON here")
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=_user_errors(_run_eval))


def _calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration-data", default=None,
                        help="text file/dir or .pt of token ids to draw calibration samples from "
                             "(default for an fp8train run: its training split)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="number of calibration sequences")
    parser.add_argument("--calibration-seq-len", type=int, default=None,
                        help="tokens per calibration sequence (default: the run's seq_len, else 512)")


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _calibration(args, source, needed: bool):
    """Calibration token ids: random windows (seed 0) of --calibration-data, or of a run's training split."""
    from .io import load_tokens, token_windows

    seq_len = args.calibration_seq_len or (source.train or {}).get("seq_len") or 512
    if args.calibration_data is not None:
        tokenizer = None if str(args.calibration_data).endswith(".pt") else source.tokenizer()
        ids = load_tokens(args.calibration_data, tokenizer,
                          max_tokens=max(args.calibration_samples * seq_len * 20, 1 << 20))
    elif needed and source.kind == "run":
        ids, _ = source.corpus_split()
    else:
        return None
    return token_windows(ids, seq_len, args.calibration_samples, seed=0)


def _eval_tokens(args, source, export_info=None):
    """Evaluation windows: --data, else the eval split of the run (or of the run an export was made from)."""
    from .io import load_tokens, open_source, token_windows

    if args.data is not None:
        tokenizer = None if str(args.data).endswith(".pt") else source.tokenizer()
        seq_len = args.seq_len or (source.train or {}).get("seq_len") or 256
        return token_windows(load_tokens(args.data, tokenizer), seq_len, args.max_windows)
    run = source
    if source.kind != "run" and export_info and (export_info.get("source") or {}).get("kind") == "run":
        run = open_source(export_info["source"]["path"])
    if run.kind != "run":
        raise ValueError(f"{source.path} is not an fp8train run (nor exported from one): give --data")
    _, held_out = run.corpus_split()
    return token_windows(held_out, args.seq_len or run.train["seq_len"], args.max_windows)


def _run_export(args) -> int:
    from .checkpoint import check_out_dir
    from .exporter import export
    from .io import open_source
    from .schemes import get_scheme

    check_out_dir(pathlib.Path(args.out), args.overwrite)  # before the (possibly long) model load
    source = open_source(args.model)
    model = source.load_model(_device(args.device))
    scheme = get_scheme(args.format)
    needed = (args.method or scheme.default_method) == "gptq" or args.smoothquant is not None
    calibration = _calibration(args, source, needed)
    info = export(model, args.out, args.format, calibration=calibration, overwrite=args.overwrite, method=args.method,
                  smoothquant=args.smoothquant, lorc_rank=args.lorc_rank,
                  group_size=args.group_size if args.group_size else "keep", act_order=args.act_order,
                  damping=args.damping, quantize_lm_head=args.quantize_lm_head,
                  quantize_embeddings=args.quantize_embeddings, copy_from=source.files_dir, source=source)
    print(f"wrote {info['path']}: {args.format} ({info['method']}), {info['quantized_layers']} layers quantized, "
          f"{len(info['skipped'])} kept in bf16, {info['seconds']} s")
    for name, reason in info["skipped"].items():
        print(f"  kept in bf16: {name}: {reason}")
    if args.eval_data:
        from .quality import evaluate

        args.data, args.max_windows = args.eval_data, None
        tokens = _eval_tokens(args, source)
        base = evaluate(model, tokens)
        ours = evaluate(info["path"], tokens)
        delta = ours["perplexity"] / base["perplexity"] - 1
        print(f"perplexity: bf16 {base['perplexity']:.4f}, {args.format} {ours['perplexity']:.4f} ({100 * delta:+.2f}%)")
    return 0


def _run_eval(args) -> int:
    from .io import open_source
    from .quality import Variant, activation_error_table, compare, default_variants, evaluate, report_markdown

    source = open_source(args.model)
    if source.quantized or not args.formats:
        if args.formats:
            raise ValueError(f"{source.path} is already quantized; --formats compares formats of an unquantized model")
        export_info = None
        info_file = source.path / "fp8train_export.json"
        if info_file.is_file():
            export_info = json.loads(info_file.read_text())
        tokens = _eval_tokens(args, source, export_info)
        if source.kind == "run":
            result = evaluate(source.load_model(_device(args.device)), tokens, batch_size=args.batch_size)
        else:
            result = evaluate(str(source.path), tokens, batch_size=args.batch_size)
        print(f"{result['format']}: perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f}, "
              f"{result['tokens']} tokens)")
        results = [result]
    else:
        model = source.load_model(_device(args.device))
        tokens = _eval_tokens(args, source)
        calibration = _calibration(args, source, needed=True)
        if args.formats.strip() == "all":
            variants = default_variants()
        else:
            names = [f.strip() for f in args.formats.split(",") if f.strip()]
            unknown = [n for n in names if n not in FORMATS]
            if unknown:
                raise ValueError(f"unknown format(s) {unknown}: choose from {', '.join(FORMATS)} or 'all'")
            variants = [Variant("bf16")] + [Variant(n, n, {"method": "rtn"} if calibration is None else {})
                                            for n in names]
        results = compare(model, tokens, variants, calibration=calibration, batch_size=args.batch_size)
        if args.report_out:
            table = activation_error_table(model, tokens[: min(8, tokens.shape[0])])
            command = "fp8train " + " ".join(sys.argv[1:]) if sys.argv and "fp8train" in sys.argv[0] else ""
            text = report_markdown(results, command=command, activation_rows=table)
            pathlib.Path(args.report_out).write_text(text)
            print(f"wrote {args.report_out}")
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0
