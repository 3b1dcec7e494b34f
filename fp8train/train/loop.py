"""The training loop behind ``fp8train train``.

    summary = fp8train.train.train(TrainConfig(steps=100, recipe="bf16", out="runs/x"))

Order of work in each step: micro-batches forward/backward (bf16 autocast on CUDA, fp32 on CPU) ->
non-finite check -> clip -> optimizer and scheduler step -> (every ``eval_every``) evaluation -> one line in
``metrics.jsonl`` -> (every ``checkpoint_every``) checkpoint.  The last step always evaluates and
checkpoints; ``summary.json`` is written atomically after everything else, so a run directory with a
summary is a finished run.  A failed run writes ``failure.json`` instead.

Exact resume: the checkpoint holds everything that decides the next step (weights, optimizer state,
scheduler, data position, RNG states), so on CPU a resumed run reproduces the uninterrupted run's losses bit
for bit.

Several processes (``--nproc N`` or torchrun): see :mod:`fp8train.train.distributed` -- FSDP2 sharding,
every rank its share of the step's micro-batches, distributed checkpoints that resume on any number of
processes; rank 0 writes the run's files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import platform
import random
import shutil
import signal
import time
import types
from typing import Callable, Optional

from ..causal_masks import plain_causal_batches
from ..delayed_scaling import gathered_prediction_state, load_prediction_state, prediction_state
from ..distributed import reshard
from . import checkpoint as ckpt
from .config import TrainConfig, TrainError, resolve, simulated_recipe
from .data import WindowSampler, eval_batches, prepare_corpus, split_for_training
from .distributed import DistributedRun, clip_grad_norm, grad_norm, launch, load_optimizer_state_dict, under_launcher
from .metrics import MetricsLog, ProgressDisplay, format_bytes, memory_breakdown, peak_memory, write_summary
from .models import build_model
from .report import plot_loss

RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "summary.json", "failure.json", "loss.png",
             "checkpoints")


class Interrupted(TrainError):
    """Ctrl-C / SIGTERM: the run stopped at a step boundary after saving a checkpoint."""


class Diverged(TrainError):
    """The training loss became NaN or inf at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------------------------------------
# building blocks

def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def apply_recipe(model, recipe: str):
    """``fp8train.convert(model, recipe)``; bf16 needs no conversion when the converter is not installed."""
    import fp8train

    try:
        # the public attribute, not ``from fp8train.convert import``: importing the submodule directly would
        # shadow the function fp8train.convert with the module fp8train.convert for everyone else
        convert = fp8train.convert
    except ImportError as exc:
        if recipe == "bf16":
            return model
        raise TrainError(f"recipe {recipe!r} needs fp8train.convert, which this installation lacks ({exc}); "
                         f"use --recipe bf16") from exc
    if isinstance(convert, types.ModuleType):  # someone imported the submodule first
        convert = convert.convert
    return convert(model, recipe=recipe)


def make_optimizer(model, c: TrainConfig, device):
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay)
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=True if device.type == "cuda" else None, **kwargs)
    try:
        from fp8train.optim import AdamW
    except ImportError as exc:
        raise TrainError(f"--optimizer fp8adamw needs fp8train.AdamW, which this installation lacks ({exc}); "
                         f"use --optimizer adamw") from exc
    master = "bf16_stochastic" if c.master_weights == "bf16" else None
    return AdamW(groups, states="dre", master_weights=master, **kwargs)


def lr_lambda(c: TrainConfig) -> Callable[[int], float]:
    """Factor on the peak lr for scheduler step s: linear warmup, then cosine / linear decay to min_lr_ratio.

    A plain closure on purpose: LambdaLR stores no state for functions, so a resumed run with more
    --steps follows the new schedule.
    """
    warmup, total, floor, kind = c.warmup_steps, c.steps, c.min_lr_ratio, c.schedule

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)

    return factor


