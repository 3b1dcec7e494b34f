"""``fp8train.convert(model, recipe)``: turn a PyTorch / Hugging Face model into an FP8-training one, in place.

    model = fp8train.convert(model, recipe="coat")                 # "bf16" | "fp8" | "coat" | a Recipe
    model = fp8train.convert(model, "fp8", exclude=["*.down_proj"])  # keep some layers in bf16

What it does (details and the saved-tensor accounting in docs/convert.md):

1. **Fast path** (recipe "coat"): Llama-style decoder blocks -- recognized by structure, see
   :mod:`fp8train.nn.adapters` -- get the precision flow of :mod:`fp8train.nn.precision_flow`.  With any FP8
   recipe their model family also gets the fused, bit-identical rotary embedding (``Recipe.fused_rotary``).
2. **Generic path**, everything else: ``nn.Linear`` (and GPT-2's ``Conv1D``) -> FP8 linear; with compressed
   activations also RMSNorm-like modules -> ``FP8RMSNorm``, ``nn.LayerNorm`` -> ``FP8LayerNorm``,
   SiLU/GELU modules -> ``FP8Activation``, gated MLPs (gate_proj/up_proj/down_proj/act_fn) -> ``FlowMLP``,
   fused ones (gate_up_proj, as Phi-3) -> ``FP8GatedMLP``.
3. Left in bf16: embeddings, output heads (``Recipe.keep_bf16``: lm_head, score, classifier, ...), linears
   whose weight is tied to an embedding, the attention core, anything matched by ``exclude``.
4. ``Recipe.fp8_attention_saves``: Llama-style attention modules of Hugging Face models using ``"sdpa"`` switch
   to the FP8-saving attention of :mod:`fp8train.nn.fp8_saved_attention` (through transformers' attention
   registry: the config's ``_attn_implementation`` and a mark on each module; no forked classes).
   Otherwise, where FlashAttention-4 is installed and the GPU is sm90/sm100 (``Recipe.flash_attention``), they
   switch to it the same way (:mod:`fp8train.nn.flash_attention`; SDPA for every call it does not cover).

Every replacement reuses the original Parameters, so parameter names, state_dict keys, optimizer param
groups and checkpoints are unchanged.  A linear whose in/out features are not multiples of 16 (what FP8
GEMMs need) stays bf16 with a warning naming it; module types with parameters that fp8train does not know
are left alone with one summary warning.  Converting an already converted model is a no-op.
"""

from __future__ import annotations

import collections
import fnmatch
import re
import warnings
from typing import Callable, Iterable, Optional, Union

import torch.nn as nn

from .recipes import Recipe, resolve_recipe

__all__ = ["convert", "ConversionReport"]

ExcludeRule = Union[str, "re.Pattern", Callable[[str, nn.Module], bool]]

_MARK = "_fp8train_recipe"
_REPORT = "_fp8train_report"


class ConversionReport(dict):
    """What convert did (``model._fp8train_report``): counts per replacement and lists of kept layers."""

    def summary(self) -> str:
        parts = [f"{k}: {v}" for k, v in self.get("converted", {}).items()]
        if self.get("fallback"):
            parts.append(f"bf16 fallback (shape): {len(self['fallback'])}")
        if self.get("excluded"):
            parts.append(f"excluded: {len(self['excluded'])}")
        if self.get("fused_rotary"):
            parts.append("fused rotary: " + ", ".join(m.rsplit(".", 1)[-1] for m in self["fused_rotary"]))
        if self.get("fused_qkv"):
            parts.append(f"fused q/k/v: {self['fused_qkv']} blocks")
        if self.get("fused_residual"):
            parts.append(f"fused residual stream: {self['fused_residual']} blocks")
        if self.get("fp8_attention_saves"):
            parts.append(f"FP8-saved attention: {len(self['fp8_attention_saves']['installed'])}")
        if self.get("flash_attention", {}).get("installed"):
            parts.append(f"FlashAttention-4: {len(self['flash_attention']['installed'])}")
        return ", ".join(parts) or "nothing converted"


