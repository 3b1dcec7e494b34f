"""Export quality on a small Llama trained here on the Python standard library (byte-level vocabulary).

    python benchmarks/export_quality.py                       # train (cached in runs/), then compare formats
    python benchmarks/export_quality.py --run RUN_DIR --out benchmarks/results/NAME   # an `fp8train train` run

Trains a LlamaForCausalLM (hidden 256, 4 layers, byte vocabulary) on the .py files of the running Python's
standard library (5% of the files, chosen by a CRC of their path, are the evaluation split), then reports
eval-split perplexity of bf16 and of every export format under simulated quantization (fp8train.export.compare),
plus the per-tensor FP8-vs-INT8 errors, to benchmarks/results/export-quality-cpu.{md,json}.  Every exported
format is also written to disk and read back with compressed-tensors (through transformers) as a check.
Training takes roughly 10-30 minutes on 2 CPU cores (cached in runs/export-bench/model); the comparison ~5.
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
import zlib

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fp8train.export import quality  # noqa: E402
from fp8train.export.exporter import export  # noqa: E402
from fp8train.export.io import token_windows  # noqa: E402


def stdlib_split(eval_percent: int = 5) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    train, evaluation = [], []
    for f in files:
        key = zlib.crc32(str(f.relative_to(root)).encode()) % 100
        (evaluation if key < eval_percent else train).append(f)
    return train, evaluation


def read_bytes(files) -> torch.Tensor:
    chunks = [f.read_bytes() + b"\n\n" for f in files]
    data = b"".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def byte_tokenizer():
    """A Hugging Face tokenizer whose ids are the UTF-8 bytes (GPT-2's byte-to-unicode alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def train_model(out: pathlib.Path, train_ids: torch.Tensor, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    started = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - started:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    (out / "training.json").write_text(json.dumps({**vars(args), "seconds": round(time.time() - started)}, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="use this byte-level model directory instead of training one")
    parser.add_argument("--run", default=None, help="use this `fp8train train` run (its model and corpus split)")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "export-bench"))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export-quality-cpu"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    training: dict = {}
    if args.run:
        from fp8train.export.io import open_source

        source = open_source(args.run)
        model = source.load_model()
        train_ids, eval_ids = source.corpus_split()
        args.seq_len = source.train["seq_len"]
        training = {"steps": source.train["steps"], "batch": source.train["batch_size"],
                    "seq_len": source.train["seq_len"], "recipe": source.train["recipe"],
                    "source": f"`fp8train train` run {args.run} ({source.weights.parent.name})"}
        corpus_note = (f"the run's corpus split ({train_ids.numel():,} train / {eval_ids.numel():,} eval BPE tokens, "
                       f"vocabulary {model.config.vocab_size})")
    else:
        train_files, eval_files = stdlib_split()
        train_ids, eval_ids = read_bytes(train_files), read_bytes(eval_files)
        print(f"corpus: {len(train_files)} train files ({train_ids.numel():,} bytes), "
              f"{len(eval_files)} eval files ({eval_ids.numel():,} bytes)")
        model_dir = pathlib.Path(args.model) if args.model else pathlib.Path(args.run_dir) / "model"
        if not (model_dir / "config.json").is_file():
            train_model(model_dir, train_ids, args)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if (model_dir / "training.json").is_file():
            training = json.loads((model_dir / "training.json").read_text())
            training["recipe"] = "fp32 (this script)"
            training["source"] = "this script"
            args.seq_len = training.get("seq_len", args.seq_len)
        corpus_note = (f"the .py files of the Python {sys.version.split()[0]} standard library as UTF-8 bytes "
                       f"(held-out: the 5% of files whose path CRC falls below 5)")
    tokens = token_windows(eval_ids, args.seq_len, args.eval_windows)
    calibration = token_windows(train_ids, args.seq_len, args.calibration_samples, seed=0)

    rows = quality.compare(model, tokens, calibration=calibration)
    activation_rows = quality.activation_error_table(model, tokens[:8])

    # every exportable format goes through the disk and the compressed-tensors reader once
    checks = []
    export_root = pathlib.Path(args.run_dir) / "exports"
    for fmt, options in (("fp8-dynamic", {}), ("w8a8-int8", {"smoothquant": 0.8}), ("w4a16", {}),
                         ("w4a8-fp", {"lorc_rank": 8})):
        info = export(model, export_root / fmt, fmt, calibration=calibration, overwrite=True, **options)
        from_disk = quality.evaluate(export_root / fmt, tokens)
        ct = _compressed_tensors_weights_match(export_root / fmt, info)
        size = sum(f.stat().st_size for f in (export_root / fmt).glob("*.safetensors"))
        kept = sorted(n for n in info["skipped"] if n not in ("lm_head",))
        checks.append({"format": fmt, "options": options, "perplexity_from_disk": from_disk["perplexity"],
                       "compressed_tensors_weights_equal": ct, "safetensors_bytes": size, "kept_bf16": kept})
        print(f"{fmt}: from disk ppl {from_disk['perplexity']:.4f}, compressed-tensors weights equal: {ct}, "
              f"{size / 1e6:.2f} MB", flush=True)

    by_label = {r["label"]: r for r in rows}

    def delta(label):
        return by_label[label]["delta_vs_bf16"] if label in by_label else float("nan")

    def kl(label):
        return by_label[label].get("kl_vs_reference", float("nan")) if label in by_label else float("nan")

    goals = [
        ("fp8-dynamic within 0.5% of bf16 perplexity", delta("fp8-dynamic") <= 0.005,
         f"{100 * delta('fp8-dynamic'):+.2f}%"),
        ("w4a16 GPTQ within 3% of bf16 perplexity", delta("w4a16 (GPTQ)") <= 0.03, f"{100 * delta('w4a16 (GPTQ)'):+.2f}%"),
        ("w4a16 GPTQ better than round-to-nearest: KL to bf16", kl("w4a16 (GPTQ)") < kl("w4a16 (RTN)"),
         f"GPTQ {kl('w4a16 (GPTQ)'):.2e} vs RTN {kl('w4a16 (RTN)'):.2e} nats/token"),
        ("w4a16 GPTQ better than round-to-nearest: perplexity", delta("w4a16 (GPTQ)") < delta("w4a16 (RTN)"),
         f"GPTQ {100 * delta('w4a16 (GPTQ)'):+.2f}% vs RTN {100 * delta('w4a16 (RTN)'):+.2f}%"),
    ]
    size_note = ", ".join(f"{c['format']} {c['safetensors_bytes'] / 1e6:.2f} MB" for c in checks)
    n_params = sum(p.numel() for p in model.parameters())
    setup = (f"Model: LlamaForCausalLM, {n_params / 1e6:.2f} M parameters (hidden {model.config.hidden_size}, "
             f"{model.config.num_hidden_layers} layers, intermediate {model.config.intermediate_size}, vocabulary "
             f"{model.config.vocab_size}), trained {training.get('steps', '?')} steps of "
             f"{training.get('batch', '?')}x{training.get('seq_len', '?')} tokens, recipe "
             f"{training.get('recipe', '?')}, by {training.get('source', '?')}.  Data: {corpus_note}.  "
             f"Evaluation: {tokens.numel():,} tokens ({tokens.shape[0]} windows of {tokens.shape[1]}) of the "
             f"held-out split.  Calibration: {args.calibration_samples} random windows of {args.seq_len} tokens "
             f"from the training split.  CPU, float32 arithmetic; quantized layers simulated exactly as the "
             f"runtime computes them (dequantized weights, per-token fake-quantized activations).  Checkpoint "
             f"sizes: {size_note}.")
    command = "python benchmarks/export_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = quality.report_markdown(rows, title="Export quality: bf16 vs every format", command=command.strip(),
                                   setup=setup, activation_rows=activation_rows, goals=goals)
    text += "\n## Written checkpoints read back\n\nEach exportable format written to disk, read back by fp8train's loader " \
            "(perplexity) and by compressed-tensors through transformers (every decompressed weight compared with " \
            "fp8train's dequantization).  lm_head and the embeddings stay bf16 in every format.\n\n" \
            "| format | options | perplexity from disk | compressed-tensors weights equal ours | safetensors size | " \
            "linear layers kept in bf16 |\n|---|---|---|---|---|---|\n"
    for c in checks:
        kept = ", ".join(c["kept_bf16"]) or "none"
        text += (f"| {c['format']} | {c['options'] or ''} | {c['perplexity_from_disk']:.4f} | "
                 f"{c['compressed_tensors_weights_equal']} | {c['safetensors_bytes'] / 1e6:.2f} MB | {kept} |\n")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "activation_errors": activation_rows,
                                                    "checks": checks, "goals": goals, "setup": setup}, indent=2))
    print(text)
    return 0


def _compressed_tensors_weights_match(path: pathlib.Path, info: dict) -> bool:
    """Load with transformers + compressed-tensors and compare every quantized weight with our dequantization."""
    from transformers import AutoModelForCausalLM

    from fp8train.export.checkpoint import decode_module, read_checkpoint, scheme_from_config_group

    ct_model = AutoModelForCausalLM.from_pretrained(path)
    ct_model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # compressed-tensors decompresses on first forward
    config, tensors = read_checkpoint(path)
    scheme = scheme_from_config_group(config["quantization_config"]["config_groups"]["group_0"])
    modules = dict(ct_model.named_modules())
    for name in info["layers"]:
        ours = decode_module(tensors, name, scheme).dequantize(torch.bfloat16, lorc=False)
        if not torch.equal(modules[name].weight.detach(), ours):
            return False
    return True


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
