"""End-to-end rows for the suite: `fp8train bench` on the 953M Llama (and optionally 7B shapes).

Environment knobs (so one device call can choose what to spend its minutes on):
    E2E_CONFIGS   comma-separated configuration names (default: fp8train.bench.DEFAULT_CONFIGS)
    E2E_MODEL     model shape (default 1b), E2E_BATCH (4), E2E_SEQ (2048), E2E_STEPS (8)
    E2E_EXTRA     extra runs as name:model:batch[:master] separated by commas, e.g. fp8train_coat:7b:2:bf16
"""

import argparse
import os

from fp8train import bench


def _args(**overrides):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def run(report):
    args = _args(model=os.environ.get("E2E_MODEL", "1b"), batch=int(os.environ.get("E2E_BATCH", 4)),
                 seq=int(os.environ.get("E2E_SEQ", 2048)), steps=int(os.environ.get("E2E_STEPS", 8)),
                 configs=os.environ.get("E2E_CONFIGS", ",".join(bench.DEFAULT_CONFIGS)))
    for row in bench.bench(args):
        report.end_to_end.append(row)
    for spec in filter(None, os.environ.get("E2E_EXTRA", "").split(",")):
        name, model, batch, *rest = spec.split(":")
        extra = _args(model=model, batch=int(batch), seq=args.seq, steps=4, warmup=2, configs=name,
                      master=rest[0] if rest else "fp32")
        for row in bench.bench(extra):
            report.end_to_end.append(row)
