"""fp8train.AdamW: torch.optim.AdamW with its two moments stored in FP8 (COAT's Dynamic Range Expansion).

    opt = fp8train.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)                 # m, v: E4M3 + DRE
    opt = fp8train.AdamW(params, states="plain", v_format="e5m2")                        # absmax scaling
    opt = fp8train.AdamW(bf16_params, master_weights="bf16_stochastic")                  # no fp32 master copy

Each step, per parameter: dequantize m and v to float32, run torch.optim.AdamW's update (same operations in the
same order: decoupled weight decay, lerp for m, bias corrections, eps after the bias-corrected sqrt(v)), write the
parameter from the *un-requantized* new moments, then requantize m and v.  With ``states="fp32"`` nothing is
quantized and the CPU result equals torch.optim.AdamW bit for bit.

On CUDA (and Triton importable) one fused Triton kernel updates every parameter of a step in a single launch per
kind of tensor (fp8train/kernels/adamw.py); elsewhere the plain-torch reference below runs, parameter by parameter.

Non-finite values: an element whose gradient is NaN/inf -- or whose update would overflow (|m| or v above
3e38) -- is skipped: its parameter value and moments keep their previous values, so the stored state never turns
NaN.  Each step with skipped elements raises a ``RuntimeWarning`` (on CPU at once; on CUDA at a later ``step()``,
read without a host sync) and ``nonfinite_skipped()`` returns the total count.  Everything else in the step is
updated normally.

Sharded parameters (FSDP2 ``fully_shard``, any DTensor): the state of a DTensor parameter is made of DTensors
with the parameter's mesh and placements -- the FP8 moments shaped like the parameter, the per-group metadata
``(*shape[:-1], groups)`` sharded along the same leading dims -- and the update runs on the local shards
(``to_local()``), Triton kernel included.  Scaling groups run along the last dim, so FSDP2's row sharding
(``Shard(0)`` of a matrix) keeps every group on one rank and the result does not depend on the world size.  A
parameter sharded *along its last dim* -- FSDP2 shards 1-D parameters (norm weights, biases) on dim 0 -- would
cut groups at world-size dependent places; such parameters keep unquantized float32 moments, sharded like the
parameter (see ``storage_mode``).  They are a tiny fraction of a model (2 x hidden per decoder layer).  The
state dict then works with ``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, save on N ranks, load on M): see fp8train/distributed/checkpoint.py.
"""

from __future__ import annotations

import collections
import functools
import os
import warnings
from typing import Callable, Optional

import torch

from ..nn import weight_amax
from . import moment_storage as storage

__all__ = ["AdamW", "OVERFLOW_LIMIT"]

# Moments above this are treated as an overflow: the bfloat16 group maximum (rounded up) must stay finite.
OVERFLOW_LIMIT = 3.0e38
_MASTER_WEIGHTS = (None, "bf16_stochastic")
_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_ROUNDING_SEED = 0x5EED


