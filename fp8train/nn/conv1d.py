"""FP8 version of transformers' ``Conv1D`` (GPT-2 and relatives: a linear layer with a transposed weight).

``FP8Conv1D.from_conv1d(conv)`` keeps the module's ``weight`` (shape ``(in, out)``) and ``bias`` Parameters and
computes ``x @ weight + bias`` with :func:`fp8train.nn.linear.fp8_linear` on the transposed view of the weight,
so the gradient lands in the original Parameter and checkpoints are unchanged.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..recipes import Recipe, resolve_recipe
from .linear import fp8_linear
from .eager_ops import eager_op

__all__ = ["FP8Conv1D"]


class FP8Conv1D(Conv1D):
    @classmethod
    def from_conv1d(cls, conv: Conv1D, recipe: Union[Recipe, str] = "fp8") -> "FP8Conv1D":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = conv.nf, conv.nx
        new.weight = conv.weight
        new.bias = conv.bias
        new.recipe = resolve_recipe(recipe)
        new.train(conv.training)
        return new

    @eager_op  # eager FP8 ops; torch.compile compiles the model around them
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight.t(), self.bias, recipe=self.recipe)

    def __repr__(self) -> str:
        return f"FP8Conv1D(nf={self.nf}, nx={self.nx}, recipe={self.recipe.name})"
