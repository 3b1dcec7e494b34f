"""Worker processes for tests/test_distributed.py: FSDP2 + fp8train.AdamW + DCP on CPU with gloo.

Every run trains a converted tiny Llama on the same global batch per step, made of ``MICRO`` fixed
micro-batches; a world of W ranks gives each rank ``MICRO / W`` of them (gradient accumulation), so every
world size computes the same per-micro-batch forward passes (same FP8 scales) and differs only in the order
gradients are summed.
"""

from __future__ import annotations

import json
import os
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


def build(world: int, recipe: str = "coat", shard: bool = True):
    import torch

    import fp8train
    import fp8train.distributed as fd

    model = fp8train.convert(tiny_llama(), recipe=recipe)
    if shard:
        fd.shard_model(model)
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


def scenario(rank: int, world: int, args: dict) -> dict:
    """What one process does; returns JSON-able results (rank 0's are written to ``args['out']``)."""
    import torch

    import fp8train.distributed as fd

    fd.init_distributed(backend="gloo")
    result: dict = {}
    if args["mode"] == "train_save":
        # steps 0..save_at-1, checkpoint, then on to stop; also the full state at the checkpoint
        model, opt, sched = build(world, shard=args.get("shard", True))
        losses = []
        for step in range(args["stop"]):
            if step == args["save_at"]:
                fd.save_checkpoint(args["ckpt"], model, opt, extra={"step": step, "scheduler": sched.state_dict()})
                state = full_state(model, opt)
                if rank == 0:
                    torch.save(state, args["reference"])
            losses.append(train_step(model, opt, sched, step, rank, world))
        result["losses"] = losses
        result["moment_dtypes"] = {n: str(opt.state[p]["exp_avg"].dtype) for n, p in model.named_parameters()}
        result["state_types"] = sorted({type(v).__name__ for s in opt.state.values() for k, v in s.items()
                                        if k != "step"})
    elif args["mode"] == "load_continue":
        model, opt, sched = build(world, shard=args.get("shard", True))
        extra = fd.load_checkpoint(args["ckpt"], model, opt)
        sched.load_state_dict(extra["scheduler"])
        state = full_state(model, opt)
        if rank == 0:
            torch.save(state, args["state_out"])
        result["losses"] = [train_step(model, opt, sched, step, rank, world)
                            for step in range(extra["step"], args["stop"])]
    return result


def _main(rank: int, world: int, port: int, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = scenario(rank, world, args)
    except Exception:
        result = {"error": traceback.format_exc()}
    if rank == 0 or "error" in result:
        with open(f"{args['out']}.{rank}", "w") as f:
            json.dump(result, f)
    import torch.distributed as dist

    if dist.is_initialized() and "error" not in result:
        dist.destroy_process_group()


def launch(world: int, args: dict, timeout: float = 240.0) -> dict:
    """Run ``scenario`` on ``world`` gloo processes; returns rank 0's result (raises a rank's traceback)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_main, args=(world, port, args), nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.time() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"distributed test workers did not finish in {timeout} s")
    for r in range(world):
        path = f"{args['out']}.{r}"
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            if "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    with open(f"{args['out']}.0") as f:
        return json.load(f)


if __name__ == "__main__":
    print(json.dumps(launch(int(sys.argv[1]), json.loads(sys.argv[2]))))
