"""Launch plans of the element-wise Triton kernels: how a kernel family cuts its tensor into tiles, how many
warps a program gets, how many programs its looping (amax) pass runs per SM, and how it reads 1x16 group
scales.

A plan changes speed only, never results: every element-wise kernel computes each output element from its own
inputs, and the per-tensor amax is a max, which any order gives exactly -- so any plan is bit-identical
(tests/test_kernel_plans.py checks that under the Triton interpreter).  ``benchmarks/gpu/plans.py`` times the
candidates on the GPU; ``TUNED`` below holds what it measured best, DEFAULT the rest.

Families (one plan each; the optimizer and rotary kernels have plans of their own):

* ``quantize`` -- 1x16 group quantizer, per-tensor amax pass and scale pass (:mod:`.quantize`);
* ``dequantize`` -- per-tensor FP8 -> bf16/fp32 in one pass (the flow norm's output; 1-D blocks of
  ``tile_elements``; measured at a quarter of copy bandwidth in the 953M step, so a sweep candidate);
* ``activation`` -- act(x) forward / backward (:mod:`.activation`);
* ``gated_forward`` -- act(gate) * up forward (:mod:`.gated_product`);
* ``gated_backward`` -- its backward, incl. the fused E5M2 gradients (:mod:`.gated_product`);
* ``gated_forward_predicted`` / ``gated_backward_predicted`` -- the one-pass kernels (and their repair passes)
  of the two with predicted scales (:mod:`fp8train.delayed_scaling`); they read the transposed fields;
* ``product_from_copies`` -- down_proj's input rebuilt from the FP8 gate/up copies (:mod:`.gated_from_copies`);
* ``residual`` -- residual add (+ FP8 copy) (:mod:`.residual`);
* ``norm`` -- the norms' amax programs, per-tensor scale pass and how their backward reads the saved copy
  (:mod:`.rmsnorm`, :mod:`.layernorm`; their row kernels keep their own row plans).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Iterator

import torch

from .launch import next_power_of_2

__all__ = ["Plan", "FAMILIES", "plan", "set_plan", "using_plan", "elementwise_tile", "sm_count", "partials_capacity",
           "partials_block", "warps", "register_cap", "overrides_from_env", "env_spec"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one element-wise kernel family launches.

    ``tile_elements`` -- elements per program tile in row-major passes (columns: a power of two >= 16 and
    <= ``max_cols``, rows fill the rest); ``warps`` -- warps per program there; ``programs_per_sm`` -- programs
    of a pass that loops over tiles (the amax pre-passes; their partial maxima are reduced by every program of
    the next pass); ``transposed_tile`` / ``transposed_warps`` -- (rows, cols) and warps of passes that also
    write a transposed copy; ``gather_scales`` -- read 1x16 group scales once per element (cached loads, no
    reshape of the tile) instead of once per group and broadcast through a [rows, groups, 16] reshape;
    ``max_registers`` -- (one-pass predicted-scale kernels) cap on registers per thread (Triton's ``maxnreg``; 0:
    the compiler's choice): a lower cap fits more programs per SM (a 32 x 128 gated backward tile 1.35 -> 1.09 ms
    at 80 in benchmarks/debug/gated_backward_costs.py), too low a cap spills; ``joint_amax`` -- (the gated
    backward with predicted scales) reduce dgate's and dup's tile maxima in one reduction instead of two."""

    tile_elements: int = 8192
    max_cols: int = 512
    warps: int = 8
    programs_per_sm: int = 4
    transposed_tile: tuple = (64, 128)
    transposed_warps: int = 8
    gather_scales: bool = False
    max_registers: int = 0
    joint_amax: bool = False

    def __post_init__(self):
        for name in ("tile_elements", "max_cols"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Plan.{name} must be a power of two >= 16, got {value}")
        rows, cols = self.transposed_tile
        if rows < 16 or cols < 16 or rows & (rows - 1) or cols & (cols - 1):
            raise ValueError(f"Plan.transposed_tile must be two powers of two >= 16, got {self.transposed_tile}")
        for name in ("warps", "transposed_warps"):
            if getattr(self, name) not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"Plan.{name} must be a power of two from 1 to 32, got {getattr(self, name)}")
        if self.max_registers and not 24 <= self.max_registers <= 255:
            raise ValueError(f"Plan.max_registers must be 0 (no cap) or in 24..255, got {self.max_registers}")
        if not 1 <= self.programs_per_sm <= 64:
            raise ValueError(f"Plan.programs_per_sm must be in 1..64, got {self.programs_per_sm}")


FAMILIES = ("quantize", "dequantize", "activation", "gated_forward", "gated_backward", "gated_forward_predicted",
            "gated_backward_predicted", "product_from_copies", "residual", "norm")

DEFAULT = Plan()

# Measured on an H200 with the 953M model's shapes (benchmarks/results/2026-11-27-h200-session4-plans-sweep.json):
# speed-ups of 1.27x (gated backward), 1.17x (product from copies), 1.24x (gated forward) over DEFAULT.  Smaller
# tiles and fewer warps per program win for the passes that also write a transposed FP8 copy.
TUNED = {
    "gated_backward": Plan(tile_elements=2048, warps=4, transposed_tile=(32, 64)),
    "product_from_copies": Plan(transposed_tile=(32, 128), transposed_warps=4),
    "gated_forward": Plan(tile_elements=4096, transposed_tile=(64, 64)),
    "dequantize": Plan(tile_elements=4096),  # the block it always had; not swept yet
    # one-pass kernels with predicted scales, swept on an H100 (2026-11-28-h100-session9-plans-predicted.md) and,
    # after the vector transposed stores, on an H200 at batch 32 x 2048 (2026-11-28-h200-session14-plans-b32.json):
    # forward 1.12x with a cap of 80 registers, backward 1.22x with (32, 128); the quantizer's row-major passes
    # 1.03x with bigger tiles.  Session 15 (2026-11-28-h200-session15-plans-b32.json): the backward as built now
    # takes 1.38 ms in (32, 128) and 1.10 in (64, 64) with a cap of 64 registers (+0.4 % end to end)
    "gated_forward_predicted": Plan(transposed_tile=(32, 128), max_registers=80),
    "gated_backward_predicted": Plan(transposed_tile=(64, 64), max_registers=64),
    "quantize": Plan(tile_elements=16384, max_cols=2048),
}


