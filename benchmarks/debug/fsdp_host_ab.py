"""Host time of an eager FSDP2 step with N decoder layers per FSDP unit, compared in one process (GPU aid).

    python benchmarks/debug/fsdp_host_ab.py --model 1b --units 1,2 --rounds 4 --out $OUT

A world of one process (FSDP2's hooks run, nothing is communicated), batch 1 x 128 tokens, where the GPU waits
for the host: wall time per step = host time per step.  One model per variant -- unsharded, and sharded with each
``--units`` value -- all in the same process; the variants' timings alternate round by round, so a slow spell of
the host hits each alike.  Prints (and with ``--out`` writes ``fsdp-host-ab.json``) the best and median ms/step.
``--device cpu`` smoke-tests the script (gloo, a tiny model).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="1b")
    p.add_argument("--recipe", default="coat")
    p.add_argument("--units", default="1,2", help="layers per FSDP unit, one variant each")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps timed per variant and round")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import torch

    import fp8train
    import fp8train.distributed as fd
    from fp8train.causal_masks import plain_causal_batches
    from gpu_multi import build_model

    device = fd.init_distributed(backend="gloo" if a.device == "cpu" else None)
    cuda = device.type == "cuda"
    model_name = a.model if cuda else "smoke"

    def variant(units):
        model = fp8train.convert(build_model(model_name, "fp32", device), recipe=a.recipe)
        if units:
            fd.shard_model(model, param_dtype=torch.bfloat16 if cuda else None, layers_per_unit=units)
        opt = fp8train.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(device)

        def step():
            with plain_causal_batches(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        return step

    def sync():
        if cuda:
            torch.cuda.synchronize()

    names = ["unsharded"] + [f"{int(u)} layer(s) per unit" for u in a.units.split(",")]
    steps = [variant(0)] + [variant(int(u)) for u in a.units.split(",")]
    times: dict[str, list] = {n: [] for n in names}
    for _ in range(a.rounds):
        for name, step in zip(names, steps):
            sync()
            start = time.perf_counter()
            for _ in range(a.steps):
                step()
            sync()
            times[name].append(1000 * (time.perf_counter() - start) / a.steps)
    result = {"model": model_name, "recipe": a.recipe, "batch": a.batch, "seq": a.seq, "device": str(device),
              "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "ms_per_step": {n: {"runs": [round(t, 2) for t in ts], "best": round(min(ts), 2),
                                  "median": round(statistics.median(ts), 2)} for n, ts in times.items()}}
    print(json.dumps(result, indent=1), flush=True)
    if a.out:
        pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(a.out) / "fsdp-host-ab.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
