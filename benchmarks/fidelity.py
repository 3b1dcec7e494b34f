"""Loss parity of the FP8 set-ups with bf16 on the default corpus (GPU): the same `fp8train train` run per set-up.

    python benchmarks/fidelity.py --out $OUT                      # ~4 min on an H100/H200
    python benchmarks/fidelity.py --out /tmp/f --model micro --steps 20 --device cpu   # smoke test

Set-ups, same seed, data, data order and steps: bf16 (fp32 master weights, torch AdamW), coat (FP8 linears and
activations, fp32 master weights, fp8train.AdamW), coat-lean with bf16 master weights (stochastic rounding,
chunked loss), and the same coat-lean run replayed as a CUDA graph (`--cuda-graph`), which must train like its
eager twin.  Writes <out>/<date>-<gpu>-fidelity.json and .md: final eval loss, gap to bf16, tokens/s, peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys
import time

SETUPS = {
    "bf16": ["--recipe", "bf16"],
    "coat": ["--recipe", "coat"],
    "coat-lean (bf16 master weights)": ["--recipe", "coat-lean", "--master-weights", "bf16"],
    "coat-lean (bf16 master weights), CUDA graph": ["--recipe", "coat-lean", "--master-weights", "bf16",
                                                    "--cuda-graph"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    common = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--device", args.device, "--eval-batches", "32",
              "--checkpoint-every", "-1", "--cache-dir", str(out / "cache"), "--overwrite"]
    rows = []
    for name, flags in SETUPS.items():
        if "--cuda-graph" in flags and args.device != "cuda":
            continue
        run_dir = out / "runs" / name.split()[0].replace("-", "_") / ("graph" if "--cuda-graph" in flags else "eager")
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "fp8train", "train", *common, *flags, "--out", str(run_dir)],
                              capture_output=True, text=True)
        summary_path = run_dir / "summary.json"
        if proc.returncode != 0 or not summary_path.exists():
            rows.append({"setup": name, "status": "error", "error": (proc.stderr or proc.stdout)[-800:]})
            print(f"{name}: error\n{(proc.stderr or proc.stdout)[-800:]}", flush=True)
            continue
        s = json.loads(summary_path.read_text())
        rows.append({"setup": name, "status": "ok", "final_eval_loss": s["final_eval_loss"],
                     "tokens_per_s": s.get("tokens_per_s"), "peak_memory_bytes": s.get("peak_memory_bytes"),
                     "seconds": round(time.time() - started, 1)})
        print(f"{name}: eval loss {s['final_eval_loss']:.4f}, {s.get('tokens_per_s') or 0:,.0f} tokens/s", flush=True)
    base = next((r for r in rows if r["setup"] == "bf16" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["gap_percent"] = round(100 * (r["final_eval_loss"] - base["final_eval_loss"]) / base["final_eval_loss"], 3)
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"command": "python benchmarks/fidelity.py " + " ".join(argv or sys.argv[1:]), "device": device,
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "config": vars(args),
              "rows": rows}
    stem = f"{result['date']}-{device.split()[-1].lower()}-fidelity"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Loss parity with bf16 (`{result['command']}`)", "",
             f"{device}, torch {result['torch']}, {result['date']}: `fp8train train --model {args.model} --steps "
             f"{args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len}` on the default corpus (this "
             "Python's standard library), same seed and data order per set-up; eval on 32 held-out batches.", "",
             "| set-up | final eval loss | gap vs bf16 | tokens/s | peak GB |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['setup']} | error | | | |")
            continue
        lines.append(f"| {r['setup']} | {r['final_eval_loss']:.4f} | {r.get('gap_percent', 0):+.3f} % | "
                     f"{r['tokens_per_s'] or 0:,.0f} | {(r['peak_memory_bytes'] or 0) / 1e9:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
