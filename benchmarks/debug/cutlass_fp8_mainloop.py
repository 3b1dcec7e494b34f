"""Can a CUTLASS FP8 GEMM built here match cuBLAS?  A probe for the fused gated GEMMs (docs/performance.md,
"Session 10"): Triton 3.6's promoted FP8 main loop runs at ~2/3 of cuBLAS, so the next candidate is CUTLASS 3's
sm90 warp-specialized kernels, whose epilogue can be replaced by the gated product.

    python benchmarks/debug/cutlass_fp8_mainloop.py --cutlass /path/to/nvidia_cutlass-4.2.0.0-py3-none-any.whl

The wheel (PyPI ``nvidia-cutlass``, 6.4 MB) carries CUTLASS's C++ headers; the kernels in ``cutlass_fp8/`` are
compiled with the machine's nvcc through torch.utils.cpp_extension (sm_90a).  Times each variant against
torch._scaled_mm on the 953M model's gate+up shape and compares their outputs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import zipfile

import torch
import triton.testing

HERE = pathlib.Path(__file__).resolve().parent
VARIANTS = ("cooperative", "cooperative_stages5", "cooperative_128x256x64", "cooperative_128x192x128",
            "cooperative_fast_accum", "pingpong", "pingpong_64x256x128")


def build(wheel: str, build_dir: str):
    from torch.utils.cpp_extension import load

    root = pathlib.Path(build_dir)
    headers = root / "cutlass"
    if not headers.exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(headers)
    source = headers / "cutlass_library" / "source"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    start = time.time()
    module = load(name="cutlass_fp8_probe", sources=[str(HERE / "cutlass_fp8" / f) for f in
                                                     ("bindings.cpp", *(f"{v}.cu" for v in VARIANTS))],
                  extra_include_paths=[str(source / "include"), str(source / "tools" / "util" / "include")],
                  extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG",
                                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"],
                  build_directory=str(root), verbose=False)
    print(f"built in {time.time() - start:.0f} s", flush=True)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cutlass", required=True, help="the nvidia-cutlass wheel (its C++ headers)")
    parser.add_argument("--build-dir", default="/tmp/cutlass_fp8_build")
    args = parser.parse_args()
    os.makedirs(args.build_dir, exist_ok=True)
    module = build(args.cutlass, args.build_dir)
    print(torch.cuda.get_device_name(), torch.__version__, torch.version.cuda, flush=True)
    for M, K, N in ((8192, 2048, 11264), (32768, 2048, 11264), (8192, 2048, 2048)):
        a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        flops = 2 * M * K * N

        def cublas():
            return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

        ref = cublas().float()
        ms = triton.testing.do_bench(cublas, return_mode="median")
        print(f"{M}x{K}->{N} _scaled_mm: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        for name in VARIANTS:
            fn = getattr(module, name)
            try:
                got = fn(a, b, 1.0).float()
                same = float((got == ref).float().mean())
                err = float(((got - ref).abs() / ref.abs().clamp_min(1)).max())
                ms = triton.testing.do_bench(lambda: fn(a, b, 1.0), return_mode="median")
                print(f"{M}x{K}->{N} cutlass {name}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s, "
                      f"identical to cuBLAS {same:.4f}, max rel err {err:.2e}", flush=True)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"{M}x{K}->{N} cutlass {name}: failed: {str(error)[:300]}", flush=True)


if __name__ == "__main__":
    main()