def causal_lm_loss(model, batch, device, autocast: bool):
    """Next-token cross-entropy (fp32) of a [batch, seq+1] token block."""
    import torch
    import torch.nn.functional as F

    inputs = batch[:, :-1].to(device, non_blocking=True)
    targets = batch[:, 1:].to(device, non_blocking=True)
    # windows of one document stream, no position_ids passed: SDPA may take its causal kernel without
    # transformers reading the ids on the host (a sync in eager mode; a full mask under compile / graphs)
    if getattr(getattr(model, "_orig_mod", model), "_fp8train_chunked_loss", False):
        # chunked fused head + loss (recipe coat-lean): the model computes the loss, logits never exist
        with plain_causal_batches(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=inputs, labels=targets, shift_labels=targets).loss.float()
    with plain_causal_batches(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def evaluate(model, batches, device, autocast: bool) -> float:
    """Token-weighted mean loss over the fixed evaluation windows."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = batch[:, 1:].numel()
            total += causal_lm_loss(model, batch, device, autocast).item() * n
            count += n
    model.train()
    # FSDP2 keeps the root's weights gathered after a forward without backward: a --cuda-graph run (no eager
    # backward) would evaluate stale ones next time
    reshard(model)
    return total / count


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom_type) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _oom_message(c: TrainConfig, device, where: str) -> str:
    return (f"out of memory on {device} while {where} (model {c.model}, recipe {c.recipe}, batch {c.batch_size} "
            f"x seq {c.seq_len}): lower --batch-size (raise --grad-accum to keep the tokens per step), lower "
            f"--seq-len, add --grad-checkpointing, use --recipe coat, or pick a smaller --model")


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into "stop after this step"; a second one interrupts immediately."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _prepare_out_dir(out: pathlib.Path, c: TrainConfig) -> None:
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if c.resume:
        if not (out / "checkpoints").is_dir():
            raise TrainError(f"--resume: {out} has no checkpoints/ to continue from; run without --resume")
        return
    if existing and not c.overwrite:
        raise TrainError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume, "
                         f"pass --overwrite to replace it, or choose another --out")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _environment(device, world: int = 1) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "threads": torch.get_num_threads(), "processes": world}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ----------------------------------------------------------------------------------------------------------
# the run

def train(config: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one run; returns its summary (``status`` "complete" or "stopped").

    Raises TrainError for problems the user can fix; the run directory then holds no summary.json.
    """
    c = resolve(config)
    run = None
    if under_launcher():  # one rank of torchrun / --nproc
        world = int(os.environ["WORLD_SIZE"])
        if c.nproc not in (1, world):
            raise TrainError(f"--nproc {c.nproc}, but the launcher started {world} processes; leave --nproc out "
                             f"under torchrun")
        c = dataclasses.replace(c, nproc=world)
        run = DistributedRun(c.device)
        c = run.broadcast(c)  # rank 0's settings everywhere (e.g. its time-stamped default --out)
        if not run.is_main:
            log = _silent
    elif c.nproc > 1:
        # data problems are found (and the token cache built) once, before the workers start
        prepare_corpus(c.data, c.text_field, c.vocab_size, c.eval_fraction, c.tokenizer_train_bytes, c.cache_dir,
                       log=log)
        return launch(c, log)
    if run is None:
        return _train(c, run, log)
    try:
        summary = _train(c, run, log)
    except BaseException:
        run.close(finished=False)
        raise
    run.close()
    return summary


def _silent(*_args) -> None:
    pass


def _on_main(run, fn: Callable, others_too: bool = True):
    """``fn()`` -- on rank 0 first when there are several processes (see DistributedRun.main_first)."""
    return fn() if run is None else run.main_first(fn, others_too)


def _train(c: TrainConfig, run, log) -> dict:
    out = pathlib.Path(c.out)
    main = run is None or run.is_main
    _on_main(run, lambda: _prepare_out_dir(out, c), others_too=False)
    # data problems are found before torch is even imported (single process)
    corpus = _on_main(run, lambda: prepare_corpus(c.data, c.text_field, c.vocab_size, c.eval_fraction,
                                                  c.tokenizer_train_bytes, c.cache_dir, log=log))
    train_tokens, eval_tokens = split_for_training(corpus, c.seq_len)
    device = run.device if run is not None else pick_device(c.device)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", "failure.json"):
            (out / stale).unlink(missing_ok=True)
    if run is not None:
        run.barrier()
    try:
        return _run(c, out, device, corpus, train_tokens, eval_tokens, log, run)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, TrainError) else f"{type(exc).__name__}: {exc}"
        if _is_oom(exc):
            message = _oom_message(c, device, "training")
        if main:
            logged = MetricsLog(out / "metrics.jsonl").read()
            step = logged[-1]["step"] if logged else 0
            failure = {"status": "interrupted" if isinstance(exc, Interrupted) else "failed", "error": message,
                       "step": step}
            if isinstance(exc, Diverged):
                failure.update(diverged=True, diverged_at_step=exc.step)
            ckpt.write_json_atomic(out / "failure.json", failure)
        if _is_oom(exc):
            raise TrainError(message) from exc
        raise


