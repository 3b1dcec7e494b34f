"""``fp8train train --nproc N`` (or ``torchrun --nproc-per-node N -m fp8train train``): one process per device.

The model is sharded with FSDP2 (``fp8train.distributed.shard_model``: one ``fully_shard`` per decoder layer, then
the root) and checkpoints go through torch.distributed.checkpoint, so a run saved on N processes resumes on M.

Data parallelism: every optimizer step consumes ``grad_accum x N`` micro-batches of ``batch_size`` sequences,
drawn in one fixed order by every rank (the sampler's state is the same everywhere); rank r trains on micro-batches
``r * grad_accum ... (r + 1) * grad_accum - 1``.  Resuming on M processes with ``grad_accum * N / M`` micro-batches
each (the default when ``--grad-accum`` is not given) therefore computes the very same micro-batches per step: only
the order in which gradients are summed changes.

``--nproc N`` with N > 1 starts N worker processes here (torch.multiprocessing, spawn); under torchrun the
environment (``RANK``, ``WORLD_SIZE``, ...) says so and no process is started.  Rank 0 writes every file of the run
(metrics, summary, plots); all ranks write their shards of a checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import tempfile
import traceback
from typing import Any, Callable, Optional

from .config import TrainConfig, TrainError

__all__ = ["under_launcher", "DistributedRun", "launch"]


def under_launcher() -> bool:
    """Whether this process is one rank of a torchrun (or ``--nproc``) launch."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class DistributedRun:
    """This process's place in the run: rank, world size, device, and the few collectives the loop needs."""

    def __init__(self, device_name: str):
        import torch
        import torch.distributed as dist

        import fp8train.distributed as fd

        backend = "gloo" if device_name == "cpu" or not torch.cuda.is_available() else None
        if device_name == "cuda" and not torch.cuda.is_available():
            raise TrainError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
        self._created = not dist.is_initialized()
        self.device = fd.init_distributed(backend=backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    # -- collectives ---------------------------------------------------------------------------------------
    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (python objects: configs, error messages)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], Any], others_too: bool = True) -> Any:
        """Run ``fn`` on rank 0, then (``others_too``) on the other ranks; a ``TrainError`` on rank 0 is raised
        on every rank, so no rank waits forever for one that gave up."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except TrainError as exc:
                error = str(exc)
        error = self.broadcast(error)
        if error is not None:
            raise TrainError(error)
        if not self.is_main and others_too:
            result = fn()
        return result

    def mean(self, value):
        """Mean over ranks of a 0-d tensor (returned as a tensor)."""
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.world

    def maximum(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.maximum(1.0 if flag else 0.0) > 0

    def _collective_device(self):
        import torch

        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self, finished: bool = True) -> None:
        """Tear the process group down; ``finished``: this rank ended normally, so every rank is ending too."""
        import torch.distributed as dist

        if self._created and dist.is_initialized():
            if finished:
                # every rank completes its last collective before any rank closes its connections: a gloo peer
                # that disappears mid-operation can abort the other process.  (After an error, other ranks may
                # be stuck elsewhere: no barrier then.)
                dist.barrier()
            dist.destroy_process_group()


def grad_norm(params) -> float:
    """L2 norm of all gradients, sharded (DTensor) or not: local sums of squares, summed over ranks."""
    import torch
    import torch.distributed as dist

    from fp8train.optim.adamw import is_dtensor, local_view

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.zeros((), dtype=torch.float32, device=local_view(grads[0]).device)
    for g in grads:
        total += local_view(g).float().square().sum()
    if any(is_dtensor(g) for g in grads) and dist.is_initialized():
        dist.all_reduce(total)
    return float(total.sqrt().item())


def clip_grad_norm(params, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for sharded gradients; returns the norm before clipping."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())


# ----------------------------------------------------------------------------------------------------------
# launching N processes from ``fp8train train --nproc N``

def _worker(rank: int, config: TrainConfig, nproc: int, port: int, result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from .loop import Interrupted, train

    result: dict
    try:
        summary = train(config, log=print if rank == 0 else (lambda *_: None))
        result = {"summary": summary}
    except Interrupted as exc:
        result = {"error": "interrupted", "message": str(exc)}
    except TrainError as exc:
        result = {"error": "train", "message": str(exc)}
    except BaseException:
        result = {"error": "crash", "message": traceback.format_exc()}
    path = pathlib.Path(result_dir) / f"rank{rank}.json"
    path.write_text(json.dumps(result, default=str))
    # Leave without interpreter finalization: the result is on disk, and the C++ teardown of torch.distributed's
    # objects at exit (gloo threads still holding Python tensors) can abort a process that finished cleanly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if result.get("error") == "crash" else 0)  # 1: the launcher then stops the other ranks


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(c: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Start ``c.nproc`` worker processes for one run and wait for them; returns rank 0's summary.

    Raises what the workers raised (``TrainError``, ``Interrupted``); Ctrl-C reaches every worker from the
    terminal, they agree on the step to stop at and save a checkpoint together.
    """
    import torch
    import torch.multiprocessing as mp

    if c.device != "cpu" and torch.cuda.is_available() and c.nproc > torch.cuda.device_count():
        raise TrainError(f"--nproc {c.nproc} needs {c.nproc} GPUs (one per process), this machine has "
                         f"{torch.cuda.device_count()}; lower --nproc or use --device cpu")
    log(f"starting {c.nproc} processes ({'gloo, CPU' if c.device == 'cpu' or not torch.cuda.is_available() else 'nccl, one GPU each'})")
    with tempfile.TemporaryDirectory(prefix="fp8train-ranks-") as result_dir:
        ctx = mp.start_processes(_worker, args=(c, c.nproc, _free_port(), result_dir), nprocs=c.nproc,
                                 join=False, start_method="spawn")
        # the workers get Ctrl-C from the terminal themselves; a SIGTERM sent to this process is passed on
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)

        def forward(signum, frame):
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signum)

        previous_term = signal.signal(signal.SIGTERM, forward)
        try:
            crashed = None
            try:
                while not ctx.join():
                    pass
            except Exception as exc:  # noqa: BLE001 - a rank died; its traceback is in its result file
                crashed = exc
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
        results = {}
        for path in pathlib.Path(result_dir).glob("rank*.json"):
            results[int(path.stem[4:])] = json.loads(path.read_text())
    return _outcome(results, c.nproc, crashed)


