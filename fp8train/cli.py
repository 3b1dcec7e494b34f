"""The ``fp8train`` command line.  Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys


def _smoke(args: argparse.Namespace) -> int:
    """A short run of the library: quantize a tensor at every granularity and report the error."""
    import torch

    from . import formats, quant

    torch.manual_seed(0)
    x = torch.randn(256, 512) * torch.exp(torch.randn(256, 512))
    print(f"{'format':8} {'granularity':12} {'rel. error':>10} {'bytes/elem':>10}")
    for fmt in (formats.E4M3, formats.E5M2, formats.INT8):
        for gran in ("tensor", "row", "1x16", "1x128", "128x128"):
            q = quant.quantize(x, fmt, gran)
            err = ((q.dequantize() - x).norm() / x.norm()).item()
            print(f"{fmt.name:8} {gran:12} {err:10.2e} {q.nbytes / x.numel():10.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8train", description="Memory-efficient FP8 training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help="quick check that the library works on this machine")
    smoke.set_defaults(func=_smoke)
    from . import bench, export
    from .lab.sweep import register as register_sweep
    from .train.cli import register as register_train

    register_train(sub)
    bench.register(sub)
    export.register(sub)
    register_sweep(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