def _parse_field(family: str, name: str, text: str):
    """One ``field=value`` of FP8TRAIN_PLANS as the type of that Plan field (tuples as ``32x64``)."""
    fields = {f.name: f for f in dataclasses.fields(Plan)}
    if name not in fields:
        raise ValueError(f"FP8TRAIN_PLANS: {family}.{name} is not a Plan field; fields: {', '.join(fields)}")
    default = getattr(DEFAULT, name)
    try:
        if isinstance(default, bool):
            if text.lower() not in ("0", "1", "true", "false"):
                raise ValueError(text)
            return text.lower() in ("1", "true")
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split("x"))
        return int(text)
    except ValueError:
        raise ValueError(f"FP8TRAIN_PLANS: bad value {text!r} for {family}.{name} (e.g. gather_scales=1, warps=4, "
                         f"transposed_tile=32x64)") from None


def overrides_from_env(text: str) -> dict[str, Plan]:
    """Plans changed by a spec like ``gated_backward_predicted.gather_scales=1,quantize.warps=4`` (the
    ``FP8TRAIN_PLANS`` environment variable: A/B runs of a plan field without code changes)."""
    changes: dict[str, dict] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        family, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"FP8TRAIN_PLANS: expected family.field=value, got {item!r}")
        _check_family(family)
        changes.setdefault(family, {})[name] = _parse_field(family, name, value.strip())
    return {family: dataclasses.replace(TUNED.get(family, DEFAULT), **c) for family, c in changes.items()}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; one of {', '.join(FAMILIES)}")


def env_spec(chosen: dict[str, Plan]) -> str:
    """The FP8TRAIN_PLANS text that sets every field of each given plan (the plans sweep prints it for its best
    plans, so an A/B run of them needs no code change); ``overrides_from_env(env_spec(p)) == p``."""
    items = []
    for family, p in chosen.items():
        _check_family(family)
        for field in dataclasses.fields(Plan):
            value = getattr(p, field.name)
            if isinstance(value, tuple):
                text = "x".join(str(v) for v in value)
            else:
                text = str(int(value)) if isinstance(value, bool) else str(value)
            items.append(f"{family}.{field.name}={text}")
    return ",".join(items)


# FP8TRAIN_PLANS changes shipped plans for this process (A/B runs; docs/performance.md "How to measure")
_plans: dict[str, Plan] = {**TUNED, **overrides_from_env(os.environ.get("FP8TRAIN_PLANS", ""))}


def plan(family: str) -> Plan:
    """The plan kernels of ``family`` launch with."""
    _check_family(family)
    return _plans.get(family, DEFAULT)


def set_plan(family: str, new: Plan | None) -> None:
    """Make ``new`` the plan of ``family`` for this process (None: back to the shipped one, TUNED or DEFAULT)."""
    _check_family(family)
    _plans[family] = new if new is not None else TUNED.get(family, DEFAULT)


@contextlib.contextmanager
def using_plan(family: str, **changes) -> Iterator[Plan]:
    """Run the block with ``family``'s plan changed by ``changes`` (Plan fields); restored afterwards."""
    before = plan(family)
    new = dataclasses.replace(before, **changes)
    set_plan(family, new)
    try:
        yield new
    finally:
        set_plan(family, before)


def elementwise_tile(N: int, family: str, transposed: bool = False, group: int = 16) -> tuple[int, int]:
    """(rows, cols) of a program's tile over a tensor with N columns (cols: whole groups of ``group``)."""
    p = plan(family)
    if transposed:
        return p.transposed_tile
    cols = max(group, min(p.max_cols, next_power_of_2(N)))
    return max(1, p.tile_elements // cols), cols


def register_cap(family: str) -> dict:
    """Launch options capping registers per thread under ``family``'s plan ({} when it sets no cap)."""
    cap = plan(family).max_registers
    return {"maxnreg": cap} if cap else {}


def warps(family: str, transposed: bool = False) -> int:
    p = plan(family)
    return p.transposed_warps if transposed else p.warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    try:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    except Exception:  # noqa: BLE001 - the CPU interpreter has no device properties
        return 132


def sm_count(x: torch.Tensor) -> int:
    """Streaming multiprocessors of the GPU holding ``x`` (132 under the CPU interpreter)."""
    return _sm_count(x.device.index if x.is_cuda and x.device.index is not None else 0)


def partials_capacity(x: torch.Tensor, family: str) -> int:
    """How many programs an amax pass of ``family`` may use on ``x``'s GPU."""
    return max(1, plan(family).programs_per_sm * sm_count(x))


def partials_block(x: torch.Tensor, family: str) -> int:
    """The block the next pass reduces the partial maxima in: a power of two >= the capacity, fixed per GPU
    and plan (a constexpr, so it must not vary with the tensor's size: no recompiles for new shapes)."""
    return next_power_of_2(partials_capacity(x, family))