def convert(model: nn.Module, recipe: Union[str, Recipe, None] = "coat", *,
            exclude: Optional[Union[ExcludeRule, Iterable[ExcludeRule]]] = None) -> nn.Module:
    """Convert ``model`` in place for FP8 training under ``recipe`` and return it.

    ``exclude``: module names to keep in bf16 -- glob patterns (``"model.layers.0.*"``, ``"*down_proj"``;
    matched against the full dotted name and against the last component), compiled regular expressions
    (``re.compile(r"layers\\.(0|1)\\.")``, searched in the full name), or a predicate ``f(name, module) ->
    bool``; one rule or a list of them.  An excluded module keeps its whole subtree.
    """
    recipe = resolve_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    previous = getattr(model, _MARK, None)
    if previous is not None:
        if previous != recipe:
            raise ValueError(f"this model was already converted with recipe {previous.name!r}; converting it "
                             f"again with {recipe.name!r} is not supported -- convert a fresh copy of the model")
        return model  # converting twice is a no-op
    if recipe.is_noop:
        return model
    report = None
    if recipe.fp8_linears or recipe.compress_activations:
        converter = _Converter(model, recipe, exclude)
        converter.run()
        report = converter.report
        if recipe.cache_fp8_weights:
            from .nn.fused_projections import fused_group
            from .nn.linear import FP8Linear
            from .nn.weight_cache import group_weights

            # members of a fused q/k/v group quantize their stack each forward, not their own weights
            group_weights([m.weight for m in model.modules() if isinstance(m, FP8Linear) and fused_group(m) is None])
    if recipe.chunked_loss:
        from .nn.chunked_cross_entropy import enable_chunked_loss

        enable_chunked_loss(model, chunk_rows=recipe.loss_chunk_rows)
    if recipe.fp8_attention_saves:
        from .nn.fp8_saved_attention import install_on_model

        rules = _compile_rules(exclude) + _compile_rules(list(recipe.keep_bf16))
        if report is None:
            report = _empty_report()
        report["fp8_attention_saves"] = install_on_model(
            model, lambda name, module: any(rule(name, module) for rule in rules))
    elif recipe.flash_attention is not False:
        from .nn.flash_attention import install_on_model as install_flash

        rules = _compile_rules(exclude)
        if report is None:
            report = _empty_report()
        report["flash_attention"] = install_flash(
            model, lambda name, module: any(rule(name, module) for rule in rules), warn=recipe.flash_attention is True)
    object.__setattr__(model, _MARK, recipe)
    object.__setattr__(model, _REPORT, report)
    return model


def _empty_report() -> ConversionReport:
    return ConversionReport(converted=collections.Counter(), fallback=[], excluded=[], tied=[],
                            unknown=collections.Counter(), fast_path_blocks=0, fused_rotary=[])


def _compile_rules(exclude) -> list[Callable[[str, nn.Module], bool]]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, re.Pattern)) or callable(exclude):
        exclude = [exclude]
    rules = []
    for rule in exclude:
        if isinstance(rule, re.Pattern):
            rules.append(lambda name, module, rule=rule: rule.search(name) is not None)
        elif isinstance(rule, str):
            rules.append(lambda name, module, rule=rule: _glob(name, rule))
        elif callable(rule):
            rules.append(lambda name, module, rule=rule: bool(rule(name, module)))
        else:
            raise TypeError(f"exclude rules must be glob strings, compiled regexes or callables, got {rule!r}")
    return rules


