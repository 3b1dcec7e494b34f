"""One device call: check every GPU kernel against its torch reference, then run the benchmarks.

    python benchmarks/gpu_suite.py --out $OUT [--only optim,ops] [--skip e2e]

Each area lives in ``benchmarks/gpu/<area>.py`` and exposes ``run(report) -> None``; it appends rows to
``report.checks`` (name, ok, detail) and ``report.bench`` (free-form dicts with a ``name``).  A failing area is
recorded with its traceback and the suite goes on.  Results: ``<out>/<date>-<gpu>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

AREAS = ["quant", "ops", "gated_gemm", "plans", "linear", "optim", "distributed", "rotary", "layer", "levers", "host", "export", "lab", "train",
         "e2e"]


class Report:
    def __init__(self):
        self.checks: list[dict] = []
        self.bench: list[dict] = []
        self.end_to_end: list[dict] = []
        self.errors: list[dict] = []

    def check(self, name: str, ok: bool, **detail):
        self.checks.append({"name": name, "ok": bool(ok), **detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail if detail else ''}", flush=True)

    def add_bench(self, name: str, **values):
        self.bench.append({"name": name, **values})
        print(f"[bench] {name} {values}", flush=True)


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "date": _dt.date.today().isoformat(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        info["triton"] = None
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--only", default="")
    parser.add_argument("--skip", default="")
    args = parser.parse_args(argv)
    areas = [a for a in (args.only.split(",") if args.only else AREAS) if a and a not in args.skip.split(",")]
    report = Report()
    env = environment()
    print(env, flush=True)
    timings = {}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fp8train.bench import gpu_slug

    stem = out / f"{env['date']}-{gpu_slug(env['gpu'])}"
    # `fp8train bench --out` earlier in the same call writes end-to-end rows to the same file: keep them
    earlier = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    earlier_rows = earlier.get("end_to_end", []) if isinstance(earlier, dict) else []

    def write_results():  # after every area, so a run cut short by its time limit still leaves its results
        result = {**env, "areas_seconds": timings, "checks": report.checks, "bench": report.bench,
                  "end_to_end": earlier_rows + report.end_to_end, "errors": report.errors}
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(to_markdown(result))

    for area in areas:
        start = time.time()
        try:
            module = importlib.import_module(f"gpu.{area}")
            module.run(report)
        except Exception as exc:  # noqa: BLE001 - record and continue with the next area
            report.errors.append({"area": area, "error": repr(exc), "traceback": traceback.format_exc()})
            print(f"[ERROR] {area}: {exc!r}\n{traceback.format_exc()}", flush=True)
        timings[area] = round(time.time() - start, 1)
        print(f"[area] {area} took {timings[area]} s", flush=True)
        write_results()
    failed = [c["name"] for c in report.checks if not c["ok"]]
    print(f"\nchecks: {len(report.checks) - len(failed)} passed, {len(failed)} failed; errors: {len(report.errors)}")
    for name in failed:
        print("  FAILED", name)
    return 0


def to_markdown(result: dict) -> str:
    lines = [f"# GPU results {result['date']} on {result['gpu']}",
             f"torch {result['torch']}, CUDA {result['cuda']}, triton {result['triton']}", ""]
    if result["end_to_end"]:
        lines += ["## End to end", "", "| name | batch | seq | tokens/s | peak GB |", "|---|---|---|---|---|"]
        for row in result["end_to_end"]:
            lines.append(f"| {row['name']} | {row['batch']} | {row['seq']} | {row['tokens_per_s']:,.0f} | "
                         f"{row['peak_memory_bytes'] / 1e9:.2f} |")
        lines.append("")
    lines += ["## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    for c in result["checks"]:
        detail = {k: v for k, v in c.items() if k not in ("name", "ok")}
        lines.append(f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {detail} |")
    lines += ["", "## Benchmarks", ""]
    for b in result["bench"]:
        lines.append(f"- {b['name']}: " + ", ".join(f"{k}={v}" for k, v in b.items() if k != "name"))
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['area']}: {e['error']}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
