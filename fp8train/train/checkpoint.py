"""Checkpoints that survive a kill at any moment and never unpickle anything.

Layout of ``<out>/checkpoints/step_00000100/``:

* ``model.safetensors``                      the model's state (safetensors.torch.save_model)
* ``optimizer.json`` + ``optimizer.safetensors`` the optimizer's state_dict: tensors (FP8 states included)
  in safetensors, the structure and python scalars in tagged JSON
* ``trainer.json`` + ``trainer.safetensors``   step, lr scheduler, data position, RNG states (torch CPU/CUDA,
  python, numpy) and run counters
* ``manifest.json``                           written last: the files and their sizes

Atomicity: everything is written into ``checkpoints/.tmp-step_...`` and fsynced, then the directory is
renamed to its final name (one atomic rename) and the parent directory fsynced.  A process killed at any
point leaves either the old set of complete checkpoints or the old set plus the new one; a stray ``.tmp-*``
directory is ignored and removed by the next save.  Loading checks the manifest and falls back to the
previous checkpoint (with a warning) if the newest one is damaged.

Runs of several processes (``--nproc N``) write *distributed* checkpoints in the same ``step_XXXXXXXX`` places:
torch.distributed.checkpoint files (every rank writes its shards) plus ``fp8train.json`` (optimizer param groups
and the trainer state above, as JSON; RNG states of rank 0), see :mod:`fp8train.distributed.checkpoint`.  They
are written into a ``.tmp-`` directory and renamed the same way, ``fp8train.json`` last, and load on any number
of processes -- or in a single-process run.

Test hook: ``FP8TRAIN_TEST_PAUSE_IN_SAVE=STEP:FLAGFILE`` makes the save of step STEP stop half-way (after the
model file, before the optimizer), create FLAGFILE and sleep, so a test can SIGKILL it mid-write.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import time
import warnings
from typing import Any, Optional

FORMAT = 1
DISTRIBUTED_INFO = "fp8train.json"  # fp8train.distributed.checkpoint.INFO_FILE (not imported: it needs torch)
_STEP_DIR = re.compile(r"^step_(\d{8})$")


# ----------------------------------------------------------------------------------------------------------
# tagged JSON: tensors go to a safetensors file, everything else must be a plain python value

def encode_tree(obj: Any, tensors: dict, path: str):
    """JSON structure of ``obj``; tensors move to ``tensors[path]`` and are referenced by path (no pickling)."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_tree(k, tensors, f"{path}.key{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint: only tensors, numpy "
                    f"arrays and python scalars/containers are allowed (no pickling)")


def decode_tree(obj: Any, tensors: dict):
    """Inverse of :func:`encode_tree`."""
    import numpy as np

    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def save_tree(tree: Any, directory: pathlib.Path, name: str) -> list[str]:
    """Write ``name.json`` (+ ``name.safetensors`` when there are tensors); returns the file names."""
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = encode_tree(tree, tensors, name)
    files = [f"{name}.json"]
    if tensors:
        seen, flat = set(), {}
        for key, t in tensors.items():
            t = t.detach().contiguous()
            storage = (t.device, t.untyped_storage().data_ptr())
            if storage in seen:  # safetensors refuses aliased tensors; the copy loads back equal
                t = t.clone()
            seen.add(storage)
            flat[key] = t
        save_file(flat, str(directory / f"{name}.safetensors"))
        files.append(f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(structure))
    return files


def load_tree(directory: pathlib.Path, name: str, device="cpu") -> Any:
    from safetensors.torch import load_file

    structure = json.loads((directory / f"{name}.json").read_text())
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file), device=str(device)) if tensor_file.exists() else {}
    return decode_tree(structure, tensors)


# ----------------------------------------------------------------------------------------------------------
# RNG states

