"""Worker processes for tests/test_distributed.py: FSDP2 + fp8train.AdamW + DCP on CPU with gloo.

Every run trains a converted tiny Llama on the same global batch per step, made of ``MICRO`` fixed
micro-batches; a world of W ranks gives each rank ``MICRO / W`` of them (gradient accumulation), so every
world size computes the same per-micro-batch forward passes (same FP8 scales) and differs only in the order
gradients are summed.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import traceback

MICRO = 4
BATCH, SEQ, VOCAB = 2, 32, 256


def tiny_llama():
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def micro_batch(step: int, index: int):
    """Learnable token rows: arithmetic progressions mod VOCAB with a random start and stride."""
    import torch

    g = torch.Generator().manual_seed(1000 * step + index)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 5, (BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def build(world: int, recipe: str = "coat", shard: bool = True, fused_qkv: bool = False, layers_per_unit: int = 1):
    import torch

    import fp8train
    import fp8train.distributed as fd

    model = fp8train.convert(tiny_llama(), recipe=fp8train.Recipe.named(recipe).replace(fused_qkv=fused_qkv))
    if shard:
        fd.shard_model(model, layers_per_unit=layers_per_unit)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = fp8train.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                         lr=3e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def train_step(model, opt, sched, step: int, rank: int, world: int) -> float:
    """One optimizer step on the global batch of ``step``; returns the global mean loss (same on every rank)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    per_rank = MICRO // world
    total = torch.zeros(())
    for i in range(per_rank):
        batch = micro_batch(step, rank * per_rank + i)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        (loss / per_rank).backward()
        total += loss.detach()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(total)
    return total.item() / MICRO


def full_state(model, opt) -> dict:
    """Every tensor of the model and the optimizer, unsharded, keyed by name (a collective).

    DTensors are gathered with FP8 data viewed as uint8: gloo has no float8 types."""
    from fp8train.optim.adamw import _as_bytes, is_dtensor

    def full(t):
        return _as_bytes(t, lambda v: v.full_tensor()) if is_dtensor(t) else t

    out = {f"model.{k}": full(v).detach().clone() for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, entries in opt.state.items():
        out.update({f"optim.{names[p]}.{k}": full(v).clone() for k, v in entries.items()})
    return out


def run_task(rank: int, world: int, task: dict) -> dict:
    """One task in the worker processes; returns JSON-able results (rank 0's are kept).

    ``train_save``: train steps 0..stop-1 from scratch, checkpoint to ``ckpt`` before step ``save_at`` and write
    the full state at that point to ``state_out``.  ``load_continue``: build a fresh model, load ``ckpt``, write
    the loaded full state to ``state_out`` and train on to ``stop``.
    """
    import torch

    import fp8train.distributed as fd

    result: dict = {}
    model, opt, sched = build(world, shard=task.get("shard", True), fused_qkv=task.get("fused_qkv", False),
                              layers_per_unit=task.get("layers_per_unit", 1))
    first = 0
    if task["kind"] == "load_continue":
        extra = fd.load_checkpoint(task["ckpt"], model, opt)
        sched.load_state_dict(extra["scheduler"])
        first = extra["step"]
    losses = []
    for step in range(first, task["stop"]):
        if step == first and task["kind"] == "load_continue" or step == task.get("save_at"):
            if task["kind"] == "train_save":
                fd.save_checkpoint(task["ckpt"], model, opt, extra={"step": step, "scheduler": sched.state_dict()})
            state = full_state(model, opt)
            if rank == 0:
                torch.save(state, task["state_out"])
        losses.append(train_step(model, opt, sched, step, rank, world))
    result["losses"] = losses
    result["moment_dtypes"] = {n: str(opt.state[p]["exp_avg"].dtype) for n, p in model.named_parameters()}
    result["state_types"] = sorted({type(v).__name__ for s in opt.state.values() for k, v in s.items()
                                    if k != "step"})
    from torch.distributed.fsdp import FSDPModule

    result["fsdp_units"] = sorted(name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule))
    return result


def _main(rank: int, world: int, port: int, tasks: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    import fp8train.distributed as fd

    torch.set_num_threads(1)
    try:
        fd.init_distributed(backend="gloo")
        results = [run_task(rank, world, task) for task in tasks]
    except Exception:
        results = {"error": traceback.format_exc()}
    if rank == 0 or "error" in results:
        with open(f"{out}.{rank}", "w") as f:
            json.dump(results, f)
    if dist.is_initialized() and "error" not in results:
        dist.destroy_process_group()


def launch(world: int, tasks: list, out: str, timeout: float = 300.0) -> list:
    """Run ``tasks`` in order on ``world`` gloo processes; returns rank 0's results (raises a rank's traceback).

    Called in a fresh interpreter (``python distributed_worker.py``): the workers are forked from it after the
    heavy imports, so torch and transformers load once, not once per rank.
    """
    import socket
    import time

    import torch.multiprocessing as mp
    import transformers  # noqa: F401  (imported once, before forking)

    import fp8train.distributed  # noqa: F401

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_main, args=(world, port, tasks, out), nprocs=world, join=False, start_method="fork")
    deadline = time.time() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"distributed test workers did not finish in {timeout} s")
    for r in range(world):
        if os.path.exists(f"{out}.{r}"):
            with open(f"{out}.{r}") as f:
                res = json.load(f)
            if "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    with open(f"{out}.0") as f:
        return json.load(f)


def run(world: int, tasks: list, out: str, timeout: float = 300.0) -> list:
    """``launch`` in a fresh ``python`` process (what the tests call)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(world), json.dumps(tasks), out], env=env,
                          capture_output=True, text=True, timeout=timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed workers failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    with open(f"{out}.0") as f:
        return json.load(f)


if __name__ == "__main__":
    launch(int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])
