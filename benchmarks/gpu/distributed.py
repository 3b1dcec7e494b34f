"""GPU check of fp8train.AdamW on sharded (DTensor) parameters: the Triton kernel on local shards against the
torch reference (run by benchmarks/gpu_suite.py on 1 GPU, and by benchmarks/gpu_multi.py on 2; ~30 s).

Every rank holds ``Shard(0)`` pieces of parameters of awkward shapes (uneven row counts, last dims that are not
multiples of 128, 1-D parameters -- which keep float32 moments when sharded); two optimizers, ``fused=True``
(kernel) and ``fused=False`` (reference), take 20 steps on identical gradients.  Checks: the kernel ran on every
non-empty shard, states are DTensors placed like their parameters, parameters within the tolerances of
benchmarks/gpu/optim.py (1e-3 relative L2 for DRE, whose exp2/log2 flip a few codes per step) and moments within
5 %.  Run alone: ``torchrun --nproc-per-node 2 benchmarks/gpu/distributed.py --worker``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPES = [(1001, 4096), (64, 130), (4096,), (5000,), (3, 200), (7, 2048)]
STEPS = int(os.environ.get("FP8TRAIN_CHECK_STEPS", 20))  # a CPU dry run (TRITON_INTERPRET=1) takes 1 or 2


def worker() -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fp8train.distributed as fd
    from fp8train.optim import AdamW
    from fp8train.optim import moment_storage as storage
    from fp8train.optim.adamw import is_dtensor, local_view, storage_mode

    device = fd.init_distributed()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    full = [torch.randn(s, generator=gen) for s in SHAPES]

    def sharded(t):
        return torch.nn.Parameter(distribute_tensor(t.to(device), mesh, [Shard(0)]))

    kernel_params, ref_params = [sharded(t) for t in full], [sharded(t) for t in full]
    options = dict(lr=1e-3, weight_decay=0.01)
    kernel, ref = AdamW(kernel_params, fused=True, **options), AdamW(ref_params, fused=False, **options)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + step)
        for p, q in zip(kernel_params, ref_params):
            scale = 10.0 ** torch.randint(-3, 2, p.shape, generator=g)
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad = distribute_tensor(grad.to(device), mesh, [Shard(0)])
            q.grad = distribute_tensor(grad.to(device), mesh, [Shard(0)])
        kernel.step()
        ref.step()
    used_kernel = all(kernel._use_kernel(local_view(p), local_view(p.grad)) for p in kernel_params
                      if local_view(p).numel())

    def summed(values):  # [diff^2, ref^2] over this rank's shards, summed over ranks
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    param_err, moment_err, placements_ok = 0.0, 0.0, True
    for p, q in zip(kernel_params, ref_params):
        a, b = local_view(p).double(), local_view(q).double()
        d, n = summed([(a - b).square().sum().item(), b.square().sum().item()])
        param_err = max(param_err, (d / max(n, 1e-60)) ** 0.5)
        mode = storage_mode(p, "dre")
        for name in storage.MOMENT_NAMES:
            ks = {k: local_view(v) for k, v in kernel.state[p].items()}
            rs = {k: local_view(v) for k, v in ref.state[q].items()}
            x = storage.decode(ks, name, mode, "e4m3", 128).double()
            y = storage.decode(rs, name, mode, "e4m3", 128).double()
            d, n = summed([(x - y).square().sum().item(), y.square().sum().item()])
            moment_err = max(moment_err, (d / max(n, 1e-60)) ** 0.5)
        for key, value in kernel.state[p].items():
            if key != "step":
                placements_ok &= is_dtensor(value) and tuple(value.placements) == tuple(p.placements)
        placements_ok &= (kernel.state[p]["exp_avg"].dtype == torch.float32) == (p.dim() == 1)
    ok_flags = summed([float(used_kernel), float(placements_ok)])
    world = dist.get_world_size()
    return {"world_size": world, "param_rel_err": param_err, "moment_rel_err": moment_err,
            "kernel_on_all_shards": ok_flags[0] == world, "placements_ok": ok_flags[1] == world}


def launch(nproc: int, timeout: float = 240.0) -> dict:
    """Run the check on ``nproc`` GPUs (torchrun, own process group, killed whole on timeout)."""
    from gpu_multi import NCCL_ENV, run_group  # benchmarks/ is on the path (gpu_suite.py, gpu_multi.py)

    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker"]
    try:
        _, out, err = run_group(cmd, timeout, env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    for line in out.splitlines():
        if line.startswith("SHARDED_CHECK "):
            return json.loads(line[len("SHARDED_CHECK "):])
    return {"error": (err + out)[-2000:]}


def verdict(result: dict) -> bool:
    return ("error" not in result and result["kernel_on_all_shards"] and result["placements_ok"]
            and result["param_rel_err"] < 1e-3 and result["moment_rel_err"] < 0.05)


def run(report) -> None:
    import torch

    nproc = min(2, torch.cuda.device_count())
    result = launch(nproc)
    report.check(f"distributed/adamw-kernel-on-shards-{nproc}gpu", verdict(result), **result)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        import torch.distributed as dist

        result = worker()
        if dist.get_rank() == 0:
            print("SHARDED_CHECK " + json.dumps(result), flush=True)
        dist.destroy_process_group()
    else:
        print(json.dumps(launch(int(sys.argv[1]) if len(sys.argv) > 1 else 1)))