def capture_rng() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # states of the devices this process sees (a run resumed on fewer GPUs sees fewer)
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]][:torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------------
# save / find / load

def _fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_path(path: pathlib.Path) -> None:
    """fsync a directory (or file) by path, so a rename into it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(step: int) -> None:
    hook = os.environ.get("FP8TRAIN_TEST_PAUSE_IN_SAVE")
    if hook:
        pause_step, flag = hook.split(":", 1)
        if int(pause_step) == step:
            pathlib.Path(flag).write_text(str(os.getpid()))
            time.sleep(3600)


def step_dirs(root: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(root: pathlib.Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int = 2) -> pathlib.Path:
    """Write the checkpoint of ``step`` atomically and keep only the ``keep`` newest ones."""
    from safetensors.torch import save_model

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    _test_pause(step)
    files = ["model.safetensors"]
    files += save_tree(optimizer.state_dict(), tmp, "optimizer")
    state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": capture_rng()}
    files += save_tree(state, tmp, "trainer")
    for name in files:
        _fsync_file(tmp / name)
    manifest = {"format": FORMAT, "step": step, "files": {n: (tmp / n).stat().st_size for n in files}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / "manifest.json")
    fsync_path(tmp)
    if final.exists():  # re-saving a step (e.g. a resumed run that ends where it was stopped)
        trash = root / f".tmp-trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    fsync_path(root)
    for _, old in step_dirs(root)[:-keep]:
        trash = root / f".tmp-trash-{old.name}"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def is_distributed_checkpoint(path: pathlib.Path) -> bool:
    return (path / DISTRIBUTED_INFO).is_file()


def checkpoint_problem(path: pathlib.Path) -> Optional[str]:
    """None if the checkpoint is complete, else what is wrong with it."""
    if is_distributed_checkpoint(path):
        return None if (path / ".metadata").is_file() else "no .metadata (incomplete distributed save)"
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (incomplete save)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "unreadable manifest.json"
    for name, size in manifest["files"].items():
        if not (path / name).is_file():
            return f"missing {name}"
        if (path / name).stat().st_size != size:
            return f"{name} has {(path / name).stat().st_size} bytes, expected {size}"
    return None


def latest_checkpoint(root: pathlib.Path) -> Optional[pathlib.Path]:
    """The newest complete checkpoint under ``root`` (damaged newer ones are skipped with a warning)."""
    for _, path in reversed(step_dirs(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
    return None


def save_distributed_checkpoint(root: pathlib.Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                                keep: int, run) -> pathlib.Path:
    """The distributed counterpart of :func:`save_checkpoint`; every rank calls it (``run``: DistributedRun)."""
    from ..distributed import save_checkpoint as save_dcp

    if run.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    run.barrier()
    state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": capture_rng(),
             "world_size": run.world}
    final = save_dcp(root / f"step_{step:08d}", model, optimizer, extra=state)
    if run.is_main:
        for _, old in step_dirs(root)[:-keep]:
            trash = root / f".tmp-trash-{old.name}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    run.barrier()
    return final


def load_distributed_checkpoint(path: pathlib.Path, model, optimizer, scheduler) -> dict:
    """Restore a distributed checkpoint (saved on any number of processes) into ``model`` -- sharded or not --
    ``optimizer`` and ``scheduler``; returns the trainer state (RNG not yet applied)."""
    from ..distributed import load_checkpoint as load_dcp

    state = load_dcp(path, model, optimizer)
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def load_checkpoint(path: pathlib.Path, model, optimizer, scheduler, device="cpu") -> dict:
    """Restore model, optimizer and scheduler in place; returns the trainer state (RNG not yet applied)."""
    load_checkpoint_model(path, model, device)
    return load_checkpoint_rest(path, optimizer, scheduler, device)


def load_checkpoint_model(path: pathlib.Path, model, device="cpu") -> None:
    """The weights of a (single-process) checkpoint into an unsharded model -- before FSDP shards it."""
    from safetensors.torch import load_model

    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not loadable: {problem}")
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))


def load_checkpoint_rest(path: pathlib.Path, optimizer, scheduler, device="cpu", load_optimizer=None) -> dict:
    """Optimizer, scheduler and trainer state of a (single-process) checkpoint; ``load_optimizer(optimizer,
    state_dict)`` replaces ``optimizer.load_state_dict`` (sharded optimizers)."""
    state_dict = load_tree(path, "optimizer", device=device)
    (load_optimizer or (lambda opt, sd: opt.load_state_dict(sd)))(optimizer, state_dict)
    state = load_tree(path, "trainer")
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