def _run(c: TrainConfig, out: pathlib.Path, device, corpus, train_tokens, eval_tokens, log, run=None) -> dict:
    import torch

    started = time.perf_counter()
    use_autocast = device.type == "cuda"
    main, rank, world = (True, 0, 1) if run is None else (run.is_main, run.rank, run.world)
    seed_everything(c.seed)  # the same initial weights on every rank
    try:
        model = build_model(c.model, c.vocab_size, device)
    except BaseException as exc:
        if _is_oom(exc):
            raise TrainError(_oom_message(c, device, "building the model")) from exc
        raise
    if c.master_weights == "bf16":  # bf16 parameters, updated with stochastic rounding by fp8train.AdamW
        model = model.to(torch.bfloat16)
    recipe = simulated_recipe(c) or c.recipe
    # the flags switch levers on; a preset's own defaults (coat-lean caches its FP8 weights) stay unless a flag
    # says otherwise (--no-fp8-weight-cache)
    levers = {field: True for field, on in (("fp8_attention_saves", c.fp8_attention_saves),
                                            ("fused_qkv", c.fused_qkv)) if on}
    for field in ("fast_accumulation", "fast_accumulation_grad_input"):
        if getattr(c, field) is not None and c.recipe != "bf16" and c.simulate_format is None:
            levers[field] = bool(getattr(c, field))
    if c.delayed_scaling is not None and c.recipe in ("coat", "coat-lean") and c.simulate_format is None:
        levers["delayed_scaling"] = bool(c.delayed_scaling)
    if c.fp8_weight_cache is not None and c.recipe != "bf16" and c.simulate_format is None:
        levers["cache_fp8_weights"] = bool(c.fp8_weight_cache)
    if c.fused_residual is not None and c.recipe != "bf16" and c.simulate_format is None:
        levers["fused_residual"] = bool(c.fused_residual)
    if c.flash_attention is not None and c.simulate_format is None:
        levers["flash_attention"] = bool(c.flash_attention)
    if levers:
        from ..recipes import resolve_recipe

        recipe = resolve_recipe(recipe).replace(**levers)
    model = apply_recipe(model, recipe)
    if c.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoints = out / "checkpoints"
    latest = None
    if c.resume:
        latest = ckpt.latest_checkpoint(checkpoints)
        if latest is None:
            raise TrainError(f"--resume: no complete checkpoint in {checkpoints}; run without --resume")
    if run is not None:
        import fp8train.distributed as fd

        if latest is not None and not ckpt.is_distributed_checkpoint(latest):
            ckpt.load_checkpoint_model(latest, model, device)  # full weights, before they are sharded
        # FSDP2: one unit per decoder layer (--fsdp-layers-per-unit: several); bf16 all-gathers on the GPU
        # (autocast computes in bf16 anyway)
        fd.shard_model(model, param_dtype=torch.bfloat16 if device.type == "cuda" else None,
                       layers_per_unit=c.fsdp_layers_per_unit)
    model.train()
    step_model = torch.compile(model) if c.compile else model
    if c.cuda_graph and device.type != "cuda":
        raise TrainError("--cuda-graph needs CUDA GPUs (one per process)")
    optimizer = make_optimizer(model, c, device)
    if c.step_in_backward:
        optimizer.step_in_backward()  # after this, backward leaves no gradients: step() only does bookkeeping
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c))
    sampler = WindowSampler(train_tokens, c.seq_len, c.seed)
    evals = eval_batches(eval_tokens, c.seq_len, c.batch_size, c.eval_batches)
    num_params = sum(p.numel() for p in model.parameters())

    if main:
        shutil.copyfile(corpus.tokenizer_path, out / "tokenizer.json")
        ckpt.write_json_atomic(out / "config.json", {
            "train": c.to_json(), "model": model.config.to_dict(), "parameters": num_params,
            "corpus": corpus.meta, "eval_tokens_used": sum(b[:, 1:].numel() for b in evals),
            "environment": _environment(device, world)})

    metrics = MetricsLog(out / "metrics.jsonl")
    start_step, resumed_from = 0, None
    if latest is not None:
        if ckpt.is_distributed_checkpoint(latest):  # saved by N processes; loads sharded or not
            state = ckpt.load_distributed_checkpoint(latest, model, optimizer, scheduler)
        elif run is not None:  # a single-process checkpoint; the weights were loaded before sharding
            state = ckpt.load_checkpoint_rest(latest, optimizer, scheduler, device,
                                              load_optimizer=load_optimizer_state_dict)
        else:
            state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, device=device)
        sampler.load_state_dict(state["sampler"])
        load_prediction_state(model, state.get("scale_predictions", {}), rank=0 if run is None else run.rank)
        ckpt.restore_rng(state["rng"])
        start_step = resumed_from = int(state["step"])
        if main:
            metrics.truncate_after(start_step)
        saved_world = int(state.get("world_size", 1))
        resharded = (f", saved by {saved_world} process{'es' if saved_world > 1 else ''}, now {world} with "
                     f"--grad-accum {c.grad_accum}"
                     if saved_world != world else "")
        log(f"resumed from {latest} (step {start_step}{resharded})")
    elif main:
        metrics.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphed = None
    if c.cuda_graph:
        from ..cuda_graphs import GraphedStep

        # captured after the peak-memory reset, so the graph's activations count in the reported peak; on a
        # peeked batch (the sampler's position is untouched); the capture's gradients are dropped
        graphed = GraphedStep(model, lambda m, b: causal_lm_loss(m, b["tokens"], device, True),
                              {"tokens": sampler_peek(train_tokens, c).to(device)})
        for p in model.parameters():
            p.grad = None

    log(f"model {c.model}: {num_params / 1e6:.2f}M parameters, recipe {c.recipe}, optimizer {c.optimizer}, "
        f"{device}; {c.steps} steps x {c.tokens_per_step} tokens; data {corpus.meta['source']} "
        f"({corpus.meta['train_tokens']:,} train / {corpus.meta['eval_tokens']:,} eval tokens); run dir {out}")
    progress = ProgressDisplay(c.steps, start_step, c.progress and main)
    params = [p for p in model.parameters() if p.requires_grad]
    train_time, timed_tokens, steps_done = 0.0, 0, 0
    loss_value, eval_loss = float("nan"), None
    stop_reason = None
    step = start_step
    try:
        with _StopFlag() as stop:
            while step < c.steps:
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                total = torch.zeros((), device=device)
                # every rank draws the step's grad_accum x world micro-batches and trains on its own share
                for i in range(c.grad_accum * world):
                    batch = sampler.next_batch(c.batch_size)
                    if i // c.grad_accum != rank:
                        continue
                    if graphed is not None:  # forward + backward replayed (grad_accum is 1)
                        loss = graphed({"tokens": batch.to(device, non_blocking=True)})
                    else:
                        loss = causal_lm_loss(step_model, batch, device, use_autocast)
                        (loss / c.grad_accum).backward()  # FSDP2 then averages the gradients over the ranks
                    total += loss.detach()
                mean_loss = total / c.grad_accum
                loss_value = (mean_loss if run is None else run.mean(mean_loss)).item()
                step += 1
                if not math.isfinite(loss_value):
                    raise Diverged(f"the loss became {loss_value} at step {step}; lower --lr (now {c.lr:g}) or "
                                   f"raise --warmup-steps; the last good checkpoint is in {checkpoints}", step)
                if c.step_in_backward:
                    norm = None  # the gradients were used and freed inside backward
                elif c.grad_clip > 0:
                    norm = clip_grad_norm(params, c.grad_clip)
                elif run is not None:
                    norm = grad_norm(params)
                else:
                    norm = torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])).item()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                steps_done += 1
                if steps_done > 1 or c.steps - start_step == 1:  # the first step carries warm-up costs
                    train_time += dt
                    timed_tokens += c.tokens_per_step
                tokens_per_s = c.tokens_per_step / dt
                eval_loss = None
                if step % c.eval_every == 0 or step == c.steps:
                    eval_loss = evaluate(step_model, evals, device, use_autocast)
                sharpness = None
                if c.sharpness_every and (step % c.sharpness_every == 0 or step == c.steps):
                    from ..lab.sharpness import model_sharpness

                    sharpness = model_sharpness(step_model, evals[0], c.sharpness_eps, use_autocast, device)
                    reshard(step_model)
                peak, _ = peak_memory(device)
                if run is not None:
                    peak = int(run.maximum(peak))  # the busiest rank
                if main and (step % c.log_every == 0 or eval_loss is not None or step == c.steps
                             or sharpness is not None):
                    record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm,
                              "tokens": step * c.tokens_per_step, "tokens_per_s": tokens_per_s,
                              "peak_memory_bytes": peak}
                    if eval_loss is not None:
                        record["eval_loss"] = eval_loss
                    if sharpness is not None:
                        record["sharpness"] = sharpness
                    metrics.append(record)
                progress.update(step, loss_value, tokens_per_s, peak, eval_loss)
                signal_name = stop.signal_name
                if run is not None and run.any(signal_name is not None):  # all ranks stop at the same step
                    signal_name = signal_name or "a signal to another process"
                if signal_name:
                    stop_reason = signal_name
                elif c.stop_after is not None and steps_done >= c.stop_after and step < c.steps:
                    stop_reason = "stop-after"
                periodic = c.checkpoint_every > 0 and step % c.checkpoint_every == 0
                if periodic or (step == c.steps and c.checkpoint_every >= 0) or stop_reason:
                    trainer_state = {"sampler": sampler.state_dict(), "num_parameters": num_params}
                    # Recipe(delayed_scaling): the next step's FP8 scales (every rank's: a collective)
                    predictions = prediction_state(model) if run is None else gathered_prediction_state(model)
                    if predictions:
                        trainer_state["scale_predictions"] = predictions
                    if run is None:
                        ckpt.save_checkpoint(checkpoints, step, model, optimizer, scheduler, trainer_state,
                                             keep=c.keep_checkpoints)
                    else:
                        ckpt.save_distributed_checkpoint(checkpoints, step, model, optimizer, scheduler,
                                                         trainer_state, c.keep_checkpoints, run)
                if stop_reason:
                    break
    finally:
        progress.close()

    if stop_reason == "stop-after":
        log(f"stopped after step {step} (--stop-after {c.stop_after}); continue with: "
            f"fp8train train --out {out} --resume")
        return {"status": "stopped", "step": step, "out": str(out)}
    if stop_reason:
        raise Interrupted(f"interrupted by {stop_reason} at step {step}; a checkpoint was saved, continue with: "
                          f"fp8train train --out {out} --resume")

    records = metrics.read() if main else []
    final_eval = next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None)
    need_eval = final_eval is None or records[-1]["step"] != c.steps  # e.g. resuming a finished run
    if run is not None:
        need_eval = run.broadcast(need_eval)  # evaluation runs FSDP collectives: every rank or none
    if need_eval:
        final_eval = evaluate(step_model, evals, device, use_autocast)
    train_losses = [r["loss"] for r in records if "loss" in r]
    peak, peak_kind = peak_memory(device)
    if run is not None:
        peak = int(run.maximum(peak))
    # per process under FSDP2: this rank's shards of weights, gradients and optimizer state
    breakdown = memory_breakdown(model, optimizer,
                                 lambda: causal_lm_loss(model, sampler_peek(train_tokens, c), device, use_autocast))
    if not main:
        return {"status": "complete", "rank": rank}
    plot_loss(records, out / "loss.png", f"{c.model} / {c.recipe}: {num_params / 1e6:.1f}M parameters")
    summary = {
        "status": "complete", "recipe": c.recipe, "optimizer": c.optimizer, "model": c.model,
        "parameters": num_params, "steps": c.steps, "tokens_trained": c.steps * c.tokens_per_step,
        "final_train_loss": train_losses[-1] if train_losses else loss_value,
        "final_eval_loss": final_eval, "eval_perplexity": math.exp(min(final_eval, 700.0)),
        "tokens_per_s": timed_tokens / train_time if train_time > 0 else None,
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "memory_breakdown": breakdown,
        "wall_time_s": time.perf_counter() - started, "device": str(device), "processes": world, "seed": c.seed,
        "resumed_from_step": resumed_from, "out": str(out),
    }
    write_summary(out / "summary.json", summary)
    log(f"done: eval loss {final_eval:.4f} (perplexity {summary['eval_perplexity']:.2f}), "
        f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, peak memory {format_bytes(peak)} ({peak_kind}); "
        f"results in {out}")
    return summary


def sampler_peek(tokens, c: TrainConfig):
    """The first training windows (fixed, so the memory breakdown does not depend on the data position)."""
    import numpy as np
    import torch

    rows = [np.asarray(tokens[i * c.seq_len:i * c.seq_len + c.seq_len + 1], dtype=np.int64)
            for i in range(min(c.batch_size, (tokens.size - 1) // c.seq_len))]
    return torch.from_numpy(np.stack(rows))
