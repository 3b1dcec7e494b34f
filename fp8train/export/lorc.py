"""LoRC, low-rank compensation (ZeroQuant-V2, arXiv 2303.08302; used with FP4 weights in ZeroQuant-FP).

The quantization error E = W - W_hat is approximated by its best rank-r factorization: with the SVD
E = U S V^T, take U_r S_r^(1/2) and S_r^(1/2) V_r^T, and serve W_hat + U_r S_r V_r^T.  The factors are tiny
(r * (out + in) values; r = 8 is the usual choice) and help small models most.

In the checkpoint they are extra bf16 tensors ``<layer>.lorc_u`` [out, r] and ``<layer>.lorc_v`` [r, in]:
compressed-tensors readers ignore them (and serve W_hat alone); :func:`fp8train.export.load` adds them back.
"""

from __future__ import annotations

import torch

__all__ = ["low_rank_compensation"]


@torch.no_grad()
def low_rank_compensation(weight: torch.Tensor, dequantized: torch.Tensor, rank: int):
    """Rank-``rank`` factors (u [out, r], v [r, in], bfloat16) of ``weight - dequantized``."""
    if rank < 1:
        raise ValueError(f"LoRC rank must be >= 1, got {rank}")
    error = weight.detach().float() - dequantized.detach().float()
    rank = min(rank, *error.shape)
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(torch.bfloat16), (root.unsqueeze(1) * vh[:rank]).to(torch.bfloat16)
