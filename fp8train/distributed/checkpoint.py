"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): save on N ranks, load on M.

    fd.save_checkpoint("run/ckpt/step_00000100", model, opt, extra={"step": 100, "scheduler": sched.state_dict()})
    extra = fd.load_checkpoint("run/ckpt/step_00000100", model, opt)      # any world size, FSDP2 or not

What is saved:

* the model's state dict and the optimizer's state -- for fp8train.AdamW the FP8 moments with their per-group
  metadata (amax, k) as they are, no up-cast -- taken with ``get_state_dict`` (sharded DTensors under FSDP2,
  keyed by parameter name), written by every rank in parallel (``dcp.save``).  DCP records which slice of each
  tensor every file holds, so a checkpoint written by N ranks loads on M ranks (or into an unsharded model):
  each rank reads just the slices that overlap its shard;
* ``fp8train.json``: the optimizer's parameter groups (lr, betas, states, formats, ...), the ``extra`` dict
  (scheduler, data position, step -- anything JSON-like; its tensors, e.g. RNG states, go into the DCP files)
  and the world size it was saved with.  Non-tensor values never pass through DCP, whose loader would unpickle
  them: loading a checkpoint runs no pickle.

Atomicity: everything is written into a sibling ``.tmp-<name>`` directory; once every rank has written its files
rank 0 writes ``fp8train.json`` last, fsyncs and renames the directory to ``<name>`` -- a complete checkpoint or
none.  All ranks must see the same filesystem (one host, or a shared one).

Scaling groups of the FP8 moments run along each parameter's last dim and FSDP2 shards rows, so the saved bytes
do not depend on the world size; parameters sharded along their last dim (1-D ones under FSDP2) keep float32
moments (fp8train/optim/adamw.py).  When a checkpoint stores a parameter's moments in another layout than the
loading optimizer (say a single-process run's FP8 norm-weight moments, loaded into an FSDP2 run that keeps them in
float32), they are read in full and ``fp8train.AdamW.load_state_dict`` decodes and re-encodes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from ..train.checkpoint import decode_tree, encode_tree, fsync_path

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_info", "INFO_FILE", "FORMAT"]

INFO_FILE = "fp8train.json"
FORMAT = 1
_EXTRA = "extra_tensors"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """Without a process group DCP warns on every call that it assumes a single process -- which is what we mean
    there; other warnings pass."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _broadcast_error(message: Optional[str]) -> None:
    """Raise the same error on every rank when any rank found one (so no rank waits forever in a collective)."""
    if _distributed():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m), None)
    if message:
        raise ValueError(message)


# -- save ---------------------------------------------------------------------------------------------------

def save_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[dict] = None) -> pathlib.Path:
    """Save ``model`` (+ ``optimizer`` + ``extra``) to the directory ``path``; every rank must call it.

    ``extra``: a dict of python values and tensors (scheduler state, data position, RNG states ...); its tensors
    are taken from rank 0.  An existing checkpoint at ``path`` is replaced (atomically).  Returns ``path``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    final = pathlib.Path(path).absolute()
    tmp = final.with_name(f".tmp-{final.name}")
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir()
    _barrier()

    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    extra_tensors: dict = {}
    info = {"format": FORMAT, "world_size": dist.get_world_size() if _distributed() else 1,
            "extra": encode_tree(extra or {}, extra_tensors, "extra")}
    state = {"model": model_sd}
    if optim_sd is not None:
        state["optimizer"] = {"state": optim_sd["state"]}
        group_tensors: dict = {}
        info["optimizer_param_groups"] = encode_tree(optim_sd["param_groups"], group_tensors, "param_groups")
        extra_tensors.update(group_tensors)
    if extra_tensors:
        # plain tensors: DCP writes rank 0's copy once
        state[_EXTRA] = {key: t.detach().cpu() for key, t in extra_tensors.items()}
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))

    if _rank() == 0:
        with open(tmp / INFO_FILE, "w") as f:  # written last: its presence marks a complete checkpoint
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if final.exists():
            trash = final.with_name(f".tmp-trash-{final.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        fsync_path(final.parent)
    _barrier()
    return final


# -- load ---------------------------------------------------------------------------------------------------

def read_checkpoint_info(path) -> dict:
    """``fp8train.json`` of a checkpoint (format, world size it was saved with, extra without tensors).

    Raises ``FileNotFoundError`` for a directory that is not a complete checkpoint."""
    info_path = pathlib.Path(path) / INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete fp8train distributed checkpoint (no {INFO_FILE}); "
                                "it may be a save that was interrupted -- use an earlier checkpoint")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} has checkpoint format {info.get('format')!r}, this fp8train reads {FORMAT}")
    return info


