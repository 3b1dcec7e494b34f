"""What a run measures: the metrics log, peak memory, the memory breakdown, and the live progress bar."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from .checkpoint import write_json_atomic


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step (``step``, ``loss``, ``lr``, ... and, at evaluation
    steps, ``eval_loss``).  Lines are flushed as they are written, so a killed run keeps its history."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a kill
                break
        return records

    def reset(self) -> None:
        self.path.write_text("")

    def truncate_after(self, step: int) -> None:
        """Drop the lines a killed run logged after its last checkpoint (the resumed run logs them again)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def peak_memory(device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak, or on CPU the process's peak resident set."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_max_rss"


def _tensor_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        if hasattr(t, "device_mesh") and hasattr(t, "to_local"):  # a DTensor (FSDP2): this rank's shard
            t = t.to_local()
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _walk_tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_tensors(v)


def memory_breakdown(model, optimizer, loss_of_batch) -> dict:
    """Bytes of weights, gradients, optimizer state and activations for one micro-batch.

    * weights: parameter bytes;  gradients: ``.grad`` bytes after one backward;
    * optimizer: the tensors of ``optimizer.state_dict()["state"]`` (FP8 states and their scales included);
    * activations: every tensor autograd saves for backward during the forward (seen through
      ``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, parameters excluded.
      Casts of weights made for the forward (autocast bf16 copies, FP8 weights) do count: they are
      memory held until backward.

    Runs one forward/backward and clears the gradients afterwards; parameters are not changed.
    """
    import torch

    params = [p for p in model.parameters()]
    local = [p.to_local() if hasattr(p, "device_mesh") else p for p in params]
    param_storages = {(p.device, p.untyped_storage().data_ptr()) for p in local}
    weights = _tensor_bytes(params, set())
    saved: set = set(param_storages)
    activations = 0

    def pack(t):
        nonlocal activations
        try:
            activations += _tensor_bytes([t], saved)
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            activations += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of_batch()
    loss.backward()
    gradients = _tensor_bytes([p.grad for p in params if p.grad is not None], set())
    model.zero_grad(set_to_none=True)
    state = optimizer.state_dict()["state"]
    optimizer_bytes = _tensor_bytes(list(_walk_tensors(state)), set())
    return {"weights_bytes": weights, "gradients_bytes": gradients, "optimizer_state_bytes": optimizer_bytes,
            "activations_bytes": activations,
            "total_bytes": weights + gradients + optimizer_bytes + activations}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressDisplay:
    """A rich progress bar on a terminal; elsewhere (CI logs, pipes) a plain line every ~5 % of the run."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self._bar = None
        self._last_print = 0.0
        self._every = max(1, total // 20)
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, transient=False)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, peak_bytes: int, eval_loss=None) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  peak {format_bytes(peak_bytes)}"
        if eval_loss is not None:
            info += f"  eval {eval_loss:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self._every == 0 or step == self.total or eval_loss is not None:
            print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def write_summary(path: pathlib.Path, summary: dict) -> None:
    write_json_atomic(path, summary)
