"""GPTQ (Frantar et al., arXiv 2210.17323): quantize a weight column by column, feeding each column's rounding
error into the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a linear layer with inputs X (tokens x in) the layer-wise objective ||X W^T - X Q^T||^2 has Hessian
H = 2 X^T X / n.  With the upper Cholesky factor U of H^-1, quantizing column j with error e_j = (w_j - q_j)
and updating the remaining columns by -e_j / U[j, j] * U[j, j:] is the optimal (OBS) correction.  Columns are
processed in blocks of 128 with lazy updates of the rest of the matrix.

Scales: per-channel formats take their scales from the whole weight before the sweep; grouped formats choose
each group's scale when the sweep enters the group (from the already error-corrected weights), as in the
reference algorithm.  With ``act_order=True`` columns are visited in order of decreasing Hessian diagonal and
group scales are fixed up front ("static groups"), which keeps the plain checkpoint layout (no column
permutation index) -- compressed-tensors calls this ``actorder="weight"``.
"""

from __future__ import annotations

import warnings

import torch

from .schemes import Scheme
from .weights import QuantizedWeight, choose_scales, expand_scale

__all__ = ["HessianAccumulator", "gptq_quantize"]


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over the rows x of every input batch seen (float32, or float64 for safety)."""

    def __init__(self, columns: int, device=None, dtype: torch.dtype = torch.float32):
        self.hessian = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.dtype)
        n = x.shape[0]
        if n == 0:
            return
        self.hessian.mul_(self.count / (self.count + n))
        self.count += n
        x = x * (2.0 / self.count) ** 0.5
        self.hessian.addmm_(x.T, x)


def _inverse_cholesky(hessian: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising the damping until H is numerically positive definite."""
    h = hessian.to(torch.float64)
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        damp = damping * (10**attempt) * mean_diag
        factor, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"GPTQ: {name}: Hessian needed damping {damping * 10**attempt:g} to be positive "
                                  "definite; more calibration data usually fixes this", stacklevel=3)
                return upper.to(torch.float32)
    raise RuntimeError(f"GPTQ: the Hessian of {name} is not positive definite even with heavy damping; "
                       "give more (and more varied) calibration samples or use method='rtn'")


def _round_column(column: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes (as float32 values) of one column with its per-row scales."""
    return scheme.weight_format.to_storage(column / scale).float()


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    name: str = "layer",
) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out, in] given the input Hessian [in, in]; returns codes and stored scales."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"GPTQ: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    rows, columns = weight.shape
    group = scheme.group_size
    if group is not None and columns % group:
        raise ValueError(f"GPTQ: {name} has {columns} input columns, not a multiple of the group size {group}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # M2 scales depend on the whole row, so they are fixed before the sweep like per-channel scales
    static_scales = group is None or act_order or scheme.scale_rule == "pow2-shared-max"
    scale = choose_scales(w, scheme) if static_scales else torch.empty(
        rows, columns // group, dtype=torch.bfloat16, device=w.device)
    full_scale = expand_scale(scale.float(), columns).expand(rows, columns) if static_scales else None

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h, full_scale = w[:, perm], h[perm][:, perm], full_scale[:, perm]

    u = _inverse_cholesky(h, damping, name)
    codes = torch.zeros_like(w)
    block_size = max(1, block_size if group is None else (block_size // group or 1) * group)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if not static_scales and col % group == 0:
                g = col // group
                # the group lies inside this block: its columns already carry all earlier corrections
                scale[:, g] = choose_scales(w_block[:, i:i + group], scheme)[:, 0]
            col_scale = full_scale[:, col] if static_scales else scale[:, col // group].float()
            q = _round_column(w_block[:, i], col_scale, scheme)
            codes[:, col] = q
            err = (w_block[:, i] - q * col_scale) / u_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes=scheme.weight_format.to_storage(codes), scale=scale, scheme=scheme)