def _flatten(obj: Any, prefix: str, out: dict) -> dict:
    """DCP's key for every tensor of a nested dict (``a.b.c``, as ``dcp`` flattens state dicts)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out


def load_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (on any number of ranks) into ``model`` and
    ``optimizer``, sharded however they are now; every rank must call it.  Returns the ``extra`` dict.

    Shapes, dtypes and names are checked against the checkpoint first; a mismatch raises ``ValueError`` on every
    rank naming the first offending entry.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    path = pathlib.Path(path)
    info = read_checkpoint_info(path)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata

    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if "optimizer_param_groups" not in info:
            _broadcast_error(f"{path} holds no optimizer state (it was saved without an optimizer); load it "
                             "with optimizer=None and start the optimizer from scratch")
    state: dict = {"model": model_sd}
    conversions: list = []
    if optim_sd is not None:
        conversions = _plan_moment_conversions(optimizer, optim_sd, stored)
        state["optimizer"] = {"state": {fqn: s for fqn, s in optim_sd["state"].items()
                                        if fqn not in conversions}}
    extra_keys = [key[len(_EXTRA) + 1:] for key in stored if key.startswith(_EXTRA + ".")]
    if extra_keys:
        state[_EXTRA] = {}
        for key in extra_keys:
            md = stored[f"{_EXTRA}.{key}"]
            state[_EXTRA][key] = torch.empty(md.size, dtype=md.properties.dtype)

    problem = None
    for key, tensor in _flatten(state, "", {}).items():
        md = stored.get(key)
        if not isinstance(md, TensorStorageMetadata):
            problem = (f"{path} has no tensor {key!r}: the checkpoint belongs to another model or optimizer "
                       "configuration")
        elif tuple(md.size) != tuple(tensor.shape) or md.properties.dtype != tensor.dtype:
            problem = (f"{key!r} is {tuple(md.size)} {md.properties.dtype} in {path} but "
                       f"{tuple(tensor.shape)} {tensor.dtype} here: the checkpoint belongs to another model or "
                       "optimizer configuration")
        if problem:
            break
    _broadcast_error(problem)

    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    tensors = state.get(_EXTRA, {})
    extra = decode_tree(info["extra"], tensors)
    if optim_sd is None:
        set_model_state_dict(model, model_sd)
        return extra
    for fqn in conversions:
        optim_sd["state"][fqn] = _read_full(path, fqn, stored)
    optim_sd["param_groups"] = decode_tree(info["optimizer_param_groups"], tensors)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return extra


# -- moments stored in another layout ------------------------------------------------------------------------

def _plan_moment_conversions(optimizer, optim_sd: dict, stored: dict) -> list:
    """Names of the parameters whose fp8train.AdamW moments the checkpoint stores in another layout (other keys
    or dtypes) than this optimizer keeps them.  Only 1-D parameters moving between sharded (float32 moments) and
    unsharded (FP8) runs should get here; other option changes are then refused by ``AdamW.load_state_dict``."""
    from ..optim import AdamW

    if not isinstance(optimizer, AdamW):
        return []
    out = []
    for fqn, live in optim_sd["state"].items():
        prefix = f"optimizer.state.{fqn}."
        saved = {key[len(prefix):]: md for key, md in stored.items() if key.startswith(prefix)}
        if "exp_avg" not in saved:
            continue  # not in the checkpoint at all: the key check reports it
        same = set(saved) == set(live) and all(
            getattr(saved[k], "properties", None) is not None and saved[k].properties.dtype == live[k].dtype
            for k in live)
        if not same:
            out.append(fqn)
    return out


def _read_full(path, fqn: str, stored: dict) -> dict:
    """One parameter's saved optimizer entries as full plain tensors, in the layout they were saved in;
    ``fp8train.AdamW.load_state_dict`` re-encodes them into its own layout (and shards them)."""
    prefix = f"optimizer.state.{fqn}."
    full = {key[len(prefix):]: torch.empty(md.size, dtype=md.properties.dtype)
            for key, md in stored.items() if key.startswith(prefix)}
    with _quiet_single_process():
        dcp.load({"optimizer": {"state": {fqn: full}}}, checkpoint_id=str(path))
    return full
