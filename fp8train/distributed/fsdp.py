"""Shard a (converted) model with PyTorch FSDP2: one ``fully_shard`` per decoder layer, then one for the root.

    import fp8train, fp8train.distributed as fd
    fd.init_distributed()                                   # under torchrun: nccl on CUDA, gloo on CPU
    model = fp8train.convert(build_model(), recipe="coat")   # convert first: the FP8 modules reuse the Parameters
    fd.shard_model(model, param_dtype=torch.bfloat16)        # every parameter becomes a DTensor (Shard(0))
    opt = fp8train.AdamW(model.parameters(), lr=3e-4)       # FP8 moments sharded like the parameters

Why per decoder layer: FSDP2 all-gathers one ``fully_shard`` unit at a time, just before its forward (and again
before its backward), and frees it right after.  One unit per decoder layer keeps at most a layer or two of full
weights alive and lets the all-gather of layer i+1 overlap the compute of layer i.  The root unit takes what is
left: embeddings, final norm and the output head (tied weights stay together there).

FP8 layers need nothing special: inside a unit's forward and backward its parameters are plain, unsharded
tensors again, so :class:`~fp8train.nn.FP8Linear` quantizes the gathered weight just as without FSDP.
"""

from __future__ import annotations

import datetime
import os
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_distributed", "decoder_layers", "shard_model", "is_sharded", "reshard", "world_size", "rank"]


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``) and return this process's device.

    ``backend=None`` picks ``nccl`` when CUDA is available (one GPU per process: ``cuda:LOCAL_RANK``) and ``gloo``
    otherwise (CPU).  Without ``WORLD_SIZE`` in the environment (a plain ``python`` run) it starts a group of one
    process, so the same code runs sharded on one device.  Calling it again is a no-op.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                               "visible; launch at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def decoder_layers(model: nn.Module) -> list:
    """The repeated blocks of ``model``, in order: the modules whose class Hugging Face lists in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ...), else the entries of the longest
    ``nn.ModuleList``.  Raises ``ValueError`` when there is neither."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if lists:
        longest = max(lists, key=len)
        if len(longest):
            return list(longest)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: pass them with "
                     "shard_model(model, layers=[...])")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward that had no backward (evaluation under no_grad).

    The root unit keeps its weights gathered after forward (``reshard_after_forward=False``, see
    :func:`shard_model`) and only a backward frees them; until then every forward reuses them, although the
    optimizer may have changed the shards since.  In eager training the next backward comes before the next
    step's forward, but a step replayed as a CUDA graph (:class:`fp8train.cuda_graphs.GraphedStep`) runs no
    backward hooks on the host, so the next evaluation would read the last one's weights.  Call this after
    evaluating a sharded model; it does nothing for a model that is not sharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support: nothing can be sharded
        return
    for module in getattr(model, "_orig_mod", model).modules():  # torch.compile's wrapper: the model inside
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_model(model: nn.Module, *, mesh=None, layers: Optional[Iterable[nn.Module]] = None,
                param_dtype: Optional[torch.dtype] = None, reduce_dtype: Optional[torch.dtype] = torch.float32,
                reshard_after_forward: bool = True, layers_per_unit: int = 1) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every decoder layer of ``model`` and then to ``model`` itself, in place.

    Args:
        mesh: a 1-D ``DeviceMesh``; default: every rank of the default process group (``init_distributed``).
        layers: the modules to shard one by one (default :func:`decoder_layers`).
        param_dtype: dtype of the all-gathered weights used by forward/backward (``torch.bfloat16`` halves the
            all-gather traffic; the sharded master weights keep their dtype).  ``None``: the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (float32 by default: gradients are summed in fp32).
        reshard_after_forward: free the gathered weights after each layer's forward (re-gather in backward);
            ``False`` keeps them until backward -- faster, more memory.
        layers_per_unit: consecutive decoder layers sharded as one FSDP unit (one all-gather and one
            reduce-scatter for the group, one set of FSDP hooks).  FSDP's hooks run on the host for every unit,
            and an eager FP8 step is host-bound; 2 halves their number for one more layer's gathered weights in
            memory.  Default 1 (one unit per layer).

    Call it after :func:`fp8train.convert` and before creating the optimizer.  The model must already be on
    its device (``cuda:LOCAL_RANK`` or CPU).  Returns ``model``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_model needs a process group: call fp8train.distributed.init_distributed() "
                           "first (and launch with torchrun for more than one process)")
    if is_sharded(model):
        raise ValueError("this model is already sharded (fully_shard was applied to it)")
    device_types = {p.device.type for p in model.parameters()}
    if len(device_types) > 1 or "meta" in device_types:
        raise ValueError(f"the model's parameters are on {sorted(device_types)}: move the model to one device "
                         "(model.to(device)) before shard_model")
    if mesh is None:
        device_type = device_types.pop() if device_types else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if not isinstance(layers_per_unit, int) or isinstance(layers_per_unit, bool) or layers_per_unit < 1:
        raise ValueError(f"layers_per_unit must be a positive int, got {layers_per_unit!r}")
    layers = list(decoder_layers(model) if layers is None else layers)
    for start in range(0, len(layers), layers_per_unit):
        unit = layers[start:start + layers_per_unit]
        fully_shard(unit[0] if len(unit) == 1 else unit, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    # the root: embeddings, final norm, output head.  Its weights are needed first in forward and last in
    # backward, so keeping them gathered after forward saves one all-gather for little memory.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model
