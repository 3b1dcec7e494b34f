"""Multi-GPU benchmark (one device call on 2 H100s, < 10 minutes): FSDP2 bf16 vs coat, 1 -> 2 GPU scaling.

    python benchmarks/gpu_multi.py --out $OUT                 # everything, within --budget seconds (default 540)
    python benchmarks/gpu_multi.py --only coat-7b-2gpu,dcp   # a subset
    python benchmarks/gpu_multi.py --only coat-1b-1gpu-b8,coat-1b-2gpu-b8 --profile $OUT   # + rank-0 kernel tables
    python benchmarks/gpu_multi.py --only coat-1b-1gpu,coat-1b-2gpu --repeat 3 --layers-per-unit 2   # medians
    python benchmarks/gpu_multi.py --only graph,coat-1b-1gpu,coat-1b-2gpu --cuda-graph --repeat 2  # steps as CUDA graphs

Every configuration runs in its own ``torchrun --standalone --nproc-per-node N`` subprocess with a timeout, so an
out-of-memory run (or a hang) becomes a status row and the next one starts on clean GPUs.  Each rank trains a
Llama-shaped model (random init, random tokens) sharded with ``fp8train.distributed.shard_model`` (FSDP2 per
decoder layer, bf16 all-gathers, fp32 reduce-scatter) under bf16 autocast:

* ``bf16-*``: no conversion + ``torch.optim.AdamW(fused=True)`` (the baseline; its moments take the master
  weights' dtype, so bf16 ones with bf16 masters);
* ``coat-*``: ``fp8train.convert(recipe="coat")`` + ``fp8train.AdamW`` (FP8 moments, DRE);
* ``coat-lean-*``: ``recipe="coat-lean"`` with bf16 master weights (``fp8train.AdamW(master_weights=
  "bf16_stochastic")``; the recipe's FP8 weight cache does nothing under FSDP2).

Shapes (fp8train.bench.MODEL_SHAPES): 953M (``1b``, fp32 master weights, batch 4 x 2048 per GPU), Llama-2-7B
(``7b``, bf16 master weights -- with fp32 ones the bf16 baseline cannot hold weights + grads + states on one
GPU -- batch 2 x 2048 per GPU), Llama-2-13B (``13b``, bf16 master, batch 1 x 2048 per GPU, 2 GPUs; COAT's paper
needed sequence 1024 there).  The batch per GPU is fixed, so 1 -> 2 GPUs is weak scaling: efficiency =
tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU).

``kernel``: benchmarks/gpu/distributed.py on 2 GPUs -- fp8train.AdamW's Triton kernel on FSDP-style shards
(uneven rows, 1-D parameters) against the torch reference.

``train``: ``fp8train train --nproc 2 --recipe coat --delayed-scaling --cuda-graph`` (tiny preset, stdlib data)
stopped half-way, then resumed with ``--resume --nproc 1``: the trainer's NCCL path, FSDP2 steps replayed as CUDA
graphs and the distributed checkpoints (scale predictions included) on the GPU.

``graph``: a tiny coat model with delayed scaling, 2 GPUs: 4 steps eager FSDP2, then 4 steps from the same weights
with forward + backward replayed as a CUDA graph (``--cuda-graph`` for the benchmark rows), evaluating a fixed batch
after steps 2 and 4; the training and evaluation losses must match.

``dcp``: a tiny coat model trains 2 steps on 2 GPUs, checkpoints (torch.distributed.checkpoint), trains 2 more;
1 GPU loads the checkpoint, compares every weight and FP8 optimizer state with the 2-GPU state bit for bit and
trains the same 2 steps: the losses must match (CUDA + NCCL + the Triton AdamW kernel on local shards).

CPU smoke test of this script (gloo, tiny shapes): ``python benchmarks/gpu_multi.py --device cpu``; the ``kernel``
check then needs ``TRITON_INTERPRET=1 FP8TRAIN_CHECK_STEPS=1`` (Triton's CPU interpreter).

Output: ``<out>/<date>-<gpu>-multi.json`` (gpu, torch, triton, cuda, date, rows, scaling, checks) and ``.md``.
NCCL: NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
EXTRA_SHAPES = {"smoke": (64, 2, 4, 160, 512)}  # CPU smoke test of this script (--device cpu)

# name: (recipe, model, gpus, batch per gpu, seq, master dtype, timeout s[, gradient reduce-scatter dtype,
# float32 when absent]) -- in priority order
CONFIGS = {
    "kernel": None,
    "dcp": None,
    "coat-13b-2gpu": ("coat", "13b", 2, 1, 2048, "bf16", 150),
    "coat-7b-1gpu": ("coat", "7b", 1, 2, 2048, "bf16", 110),
    "coat-7b-2gpu": ("coat", "7b", 2, 2, 2048, "bf16", 110),
    "bf16-7b-1gpu": ("bf16", "7b", 1, 2, 2048, "bf16", 110),
    "bf16-7b-2gpu": ("bf16", "7b", 2, 2, 2048, "bf16", 110),
    "coat-1b-1gpu-b8": ("coat", "1b", 1, 8, 2048, "fp32", 80),
    "coat-1b-2gpu-b8": ("coat", "1b", 2, 8, 2048, "fp32", 80),
    "coat-lean-1b-1gpu": ("coat-lean", "1b", 1, 4, 2048, "bf16", 80),
    "coat-lean-1b-2gpu": ("coat-lean", "1b", 2, 4, 2048, "bf16", 80),
    "graph": None,
    "coat-1b-1gpu": ("coat", "1b", 1, 4, 2048, "fp32", 80),
    "coat-1b-2gpu": ("coat", "1b", 2, 4, 2048, "fp32", 80),
    "bf16-1b-1gpu": ("bf16", "1b", 1, 4, 2048, "fp32", 80),
    "bf16-1b-2gpu": ("bf16", "1b", 2, 4, 2048, "fp32", 80),
    "bf16-13b-2gpu": ("bf16", "13b", 2, 1, 2048, "bf16", 150),
    # bf16 master weights get bf16 gradients: summing them in bf16 halves the reduce-scatter (and its fp32 packing)
    "coat-7b-1gpu-bf16-reduce": ("coat", "7b", 1, 2, 2048, "bf16", 110, "bf16"),
    "coat-7b-2gpu-bf16-reduce": ("coat", "7b", 2, 2, 2048, "bf16", 110, "bf16"),
    "train": None,
    "coat-13b-2gpu-fp32master": ("coat", "13b", 2, 1, 2048, "fp32", 150),
}
MIN_START_S = 40  # do not start a configuration with less budget left than this


# ----------------------------------------------------------------------------------------------------------
# worker side (one process per GPU, under torchrun)

def _shape(name: str) -> tuple:
    from fp8train.bench import MODEL_SHAPES

    return {**MODEL_SHAPES, **EXTRA_SHAPES}[name]


def build_model(shape: str, master: str, device):
    """A Llama of ``shape`` built directly in the master dtype on ``device``, the same weights on every rank."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, ffn, vocab = _shape(shape)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if master == "bf16" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def _local_bytes(tensors) -> int:
    from fp8train.optim.adamw import local_view

    return sum(local_view(t).numel() * t.dtype.itemsize for t in tensors if t is not None)


