"""Running calibration samples through a model: batching, forward hooks, and block-by-block replay.

Calibration data is token ids: a LongTensor [samples, tokens] or a list of 1-D LongTensors (any lengths).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["as_batches", "forward_all", "input_hooks", "dense", "decoder_blocks", "BlockReplay"]

Calibration = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_batches(calibration: Calibration, batch_size: int = 8) -> list[torch.Tensor]:
    """Token ids -> a list of [b, T] LongTensor batches (samples of equal length are batched together)."""
    if isinstance(calibration, torch.Tensor):
        samples = [calibration] if calibration.dim() == 2 else [calibration.reshape(1, -1)]
        samples = [row for chunk in samples for row in chunk]
    else:
        samples = [torch.as_tensor(s).reshape(-1) for s in calibration]
    samples = [s.long() for s in samples if s.numel() > 0]
    if not samples:
        raise ValueError("the calibration set is empty: give at least one sample of token ids")
    by_length: dict[int, list[torch.Tensor]] = {}
    for s in samples:
        by_length.setdefault(s.numel(), []).append(s)
    batches = []
    for same in by_length.values():
        for i in range(0, len(same), batch_size):
            batches.append(torch.stack(same[i:i + batch_size]))
    return batches


def dense(x) -> torch.Tensor:
    """A plain tensor from whatever a layer received (fp8train's FP8 activations carry a ``dequantize``)."""
    if type(x) is not torch.Tensor and hasattr(x, "dequantize"):
        x = x.dequantize()
    return x


@torch.no_grad()
def forward_all(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    device = next(model.parameters()).device
    for batch in batches:
        model(input_ids=batch.to(device), use_cache=False)


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call ``fn(name, input)`` with the (first positional) input of every module in ``modules``."""
    handles = []
    for name, module in modules.items():
        def hook(mod, args, _name=name):
            fn(_name, dense(args[0]))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decoder_blocks(model: nn.Module) -> tuple[str, Optional[nn.ModuleList]]:
    """The ModuleList that holds most of the model's linear layers (the decoder layers), with its name."""
    best, best_name, best_count = None, "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_name, best_count = module, name, count
    return best_name, best


class _StopForward(Exception):
    pass


class BlockReplay:
    """Runs calibration data through the decoder blocks one at a time, caching each block's inputs.

    GPTQ quantizes block i from the outputs of the already quantized blocks 0..i-1 (so later layers see, and
    correct for, the earlier layers' error), without re-running the whole model for every block.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]):
        self.blocks = blocks
        self.inputs: list[tuple[tuple, dict]] = []
        device = next(model.parameters()).device

        def capture(module, args, kwargs):
            self.inputs.append((args, kwargs))
            raise _StopForward

        handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    try:
                        model(input_ids=batch.to(device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        if len(self.inputs) != len(batches):
            raise RuntimeError("could not capture the inputs of the first decoder block")

    @torch.no_grad()
    def run(self, index: int) -> None:
        """Forward every cached input through block ``index`` (hooks see its layers' inputs)."""
        for args, kwargs in self.inputs:
            self.blocks[index](*args, **kwargs)

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the cached inputs by block ``index``'s outputs (call after quantizing the block)."""
        new_inputs = []
        for args, kwargs in self.inputs:
            out = self.blocks[index](*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if args:
                new_inputs.append(((hidden, *args[1:]), kwargs))
            else:  # the model passed hidden_states by keyword
                new_inputs.append((args, {**kwargs, "hidden_states": hidden}))
        self.inputs = new_inputs