def _outcome(results: dict, nproc: int, crashed: Optional[BaseException]) -> dict:
    """Rank 0's summary from the ranks' result files, or the error the run ended with.

    A process that died after every rank had written its result (``crashed`` set, all results present and none a
    crash) lost nothing: that is reported as a warning, not as a failed run.
    """
    import warnings

    from .loop import Interrupted

    for rank in sorted(results):
        if results[rank].get("error") == "crash":
            raise RuntimeError(f"rank {rank} of {nproc} failed:\n{results[rank]['message']}")
    if sorted(results) != list(range(nproc)):
        raise RuntimeError(f"a worker process of the run stopped without a result ({crashed}); the workers are "
                           "started with multiprocessing's 'spawn': a script that calls train(nproc > 1) must do so "
                           "under `if __name__ == '__main__':`")
    if crashed is not None:
        warnings.warn(f"every rank finished and wrote its result, then a worker process exited abnormally ({crashed}); "
                      "the run's files are complete", RuntimeWarning, stacklevel=3)
    main = results[0]
    if main.get("error") == "interrupted":
        raise Interrupted(main["message"])
    if main.get("error") == "train":
        raise TrainError(main["message"])
    return main["summary"]


def load_optimizer_state_dict(optimizer, state_dict: dict) -> None:
    """Load a full (unsharded, single-process) optimizer state dict into an optimizer of sharded parameters.

    fp8train.AdamW cuts full tensors into its shards itself (and re-encodes the moments of parameters sharded
    along their last dim); for other optimizers every state tensor shaped like its parameter is cut here.
    """
    import torch

    from fp8train.optim import AdamW
    from fp8train.optim.adamw import _placed_like, is_dtensor

    if not isinstance(optimizer, AdamW):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_index = dict(zip(saved_ids, params))
        state = {}
        for index, entries in state_dict["state"].items():
            p = by_index.get(index)
            state[index] = {k: _placed_like(p, v) if (p is not None and is_dtensor(p) and isinstance(v, torch.Tensor)
                                                       and v.shape == p.shape) else v
                            for k, v in entries.items()}
        state_dict = {**state_dict, "state": state}
    optimizer.load_state_dict(state_dict)


def checkpoint_world_size(path: pathlib.Path) -> Optional[int]:
    """World size a checkpoint was saved with: from fp8train.json for distributed ones, 1 for the others."""
    info = path / "fp8train.json"
    if info.is_file():
        return int(json.loads(info.read_text()).get("world_size", 1))
    return 1