def _gather(value):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def worker_bench(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    import fp8train
    import fp8train.distributed as fd
    from fp8train.causal_masks import plain_causal_batches

    device = fd.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    cuda = device.type == "cuda"
    model = build_model(cfg["model"], cfg["master"], device)
    if cfg["recipe"] != "bf16":
        fp8train.convert(model, recipe=cfg["recipe"])
    reduce_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["reduce"]]
    fd.shard_model(model, param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=reduce_dtype,
                   layers_per_unit=cfg.get("layers_per_unit", 1))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["recipe"] == "bf16":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    else:
        stochastic = "bf16_stochastic" if cfg["master"] == "bf16" else None
        opt = fp8train.AdamW(params, lr=1e-4, master_weights=stochastic)
    batch, seq = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(1234 + rank)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    grad_bytes = 0

    graphed = None
    if cfg.get("cuda_graph"):  # forward + backward (all-gathers and reduce-scatters included) as one CUDA graph
        from fp8train.cuda_graphs import GraphedStep

        graphed = GraphedStep(model, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"],
                                                    use_cache=False).loss, {"input_ids": tokens})

    def step(measure_grads=False):
        nonlocal grad_bytes
        if graphed is not None:
            loss = graphed({"input_ids": tokens})
        else:
            # no position_ids passed: SDPA's causal kernel without transformers' host sync per forward
            with plain_causal_batches(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
        if measure_grads:
            grad_bytes = _local_bytes(p.grad for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for i in range(cfg["warmup"]):
        loss = step(measure_grads=i == 0)
    sync()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    if cfg.get("profile_dir"):  # one more step under the profiler; rank 0 writes its kernel table
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        if rank == 0:
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=45,
                                              max_name_column_width=60)
            folder = pathlib.Path(cfg["profile_dir"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"profile-{cfg['name']}.txt").write_text(table)
    state_bytes = _local_bytes(t for s in opt.state.values() for k, t in s.items() if k != "step")
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    reserved = torch.cuda.max_memory_reserved() if cuda else 0
    per_rank = _gather({"peak": peak, "reserved": reserved, "loss": float(loss)})
    tokens_total = world * batch * seq * cfg["steps"]
    return {"tokens_per_s": tokens_total / elapsed, "tokens_per_s_per_gpu": tokens_total / elapsed / world,
            "step_ms": 1000 * elapsed / cfg["steps"],
            "peak_memory_bytes": max(r["peak"] for r in per_rank),
            "peak_memory_bytes_per_gpu": [r["peak"] for r in per_rank],
            "reserved_memory_bytes": max(r["reserved"] for r in per_rank),
            "param_bytes_per_gpu": _local_bytes(params), "grad_bytes_per_gpu": grad_bytes,
            "optimizer_state_bytes_per_gpu": state_bytes, "final_loss": per_rank[0]["loss"]}


# -- DCP check: save on 2, load on 1 ------------------------------------------------------------------------

DCP_MICRO = 2  # micro-batches per step: 1 per rank on 2 GPUs, 2 accumulated on 1 GPU


def _dcp_setup(device, recipe="coat"):
    import torch

    import fp8train
    import fp8train.distributed as fd

    model = build_model("tiny" if device.type == "cuda" else "smoke", "fp32", device)
    fp8train.convert(model, recipe=recipe)
    fd.shard_model(model, param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = fp8train.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    return model, opt


def _dcp_step(model, opt, step: int, device) -> float:
    import torch
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = DCP_MICRO // world
    total = torch.zeros((), device=device)
    for i in range(per_rank):
        g = torch.Generator().manual_seed(100 * step + rank * per_rank + i)
        tokens = torch.randint(0, model.config.vocab_size, (2, 256), generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        (loss / per_rank).backward()
        total += loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dist.all_reduce(total)
    return total.item() / DCP_MICRO


def _full_state(model, opt) -> dict:
    from fp8train.optim.adamw import _as_bytes, is_dtensor

    def full(t):
        t = _as_bytes(t, lambda v: v.full_tensor()) if is_dtensor(t) else t
        return t.detach().cpu().clone()

    out = {f"model.{k}": full(v) for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, entries in opt.state.items():
        out.update({f"optim.{names[p]}.{k}": full(v) for k, v in entries.items()})
    return out


def worker_dcp(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    import fp8train.distributed as fd

    device = fd.init_distributed()
    model, opt = _dcp_setup(device)
    directory = pathlib.Path(cfg["dir"])
    if cfg["phase"] == "save":
        losses = []
        for step in range(4):
            if step == 2:
                fd.save_checkpoint(directory / "ckpt", model, opt, extra={"step": step})
                state = _full_state(model, opt)
                if dist.get_rank() == 0:
                    torch.save(state, directory / "reference.pt")
            losses.append(_dcp_step(model, opt, step, device))
        return {"losses": losses}
    extra = fd.load_checkpoint(directory / "ckpt", model, opt)
    state = _full_state(model, opt)
    reference = torch.load(directory / "reference.pt", weights_only=True)

    def bits(t):
        return t.view(torch.uint8) if t.dtype.itemsize == 1 else t

    mismatched = sorted(k for k in reference if k not in state or not torch.equal(bits(reference[k]), bits(state[k])))
    losses = [_dcp_step(model, opt, step, device) for step in range(extra["step"], 4)]
    return {"losses": losses, "mismatched": mismatched[:20], "n_mismatched": len(mismatched),
            "n_compared": len(reference)}


# -- CUDA-graph check: a captured FSDP2 step trains like the eager one --------------------------------------

def worker_graph(cfg: dict) -> dict:
    """Losses of 4 training steps of a tiny coat model on every rank, with an evaluation (no_grad forward of a
    fixed batch) after steps 2 and 4: eager FSDP2, then the same from the same weights with forward + backward
    replayed as a CUDA graph.  The second evaluation reads stale root weights unless the first one was followed
    by ``fp8train.distributed.reshard``."""
    import torch
    import torch.distributed as dist

    import fp8train
    import fp8train.distributed as fd
    from fp8train.cuda_graphs import GraphedStep

    device = fd.init_distributed()
    rank = dist.get_rank()
    tokens = [torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(10 * step + rank)).to(device)
              for step in range(4)]

    def loss_fn(m, b):
        return m(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss

    def mean_over_ranks(value: torch.Tensor) -> float:
        total = value.detach().clone()
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()

    def run(graph: bool) -> tuple:
        from fp8train.causal_masks import plain_causal_batches

        # delayed scaling on both sides (and act(gate) * up saved, so the forward predicts too): the capture's
        # warm-up must leave the scale predictions as it found them, or the graphed losses drift from the eager ones
        model, opt = _dcp_setup(device, fp8train.Recipe.named("coat").replace(delayed_scaling=True,
                                                                               recompute_gated_product=False))
        graphed = GraphedStep(model, loss_fn, {"input_ids": tokens[0]}) if graph else None
        if graphed is not None:  # the capture's warm-up steps left gradients: start from the same state
            opt.zero_grad(set_to_none=True)
        losses, evals = [], []
        for i, batch in enumerate(tokens):
            if graphed is not None:
                loss = graphed({"input_ids": batch})
            else:
                with plain_causal_batches(), torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn(model, {"input_ids": batch})
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(mean_over_ranks(loss))
            if i % 2 == 1:
                with torch.no_grad(), plain_causal_batches(), torch.autocast("cuda", dtype=torch.bfloat16):
                    evals.append(mean_over_ranks(loss_fn(model, {"input_ids": tokens[0]})))
                fd.reshard(model)
        return losses, evals

    (eager, eager_evals), (graph, graph_evals) = run(False), run(True)
    return {"eager": eager, "graph": graph, "eager_evals": eager_evals, "graph_evals": graph_evals}


def worker_main(cfg: dict) -> None:
    import torch.distributed as dist

    worker = {"dcp": worker_dcp, "graph": worker_graph}.get(cfg["kind"], worker_bench)
    result = worker(cfg)
    if dist.get_rank() == 0:
        print("MULTI_ROW " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# driver side

def run_group(cmd: list, timeout: float, env: dict) -> tuple:
    """``(returncode, stdout, stderr)`` of ``cmd`` run in its own process group; on timeout the group is stopped
    so no orphan keeps a GPU: SIGTERM first -- torchrun starts its workers in sessions of their own, out of the
    group's reach, and ends them itself on SIGTERM -- then SIGKILL.  Raises ``subprocess.TimeoutExpired``."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.communicate(timeout=grace)  # the workers hold the pipes open until they are gone
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    return proc.returncode, out, err


def launch(cfg: dict, nproc: int, timeout: float, device: str) -> dict:
    """One torchrun; returns rank 0's MULTI_ROW dict or {status: oom|error|timeout, error}."""
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    started = time.time()
    try:
        _, stdout, stderr = run_group(cmd, timeout, env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s", "wall_s": round(time.time() - started, 1)}
    for line in stdout.splitlines():
        if line.startswith("MULTI_ROW "):
            row = json.loads(line[len("MULTI_ROW "):])
            row.update(status="ok", wall_s=round(time.time() - started, 1))
            return row
    tail = (stderr + stdout)[-4000:]
    status = "oom" if ("OutOfMemory" in tail or "out of memory" in tail) else "error"
    return {"status": status, "error": tail[-1500:], "wall_s": round(time.time() - started, 1)}


def run_bench(name: str, spec: tuple, args) -> dict:
    recipe, model, gpus, batch, seq, master, timeout = spec[:7]
    reduce = spec[7] if len(spec) > 7 else "fp32"
    if args.device == "cpu":  # smoke test of the script itself
        model, batch, seq, timeout = "smoke", 2, 64, 300
    cfg = dict(kind="bench", name=name, recipe=recipe, model=model, batch=batch, seq=seq, master=master,
               reduce=reduce, warmup=args.warmup, steps=args.steps, profile_dir=args.profile,
               layers_per_unit=args.layers_per_unit, cuda_graph=args.cuda_graph)
    row = {"name": name, "recipe": recipe, "model": model, "gpus": gpus, "batch_per_gpu": batch, "seq": seq,
           "master": master, "reduce_dtype": reduce, "layers_per_unit": args.layers_per_unit,
           "cuda_graph": args.cuda_graph, "optimizer": ("torch.optim.AdamW(fused), states in the master dtype" if recipe == "bf16"
                                           else "fp8train.AdamW(states='dre')")}
    row.update(launch(cfg, gpus, min(timeout, args.remaining()), args.device))
    return row


def run_dcp(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fp8train-dcp-") as tmp:
        cfg = dict(kind="dcp", dir=tmp, phase="save")
        saved = launch(cfg, 2, min(120, args.remaining()), args.device)
        if saved["status"] != "ok":
            return {"name": "dcp 2 -> 1 GPU: same state and losses", "ok": False, "detail": saved}
        loaded = launch(dict(cfg, phase="load"), 1, min(120, args.remaining()), args.device)
    if loaded["status"] != "ok":
        return {"name": "dcp 2 -> 1 GPU: same state and losses", "ok": False, "detail": loaded}
    expected = saved["losses"][2:]
    rel = max(abs(a - b) / abs(b) for a, b in zip(loaded["losses"], expected))
    ok = loaded["n_mismatched"] == 0 and rel < 2e-3
    return {"name": "dcp 2 -> 1 GPU: same state and losses", "ok": ok, "losses_2gpu": expected,
            "losses_1gpu": loaded["losses"], "max_rel_loss_diff": rel, "n_compared": loaded["n_compared"],
            "mismatched": loaded["mismatched"]}


def run_graph_check(args) -> dict:
    name = "FSDP2 step as a CUDA graph: same losses as eager (2 GPUs)"
    if args.device != "cuda":
        return {"name": name, "ok": None, "detail": "skipped: CUDA graphs need GPUs"}
    result = launch(dict(kind="graph"), 2, min(150, args.remaining()), args.device)
    if result["status"] != "ok":
        return {"name": name, "ok": False, "detail": result}
    pairs = [*zip(result["eager"], result["graph"]), *zip(result["eager_evals"], result["graph_evals"])]
    rel = max(abs(a - b) / abs(a) for a, b in pairs)
    return {"name": name, "ok": rel < 2e-3, "max_rel_loss_diff": rel,
            **{k: result[k] for k in ("eager", "graph", "eager_evals", "graph_evals")}}


def run_check(name: str, args) -> dict:
    if name == "dcp":
        return run_dcp(args)
    if name == "graph":
        return run_graph_check(args)
    if name == "train":
        return run_train(args)
    from gpu import distributed

    result = distributed.launch(2, timeout=min(120, args.remaining()))
    return {"name": "adamw kernel on 2-GPU shards vs reference", "ok": distributed.verdict(result), **result}


def run_train(args) -> dict:
    """The trainer end to end: 2 GPUs for 20 steps (stopping after 10), each step replayed as a CUDA graph, then
    resumed on 1 GPU (eager)."""
    name = "fp8train train --nproc 2 --cuda-graph -> --resume --nproc 1"
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    device = "cuda" if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="fp8train-train-", ignore_cleanup_errors=True) as tmp:
        common = [sys.executable, "-m", "fp8train", "train", "--out", f"{tmp}/run", "--no-progress"]
        # a small corpus (fp8train's own sources) keeps the tokenizer and data preparation to seconds
        first = common + ["--model", "tiny", "--recipe", "coat", "--delayed-scaling", "--steps", "20", "--stop-after", "10",
                          "--batch-size", "8", "--seq-len", "256", "--checkpoint-every", "5", "--eval-every", "10",
                          "--data", str(ROOT / "fp8train"), "--tokenizer-train-bytes", "300000",
                          "--cache-dir", f"{tmp}/cache", "--device", device, "--nproc", "2"]
        if device == "cuda":
            first.append("--cuda-graph")
        for cmd in (first, common + ["--resume", "--nproc", "1"]):
            try:
                code, stdout, stderr = run_group(cmd, min(150, args.remaining()), env)
            except subprocess.TimeoutExpired:
                return {"name": name, "ok": False, "detail": f"timeout: {' '.join(cmd[3:])}"}
            if code != 0:
                return {"name": name, "ok": False, "detail": (stderr + stdout)[-1500:]}
        summary = json.loads(pathlib.Path(tmp, "run", "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in pathlib.Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    ok = summary["status"] == "complete" and summary["resumed_from_step"] == 10 and len(losses) == 20 \
        and all(x == x for x in losses) and losses[-1] < losses[0]
    return {"name": name, "ok": ok, "losses": [round(x, 4) for x in losses], "final_eval_loss": summary["final_eval_loss"],
            "tokens_per_s": summary["tokens_per_s"]}


_SAME_SETUP = ("recipe", "model", "batch_per_gpu", "master", "reduce_dtype", "cuda_graph")


def scaling(rows: list) -> list:
    """1 -> 2 GPU efficiency per setup, from the median tokens/s of each side's runs (``--repeat``: the eager FSDP
    step is host-bound, and single runs of one configuration spread +-20 %); with repeats, also each round's."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []
    setups = []
    for r in ok:
        setup = tuple(r.get(k) for k in _SAME_SETUP)
        if r.get("gpus") == 2 and setup not in setups:
            setups.append(setup)
    for setup in setups:
        one = [r for r in ok if r.get("gpus") == 1 and tuple(r.get(k) for k in _SAME_SETUP) == setup]
        two = [r for r in ok if r.get("gpus") == 2 and tuple(r.get(k) for k in _SAME_SETUP) == setup]
        if not one:
            continue
        one_tps = statistics.median(r["tokens_per_s"] for r in one)
        two_tps = statistics.median(r["tokens_per_s"] for r in two)
        entry = {"recipe": setup[0], "model": setup[1], "batch_per_gpu": setup[2], "reduce_dtype": setup[4] or "fp32",
                 "cuda_graph": bool(setup[5]), "tokens_per_s_1gpu": round(one_tps), "tokens_per_s_2gpu": round(two_tps),
                 "efficiency": round(two_tps / (2 * one_tps), 3), "runs": [len(one), len(two)]}
        rounds = [(a, b) for a in one for b in two if a.get("round") is not None and a.get("round") == b.get("round")]
        if len(rounds) > 1:
            entry["efficiency_per_round"] = [round(b["tokens_per_s"] / (2 * a["tokens_per_s"]), 3) for a, b in rounds]
        out.append(entry)
    return out


def environment(device: str) -> dict:
    """Versions and GPU names, read in a child process: the driver itself never creates a CUDA context (it would
    hold memory on GPU 0 for the whole run)."""
    code = (
        "import json, datetime, torch\n"
        "info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'date': datetime.date.today().isoformat()}\n"
        "try:\n    import triton; info['triton'] = triton.__version__\n"
        "except ImportError:\n    info['triton'] = None\n"
        f"cuda = {device == 'cuda'!r} and torch.cuda.is_available()\n"
        "info['gpu'] = torch.cuda.get_device_name() if cuda else 'cpu'\n"
        "info['gpus'] = torch.cuda.device_count() if cuda else 0\n"
        "print(json.dumps(info))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def to_markdown(result: dict) -> str:
    gb = 1e9
    lines = [f"# Multi-GPU (FSDP2) results {result['date']} on {result['gpus']} x {result['gpu']}",
             f"torch {result['torch']}, CUDA {result['cuda']}, triton {result['triton']}", "",
             "| name | GPUs | batch/GPU x seq | master | tokens/s | tokens/s/GPU | peak GB/GPU | params+grads+states GB/GPU"
             " | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r.get("status") == "ok":
            parts = (r["param_bytes_per_gpu"] + r["grad_bytes_per_gpu"] + r["optimizer_state_bytes_per_gpu"]) / gb
            lines.append(f"| {r['name']} | {r['gpus']} | {r['batch_per_gpu']} x {r['seq']} | {r['master']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                         f"{r['peak_memory_bytes'] / gb:.1f} | {parts:.1f} | ok |")
        else:
            lines.append(f"| {r['name']} | {r['gpus']} | {r['batch_per_gpu']} x {r['seq']} | {r['master']} | | | | | "
                         f"{r.get('status')} |")
    if result["scaling"]:
        lines += ["", "| recipe | model | batch/GPU | gradient reduce | step | tokens/s 1 GPU | tokens/s 2 GPUs | "
                  "scaling efficiency | runs (1 / 2 GPUs) | per round |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['recipe']} | {s['model']} | {s['batch_per_gpu']} | {s.get('reduce_dtype', 'fp32')} | "
                  f"{'CUDA graph' if s.get('cuda_graph') else 'eager'} | "
                  f"{s['tokens_per_s_1gpu']:,} | "
                  f"{s['tokens_per_s_2gpu']:,} | "
                  f"{s['efficiency']:.1%} | {' / '.join(map(str, s.get('runs', [])))} | "
                  f"{' '.join(f'{e:.1%}' for e in s.get('efficiency_per_round', []))} |" for s in result["scaling"]]
        lines += ["", "tokens/s are medians over the runs of each configuration (`--repeat`)."]
    for c in result["checks"]:
        lines += ["", f"- check {c['name']}: {'skipped' if c['ok'] is None else 'ok' if c['ok'] else '**FAILED**'} "
                      f"{ {k: v for k, v in c.items() if k not in ('name', 'ok')} }"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    parser.add_argument("--only", default="", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything")
    parser.add_argument("--profile", default=None, help="folder: rank 0 of every benchmark row writes the kernel "
                                                           "table of one profiled step there")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers-per-unit", type=int, default=1,
                        help="decoder layers per FSDP unit in the benchmark rows (fp8train.distributed.shard_model)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="benchmark rows replay forward + backward as one CUDA graph (fp8train.cuda_graphs."
                             "GraphedStep on the sharded model: FSDP2's collectives are captured too)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the benchmark configurations N times, interleaved (1-GPU and 2-GPU rows alternate): "
                             "scaling is then computed from each side's median, and per round")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke-test this script")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    deadline = time.time() + args.budget
    args.remaining = lambda: max(1.0, deadline - time.time())
    env = environment(args.device)
    print(env, flush=True)
    names = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    rows, checks = [], []
    benches = [n for n in names if CONFIGS.get(n) is not None]
    # checks once, benchmark configurations --repeat times, interleaved
    schedule = [(n, 0) for n in names] + [(n, r) for r in range(1, max(1, args.repeat)) for n in benches]
    for name, round_ in schedule:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        if deadline - time.time() < MIN_START_S:
            if CONFIGS[name] is None:
                checks.append({"name": name, "ok": False, "detail": "skipped (time budget)"})
            else:
                recipe, model, gpus, batch, seq, master = CONFIGS[name][:6]
                rows.append({"name": name, "recipe": recipe, "model": model, "gpus": gpus, "batch_per_gpu": batch,
                             "seq": seq, "master": master, "status": "skipped (time budget)", "round": round_})
            continue
        if CONFIGS[name] is None:
            checks.append(run_check(name, args))
            print(json.dumps(checks[-1]), flush=True)
        else:
            rows.append({**run_bench(name, CONFIGS[name], args), "round": round_})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "error"}), flush=True)
            if rows[-1].get("status") != "ok":
                print(rows[-1].get("error", ""), flush=True)
    result = {**env, "rows": rows, "scaling": scaling(rows), "checks": checks}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = env["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = out / f"{env['date']}-{slug}-multi"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