def _glob(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def _fp8_module_types() -> tuple:
    from .nn.activation import FP8Activation
    from .nn.gated_mlp import FP8GatedMLP
    from .nn.layernorm import FP8LayerNorm
    from .nn.linear import FP8Linear
    from .nn.precision_flow import FlowMLP
    from .nn.rmsnorm import FP8RMSNorm

    from .lab.simulated_linear import SimulatedLinear

    types = (FP8Linear, FP8RMSNorm, FP8LayerNorm, FP8Activation, FP8GatedMLP, FlowMLP, SimulatedLinear)
    return types + ((_fp8_conv1d_class(),) if _conv1d_class() is not None else ())


def _conv1d_class():
    """transformers' Conv1D, if transformers is loaded (a model containing one has imported it)."""
    import sys

    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional for convert
        return None
    return Conv1D


def _fp8_conv1d_class():
    from .nn.conv1d import FP8Conv1D

    return FP8Conv1D


class _Converter:
    """Walks the model once; adapters call back into it (``convert_linear``, ``replace``, ``is_excluded``)."""

    def __init__(self, model: nn.Module, recipe: Recipe, exclude):
        self.model = model
        self.recipe = recipe
        self.rules = _compile_rules(exclude) + _compile_rules(list(recipe.keep_bf16))
        self.names = {id(m): name for name, m in model.named_modules()}
        embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        self.tied = embedding_weights
        self.fp8_types = _fp8_module_types()
        self.conv1d = _conv1d_class()
        self.fast_path = False
        self.report = _empty_report()

    # -- helpers for adapters ----------------------------------------------------------------------------
    def name_of(self, module: nn.Module) -> str:
        """Dotted name of ``module`` with a trailing dot ("" for the root)."""
        name = self.names.get(id(module), "")
        return f"{name}." if name else ""

    def is_excluded(self, name: str, module: nn.Module) -> bool:
        if any(rule(name, module) for rule in self.rules):
            if name not in self.report["excluded"]:
                self.report["excluded"].append(name)
            return True
        return False

    def replace(self, parent: nn.Module, child: str, new: nn.Module) -> None:
        old = getattr(parent, child)
        setattr(parent, child, new)
        self.names[id(new)] = self.names.get(id(old), f"{self.name_of(parent)}{child}")
        self.report["converted"][type(new).__name__] += 1

    def convert_linear(self, parent: nn.Module, child: str) -> None:
        """Swap ``parent.child`` (an nn.Linear or Conv1D) for its FP8 version, unless kept in bf16."""
        from .nn.linear import FP8Linear

        module = getattr(parent, child)
        name = f"{self.name_of(parent)}{child}"
        if isinstance(module, self.fp8_types) or self.is_excluded(name, module):
            return
        if id(module.weight) in self.tied:
            self.report["tied"].append(name)
            return
        is_conv1d = self.conv1d is not None and type(module) is self.conv1d
        if type(module) is not nn.Linear and not is_conv1d:
            self.report["unknown"][type(module).__name__] += 1
            return
        if self.recipe.simulate is not None:  # the stability lab: rounded GEMM inputs, no shape constraints
            if is_conv1d:
                self.report["unknown"][type(module).__name__] += 1
                return
            from .lab.simulated_linear import SimulatedLinear

            self.replace(parent, child, SimulatedLinear.from_linear(module, self.recipe.simulate))
            return
        in_features, out_features = (module.nx, module.nf) if is_conv1d else (module.in_features, module.out_features)
        if in_features % 16 or out_features % 16:
            self.report["fallback"].append(f"{name} ({in_features}->{out_features})")
            return
        if is_conv1d:
            new = _fp8_conv1d_class().from_conv1d(module, recipe=self.recipe)
        else:
            new = FP8Linear.from_linear(module, recipe=self.recipe)
        self.replace(parent, child, new)

    # -- the walk -------------------------------------------------------------------------------------------
    def run(self) -> None:
        from .nn.adapters import find_adapter
        from .nn.precision_flow import flow_supported

        self.fast_path = (self.recipe.compress_activations and self.recipe.precision_flow
                          and flow_supported(self.recipe))
        finder = find_adapter if self.recipe.fp8_linears or self.recipe.simulate is not None else None
        root_adapter = finder(self.model) if finder is not None else None
        if root_adapter is not None:  # converting a single decoder block
            root_adapter.convert(self.model, self)
            self.report["fast_path_blocks"] += int(self.fast_path)
        elif isinstance(self.model, nn.Linear):
            raise TypeError("convert() swaps submodules and cannot replace the root module itself; wrap the "
                            "layer in a container or use fp8train.nn.linear.FP8Linear.from_linear(layer)")
        self._visit(self.model, finder)
        self._warn()

    def _visit(self, parent: nn.Module, find_adapter) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{self.name_of(parent)}{child_name}"
            if isinstance(child, self.fp8_types):
                continue  # already converted (converting twice is a no-op)
            if self.is_excluded(name, child):
                continue
            adapter = find_adapter(child) if find_adapter is not None else None
            if adapter is not None:
                adapter.convert(child, self)
                self.report["fast_path_blocks"] += int(self.fast_path)
            elif self._convert_module(parent, child_name, child):
                continue
            self._visit(getattr(parent, child_name), find_adapter)

    def _convert_module(self, parent: nn.Module, child_name: str, child: nn.Module) -> bool:
        """Generic swaps; True when ``child`` was handled and its subtree needs no visit."""
        from .nn.activation import FP8Activation
        from .nn.adapters import is_activation, is_layernorm, is_rmsnorm_like
        from .nn.layernorm import FP8LayerNorm
        from .nn.precision_flow import FlowMLP, flow_supported
        from .nn.rmsnorm import FP8RMSNorm

        if isinstance(child, nn.Linear) or (self.conv1d is not None and type(child) is self.conv1d):
            self.convert_linear(parent, child_name)
            return True
        if not self.recipe.compress_activations:
            return False
        if is_rmsnorm_like(child):
            self.replace(parent, child_name, FP8RMSNorm.from_module(child))
            return True
        if is_layernorm(child):
            self.replace(parent, child_name, FP8LayerNorm.from_module(child))
            return True
        if is_activation(child):
            self.replace(parent, child_name, FP8Activation.from_module(child))
            return True
        if flow_supported(self.recipe) and _is_gated_mlp(child):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                self.convert_linear(child, proj)
            self.replace(parent, child_name, FlowMLP.from_module(child, recipe=self.recipe))
            return True
        if _is_fused_gated_mlp(child):  # Phi-3 style: gate_up_proj -> [gate | up]
            from .nn.gated_mlp import FP8GatedMLP

            for proj in ("gate_up_proj", "down_proj"):
                self.convert_linear(child, proj)
            self.replace(parent, child_name, FP8GatedMLP.from_module(child))
            return True
        return False

    def _warn(self) -> None:
        report = self.report
        if report["fallback"]:
            names = report["fallback"]
            shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
            warnings.warn(f"fp8train.convert: {len(names)} linear layer(s) kept in bf16 because FP8 GEMMs need "
                          f"in/out features that are multiples of 16: {shown}", stacklevel=3)
        unknown = self._unknown_modules()
        if unknown:
            listing = ", ".join(f"{t} x{n}" for t, n in unknown.most_common())
            warnings.warn(f"fp8train.convert: left these module types with parameters unconverted (unknown to "
                          f"fp8train; they train as before): {listing}", stacklevel=3)

    def _unknown_modules(self) -> collections.Counter:
        from .nn.adapters import is_layernorm, is_rmsnorm_like

        unknown = collections.Counter(self.report["unknown"])
        known = (nn.Embedding, nn.Linear, nn.LayerNorm, *self.fp8_types)
        if self.conv1d is not None:
            known = (*known, self.conv1d)
        for name, module in self.model.named_modules():
            if any(name == e or name.startswith(e + ".") for e in self.report["excluded"]):
                continue
            if next(module.children(), None) is not None or next(module.parameters(recurse=False), None) is None:
                continue  # containers and parameter-free modules (rotary embeddings, dropout, attention cores)
            if isinstance(module, known) or is_rmsnorm_like(module) or is_layernorm(module):
                continue
            if "norm" in type(module).__name__.lower():
                continue  # other norms (GroupNorm, custom LayerNorms) are deliberately left as they are
            unknown[type(module).__name__] += 1
        return unknown


def _is_fused_gated_mlp(module: nn.Module) -> bool:
    from .nn.adapters import is_activation

    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_up_proj", "down_proj"))
            and isinstance(act, nn.Module) and is_activation(act))


def _is_gated_mlp(module: nn.Module) -> bool:
    from .nn.adapters import is_activation

    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(act, nn.Module) and is_activation(act))


class _CallableModule(type(collections)):
    """``fp8train.convert`` is both this module and its function: importing the module first (``from
    fp8train.convert import ...``) binds the package attribute to the module, so make the module callable."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