def adamw_math(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """One torch.optim.AdamW update, out of place, with torch's own operations in torch's order (same bits).

    Returns ``(param, exp_avg, exp_avg_sq)`` as new float32 tensors.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    new_param = param * (1 - lr * weight_decay) if weight_decay != 0 else param.clone()
    new_exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    new_exp_avg_sq = (exp_avg_sq * beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (new_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    new_param.addcdiv_(new_exp_avg, denom, value=-step_size)
    return new_param, new_exp_avg, new_exp_avg_sq


def kernel_scalars(step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """The per-tensor float scalars the fused kernel needs, computed in float64 like torch does on the host:
    (decay, lerp weight, beta2, 1 - beta2, -step size, sqrt of bias correction 2, eps)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return (1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, -lr / bias_correction1, bias_correction2**0.5, eps)


def rounding_seed(step: float, salt: int) -> int:
    """The seed of stochastic rounding for one parameter (or one fused launch) at optimizer step ``step``.

    A function of the step count, which the state dict restores, instead of a random stream whose position
    would have to be checkpointed too: a resumed run rounds exactly like an uninterrupted one.  Data-parallel
    replicas get the same seeds, so replicated parameters stay identical.  The global RNG is left alone.
    """
    mixed = (int(step) * 0x9E3779B1) ^ (salt * 0x85EBCA77) ^ _ROUNDING_SEED
    return mixed & 0x7FFFFFFF


def stochastic_round_to_bf16(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round float32 ``x`` to bfloat16 up or down with probability proportional to the distance (unbiased).

    Adds 16 uniform random bits below bfloat16's last mantissa bit and truncates: P(round up) = fraction / 2**16.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x.float()).to(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# -- sharded (DTensor) parameters ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _dtensor_type():
    """torch.distributed.tensor.DTensor, or None where torch has no distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage, so in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shards_last_dim(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor split along its last dim (where the moments' scaling groups run)."""
    if not is_dtensor(p) or p.dim() == 0:
        return False
    return any(pl.is_shard() and pl.dim % p.dim() == p.dim() - 1 for pl in p.placements)


def storage_mode(p: torch.Tensor, states: str) -> str:
    """How the moments of ``p`` are stored: the group's ``states``, except float32 for a parameter sharded along
    its last dim (its groups would be cut at world-size dependent places; decided from the placement, not the mesh
    size, so runs on 1, 2 or 4 ranks store the same thing and checkpoints move between them)."""
    return "fp32" if states != "fp32" and shards_last_dim(p) else states


def _shard_like(p: torch.Tensor, local: torch.Tensor, global_shape: torch.Size) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor with ``p``'s mesh and placements and the given global shape."""
    from torch.distributed.tensor import DTensor

    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=global_shape,
                              stride=stride)


def _placed_like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A copy of a loaded state tensor on ``p``'s device, sharded like ``p`` when ``p`` is a DTensor.

    A full (plain) tensor loaded into a sharded parameter's state is cut into this rank's shard (every rank must
    pass the full tensor); a sharded one loaded into an unsharded parameter's state is gathered (a collective,
    which every rank runs in ``load_state_dict`` in the same order).
    """
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        if not is_dtensor(value):  # every rank holds the full tensor: cut out the local shard, no communication
            try:
                return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            except TypeError:  # torch without src_data_rank: rank 0's copy is scattered
                return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = _as_bytes(value, lambda v: v.redistribute(p.device_mesh, p.placements))
        return value.to(device=p.device, copy=True)
    if is_dtensor(value):
        value = _as_bytes(value, lambda v: v.full_tensor())
    return value.to(device=p.device, copy=True)


def _entry_names(mode: str) -> set:
    names = {"step"}
    for name in storage.MOMENT_NAMES:
        names.update(storage.expected_entries(name, (1,), mode, "e4m3", 128))
    return names


def _reencode_moments(saved: dict, shape: torch.Size, saved_mode: str, mode: str, group: dict) -> dict:
    """Full (unsharded) state entries of one parameter re-encoded from ``saved_mode`` to ``mode``: decoding is
    exact, FP8 encoding rounds the moments as one optimizer step would.  Sharded entries are gathered first."""
    full = {key: _as_bytes(v, lambda t: t.full_tensor()) if is_dtensor(v) else v for key, v in saved.items()}
    out = {"step": full["step"]}
    for name, option in zip(storage.MOMENT_NAMES, ("m_format", "v_format")):
        values = storage.decode(full, name, saved_mode, group[option], group["group_size"]).float().clone()
        target = storage.allocate(name, torch.empty(shape, device=values.device), mode, group[option],
                                  group["group_size"])
        storage.encode_into(target, name, values, mode, group[option], group["group_size"])
        out.update(target)
    return out


def _as_bytes(value, collective):
    """Run a DTensor collective on FP8 data viewed as uint8 (gloo has no float8 types), then view it back."""
    if value.dtype.itemsize != 1 or value.dtype == torch.uint8:
        return collective(value)
    from torch.distributed.tensor import DTensor

    as_uint8 = DTensor.from_local(value.to_local().view(torch.uint8), value.device_mesh, value.placements,
                                  run_check=False, shape=value.shape, stride=value.stride())
    result = collective(as_uint8)
    if is_dtensor(result):
        return DTensor.from_local(result.to_local().view(value.dtype), result.device_mesh, result.placements,
                                  run_check=False, shape=result.shape, stride=result.stride())
    return result.view(value.dtype)


class AdamW(torch.optim.Optimizer):
    """AdamW with FP8 moments.  Drop-in for ``torch.optim.AdamW`` (same defaults and update).

    Args:
        params, lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, default 1e-2).
        states: ``"dre"`` (FP8 + Dynamic Range Expansion, default), ``"plain"`` (FP8 with a bf16 absmax per group)
            or ``"fp32"`` (unquantized; equals torch.optim.AdamW bit for bit on CPU).
        m_format, v_format: ``"e4m3"`` (default) or ``"e5m2"`` for the first / second moment.
        group_size: elements per scaling group along each parameter's last dim (power of two, 16..1024).
        master_weights: ``None`` (the parameter itself is the master copy: fp32, or bf16 rounded to nearest) or
            ``"bf16_stochastic"`` (bf16 parameters, update computed in fp32 and stochastically rounded).
        amsgrad: must be False (not implemented).
        maximize: maximize the objective instead of minimizing.
        fused: ``None`` picks the Triton kernel for CUDA parameters when Triton imports, else the torch reference;
            ``True`` requires the kernel; ``False`` always uses the torch reference.

    Every option except ``fused`` may differ between parameter groups.  ``kernel_tile`` (elements per program,
    warps) tunes the Triton kernel's launch; the results do not depend on it.

    Published weight amaxes: for every parameter that an FP8 linear layer quantizes per tensor (its weight,
    marked by :class:`fp8train.nn.linear.FP8Linear`), the step also computes max |w| of the values it wrote --
    the rounded bf16 values with bf16 parameters -- into a slot of this optimizer (in the fused kernel: one
    atomic max per program, no extra launch) and publishes it (:mod:`fp8train.nn.weight_amax`), so the next
    forward quantizes that weight without an amax pass, with the same bits.  Slots are allocated once, so a
    CUDA graph captured after the optimizer was built reads each step's values.  The amaxes are published at
    construction too; after changing weights outside ``step()`` (``model.load_state_dict``) eager forwards
    notice by the weight's version counter, but a captured CUDA graph does not: call
    :meth:`publish_weight_amax` before replaying it.  Sharded (DTensor) parameters publish nothing.
    """

    kernel_tile: Optional[tuple] = None  # None: fp8train.kernels.adamw.DEFAULT_TILE

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, states: str = "dre", m_format: str = "e4m3", v_format: str = "e4m3", group_size: int = 128,
                 master_weights: Optional[str] = None, amsgrad: bool = False, maximize: bool = False,
                 fused: Optional[bool] = None):
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, states=states, m_format=m_format,
                        v_format=v_format, group_size=group_size, master_weights=master_weights, amsgrad=amsgrad,
                        maximize=maximize)
        self._steps_taken = 0
        self._nonfinite_total = 0
        self._nonfinite_pending: list = []  # (host count tensor, cuda event, step number) not read yet
        self._backward_hooks: list = []  # handles while the update runs inside backward (step_in_backward)
        self._backward_counts: list = []  # skipped-element counts of those updates, queued by the next step()
        self._amax_slots: dict = {}  # FP8-linear weight -> its published-amax slot (fp8train.nn.weight_amax)
        self._amax_generation = None  # weight_amax.generation() when the slots were last matched to the params
        self._amax_epoch = 0  # tag of the latest slot writes: each publishing round uses a larger one
        super().__init__(params, defaults)
        self.publish_weight_amax()

    # -- options -----------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise
        self._amax_generation = None  # new parameters: look for FP8-linear weights among them

    @staticmethod
    def _validate_group(group: dict) -> None:
        if group["amsgrad"]:
            raise ValueError("fp8train.AdamW does not implement amsgrad (it would need a full-precision running "
                             "max of v); use torch.optim.AdamW(amsgrad=True) or amsgrad=False")
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        if not (lr >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and group["eps"] >= 0 and group["weight_decay"] >= 0):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={group['betas']}, eps={group['eps']}, "
                             f"weight_decay={group['weight_decay']}: need lr, eps, weight_decay >= 0 and 0 <= betas < 1")
        if group["states"] not in storage.STATE_MODES:
            raise ValueError(f"states must be one of {storage.STATE_MODES}, got {group['states']!r}")
        group["m_format"] = storage.parse_moment_format(group["m_format"])
        group["v_format"] = storage.parse_moment_format(group["v_format"])
        size = group["group_size"]
        if not (isinstance(size, int) and 16 <= size <= 1024 and size & (size - 1) == 0):
            raise ValueError(f"group_size must be a power of two between 16 and 1024, got {size!r}")
        if group["master_weights"] not in _MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {_MASTER_WEIGHTS}, got {group['master_weights']!r}")
        for p in group["params"]:
            if p.is_complex():
                raise TypeError("fp8train.AdamW does not support complex parameters; register "
                                "torch.view_as_real(param) as the parameter or use torch.optim.AdamW")
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"fp8train.AdamW updates float32 or bfloat16 parameters, got {p.dtype}; "
                                "cast the model with model.float() or model.bfloat16()")
            if group["master_weights"] == "bf16_stochastic" and p.dtype != torch.bfloat16:
                raise TypeError(f"master_weights='bf16_stochastic' keeps bfloat16 parameters, got {p.dtype}; cast "
                                "the model with model.bfloat16() first, or use master_weights=None for fp32 params")

    # -- state ---------------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            mode, local = storage_mode(p, group["states"]), local_view(p)
            for name, fmt in zip(storage.MOMENT_NAMES, (group["m_format"], group["v_format"])):
                entries = storage.allocate(name, local, mode, fmt, group["group_size"])
                if local is not p:  # sharded parameter: the state is sharded the same way (see module doc)
                    shapes = storage.expected_entries(name, p.shape, mode, fmt, group["group_size"])
                    entries = {key: _shard_like(p, value, shapes[key][0]) for key, value in entries.items()}
                state.update(entries)
        return state

    def state_bytes(self) -> int:
        """Bytes of every parameter's m and v with their metadata, allocated or not yet (step counters excluded).

        For sharded (DTensor) parameters: the bytes this rank holds.
        """
        return sum(storage.state_nbytes(local_view(p).shape, storage_mode(p, g["states"]), g["m_format"],
                                        g["v_format"], g["group_size"])
                   for g in self.param_groups for p in g["params"])

    def state_bytes_per_param(self) -> float:
        n = sum(local_view(p).numel() for g in self.param_groups for p in g["params"])
        return self.state_bytes() / n if n else 0.0

    # -- published weight amaxes (fp8train.nn.weight_amax) ---------------------------------------------------
    def _weight_amax_slot(self, p: torch.Tensor) -> Optional["weight_amax.Slot"]:
        """The slot this optimizer publishes ``p``'s amax in, or None when ``p`` is not an FP8-linear weight, is
        sharded, or publishing is off.  Slots are made once per parameter (again only if it moves device)."""
        if not weight_amax.is_enabled():
            return None
        if self._amax_generation != weight_amax.generation():  # new FP8-linear weights were marked since
            self._amax_generation = weight_amax.generation()
            for group in self.param_groups:
                for q in group["params"]:
                    if q not in self._amax_slots and weight_amax.wants(q) and not is_dtensor(q):
                        self._amax_slots[q] = weight_amax.new_slot(q)
        slot = self._amax_slots.get(p)
        # the device is only asked when the storage moved since the last publish (host time: this runs per step)
        if slot is not None and p.data_ptr() != slot.data_ptr and p.device != slot.word.device:
            slot = self._amax_slots[p] = weight_amax.new_slot(p)
        return slot

    @torch.no_grad()
    def publish_weight_amax(self) -> None:
        """Compute and publish the amax of every FP8-linear weight from its current values (torch ops, no host
        sync).  Done at construction and, for the weights it updates, by every ``step()``; call it after
        changing weights outside the optimizer when a captured CUDA graph reads them (eager forwards notice the
        change themselves and compute the amax until the next step)."""
        self._amax_epoch += 1
        for group in self.param_groups:
            for p in group["params"]:
                slot = self._weight_amax_slot(p)
                if slot is not None and p.numel():
                    weight_amax.write_slot(slot, p.abs().amax(), self._amax_epoch)
                    weight_amax.publish(p, slot)

    # -- step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None and p.grad.is_sparse for g in self.param_groups for p in g["params"]):
            raise TypeError("fp8train.AdamW does not support sparse gradients; use "
                            "torch.optim.SparseAdam for them or nn.Embedding(sparse=False)")
        self._read_nonfinite(block=False)
        self._steps_taken += 1
        counts = self._update([(p, group) for group in self.param_groups for p in group["params"]
                               if p.grad is not None])
        counts, self._backward_counts = self._backward_counts + counts, []
        if counts:
            self._queue_nonfinite(counts)
        return loss

    def _update(self, work_items: list, salt: int = 0) -> list:
        """Update each ``(parameter, group)`` from its ``.grad``; returns the skipped-element counts (tensors).

        ``salt`` offsets the stochastic-rounding seeds (a parameter's index when parameters update one by one)."""
        fused_work: dict = {}
        counts = []
        self._amax_epoch += 1  # the published-amax slots written by this update carry this tag
        for p, group in work_items:
            state = self._init_state(p, group)
            state["step"] += 1
            # sharded parameters: update this rank's shard (local views share storage with the DTensors)
            param, grad = local_view(p), local_view(p.grad)
            local_state = {key: local_view(value) for key, value in state.items()}
            mode = storage_mode(p, group["states"])
            if param.numel() == 0:
                continue
            slot = self._weight_amax_slot(p)  # None for sharded parameters: param is p otherwise
            if self._use_kernel(param, grad):
                key = (param.device, param.dtype, grad.dtype, mode, group["m_format"], group["v_format"],
                       group["group_size"], group["master_weights"] == "bf16_stochastic", group["maximize"])
                fused_work.setdefault(key, []).append((param, grad, group, local_state, slot))
            else:
                counts.append(self._reference_update(param, grad, group, local_state, mode, salt=salt + len(counts)))
                if slot is not None:
                    weight_amax.write_slot(slot, param.abs().amax(), self._amax_epoch)
                    weight_amax.publish(param, slot)
        for launch, (key, work) in enumerate(fused_work.items()):
            counts.append(self._fused_update(key, work, salt + launch))
        return counts

    # -- the update inside backward --------------------------------------------------------------------------
    def step_in_backward(self) -> "AdamW":
        """Update every parameter as soon as backward has accumulated its gradient, then free the gradient.

        The model then never holds a full set of gradients: at most the ones of the module backward is in (the
        memory of one gradient buffer -- 2 bytes per parameter with bf16 gradients -- is saved).  Each backward
        *is* an optimizer step, so gradient accumulation, gradient clipping (it needs every gradient first) and
        ``GradScaler`` do not combine with it.  Keep calling ``step()`` after backward as usual: it then only
        updates parameters whose gradient the hooks did not take and does the non-finite bookkeeping;
        ``zero_grad()`` and the learning-rate schedule work as before.  Parameters update one at a time (one
        kernel launch each on CUDA, instead of one for all).  Not under CUDA-graph capture (the host-side step
        count would be frozen into the graph) nor for sharded (FSDP2) parameters, whose gradients arrive after
        the reduce-scatter; both raise.  ``stop_step_in_backward()`` removes the hooks.
        """
        if self._backward_hooks:
            return self
        for group in self.param_groups:
            for p in group["params"]:
                if is_dtensor(p):
                    raise ValueError("step_in_backward does not support sharded (FSDP2 / DTensor) parameters: "
                                     "their gradients are reduce-scattered after the hook would fire; call step() "
                                     "after backward instead")
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._backward_hooks.append(p.register_post_accumulate_grad_hook(
                        functools.partial(self._update_in_backward, group=group, salt=index)))
                index += 1
        return self

    def stop_step_in_backward(self) -> None:
        for handle in self._backward_hooks:
            handle.remove()
        self._backward_hooks = []

    @torch.no_grad()
    def _update_in_backward(self, p: torch.Tensor, group: dict, salt: int) -> None:
        if p.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("step_in_backward cannot run inside a CUDA-graph capture (the step count and "
                               "learning rate would be frozen into the graph); call stop_step_in_backward() "
                               "before capturing and step() after each replay")
        if p.grad.is_sparse:
            raise TypeError("fp8train.AdamW does not support sparse gradients")
        self._backward_counts.extend(self._update([(p, group)], salt=salt))
        p.grad = None

    def _use_kernel(self, p: torch.Tensor, grad: torch.Tensor) -> bool:
        if self.fused is False:
            return False
        if p.is_cuda:
            eligible = p.is_contiguous() and grad.is_contiguous() and \
                grad.dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_available()
        else:  # CPU tensors run the kernel only in Triton's interpreter, and only when asked to (tests)
            eligible = bool(self.fused) and os.environ.get("TRITON_INTERPRET") == "1" and p.is_contiguous()
        if self.fused and not eligible:
            raise RuntimeError("fused=True needs contiguous CUDA parameters and gradients and an importable triton; "
                               "use fused=None to fall back to the torch reference")
        return eligible


    @staticmethod
    def _hyper(group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def _reference_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict,
                          mode: str, salt: int = 0) -> torch.Tensor:
        """Plain-torch update of one (local) parameter; returns the number of skipped (non-finite) elements."""
        size = group["group_size"]
        grad = grad if not group["maximize"] else -grad
        grad = grad.float()
        param = p.detach() if p.dtype == torch.float32 else p.detach().float()
        m = storage.decode(state, "exp_avg", mode, group["m_format"], size)
        v = storage.decode(state, "exp_avg_sq", mode, group["v_format"], size)
        new_p, new_m, new_v = adamw_math(param, grad, m, v, step=state["step"].item(), **self._hyper(group))
        ok = torch.isfinite(new_p) & (new_m.abs() <= OVERFLOW_LIMIT) & (new_v <= OVERFLOW_LIMIT)
        n_bad = ok.numel() - ok.sum()
        new_p = torch.where(ok, new_p, param)
        new_m = torch.where(ok, new_m, m)
        new_v = torch.where(ok, new_v, v)
        if group["master_weights"] == "bf16_stochastic":
            generator = torch.Generator(device=p.device).manual_seed(rounding_seed(state["step"].item(), salt))
            p.copy_(stochastic_round_to_bf16(new_p, generator))
        else:
            p.copy_(new_p)
        storage.encode_into(state, "exp_avg", new_m, mode, group["m_format"], size)
        storage.encode_into(state, "exp_avg_sq", new_v, mode, group["v_format"], size)
        return n_bad

    def _fused_update(self, key: tuple, work: list, launch: int = 0) -> torch.Tensor:
        from ..kernels.adamw import DEFAULT_TILE, fused_adamw_step

        device, _, _, mode, m_format, v_format, group_size, stochastic, maximize = key
        scalars = [kernel_scalars(state["step"].item(), **self._hyper(group)) for _, _, group, state, _ in work]
        # one seed per launch (the kernel mixes in each tensor's index and element offset)
        seed = rounding_seed(work[0][3]["step"].item(), launch) if stochastic else 0
        count = fused_adamw_step([w[0] for w in work], [w[1] for w in work], [w[3] for w in work],
                                 scalars, mode=mode, m_format=m_format, v_format=v_format, group_size=group_size,
                                 stochastic_rounding=stochastic, maximize=maximize, seed=seed,
                                 tile=self.kernel_tile or DEFAULT_TILE,
                                 amax_slots=[w[4].word if w[4] is not None else None for w in work],
                                 amax_epoch=self._amax_epoch)
        for param, _, _, _, slot in work:
            # the kernel wrote through raw pointers: tell version-keyed caches (FP8 weights), then record the
            # version the published amax belongs to
            torch.autograd.graph.increment_version(param)
            if slot is not None:
                weight_amax.publish(param, slot)
        return count

    # -- non-finite bookkeeping ------------------------------------------------------------------------------
    def _queue_nonfinite(self, counts: list) -> None:
        step = self._steps_taken
        by_device: dict = {}
        for c in counts:
            c = torch.as_tensor(c)
            by_device.setdefault(c.device, []).append(c.reshape(()).to(torch.int64))
        for device, cs in by_device.items():
            total = torch.stack(cs).sum()
            if device.type == "cuda":
                host = total.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._nonfinite_pending.append((host, event, step))
            else:
                self._nonfinite_pending.append((total, None, step))
        self._read_nonfinite(block=False)

    def _read_nonfinite(self, block: bool) -> None:
        still_pending = []
        for host, event, step in self._nonfinite_pending:
            if event is not None and not block and not event.query():
                still_pending.append((host, event, step))
                continue
            if event is not None:
                event.synchronize()
            n = int(host.item())
            if n:
                self._nonfinite_total += n
                warnings.warn(f"fp8train.AdamW step {step}: skipped {n} elements whose gradient was NaN/inf or "
                              "whose update overflowed; their parameters and moments kept their previous values",
                              RuntimeWarning, stacklevel=3)
        self._nonfinite_pending = still_pending

    def nonfinite_skipped(self) -> int:
        """Total number of parameter elements skipped because of non-finite gradients (waits for the GPU)."""
        self._read_nonfinite(block=True)
        return self._nonfinite_total

    # -- checkpoints ---------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict saved by ``state_dict()``; tensors keep their saved dtypes (FP8, bf16, uint8).

        The parameter groups must match this optimizer's in number, sizes, parameter shapes and storage options
        (states, formats, group_size, master_weights); anything else raises ``ValueError``.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}; build the optimizer with the same groups as when it was saved")
        index_to_param = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"parameter group {gi} has {len(saved['params'])} parameters in the state dict and "
                                 f"{len(group['params'])} here; build the optimizer with the same parameters")
            for option in ("states", "m_format", "v_format", "group_size", "master_weights"):
                if saved.get(option) != group[option]:
                    raise ValueError(f"parameter group {gi} was saved with {option}={saved.get(option)!r} but this "
                                     f"optimizer has {option}={group[option]!r}; create the optimizer with the saved "
                                     "options (or start its state from scratch)")
            index_to_param.update(zip(saved["params"], group["params"]))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        new_state: dict = collections.defaultdict(dict)  # like torch: step() adds state for new params
        for index, saved_state in state_dict["state"].items():
            if index not in index_to_param:
                raise ValueError(f"the state dict has state for parameter index {index}, which no group lists")
            p = index_to_param[index]
            group = group_of[id(p)]
            mode = storage_mode(p, group["states"])
            expected = {"step": (torch.Size(()), torch.float32)}
            for name, fmt in zip(storage.MOMENT_NAMES, (group["m_format"], group["v_format"])):
                expected.update(storage.expected_entries(name, p.shape, mode, fmt, group["group_size"]))
            if set(saved_state) != set(expected):
                # a parameter saved sharded along its last dim (float32 moments) loaded unsharded, or the reverse
                other = "fp32" if mode != "fp32" else group["states"]
                if other != mode and set(saved_state) == _entry_names(other):
                    saved_state = _reencode_moments(saved_state, p.shape, other, mode, group)
                else:
                    raise ValueError(f"state of parameter {index} has entries {sorted(saved_state)}, expected "
                                     f"{sorted(expected)} for states={mode!r}")
            loaded = {}
            for key, (shape, dtype) in expected.items():
                value = saved_state[key]
                if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != dtype:
                    got = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)
                    raise ValueError(f"state '{key}' of parameter {index} is {got}, expected ({tuple(shape)}, {dtype})"
                                     f" for a parameter of shape {tuple(p.shape)}; the checkpoint belongs to another "
                                     "model or optimizer configuration")
                if key == "step":
                    loaded[key] = local_view(value).to(device="cpu", copy=True)
                else:
                    loaded[key] = _placed_like(p, value)
            new_state[p] = loaded
        param_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            new_group = {k: v for k, v in saved.items() if k != "params"}
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]
            param_groups.append(new_group)
        self.__setstate__({"state": new_state, "param_groups": param_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for attr, default in (("_steps_taken", 0), ("_nonfinite_total", 0), ("_nonfinite_pending", []),
                              ("_amax_slots", {}), ("_amax_generation", None), ("_amax_epoch", 0)):
            if not hasattr(self, attr):
                setattr(self, attr, default)
        if not hasattr(self, "fused"):
            self.fused = None
