"""Training recipes: which parts of a model run / are saved in FP8, in one config dataclass.

    fp8train.convert(model, recipe="coat")                    # a named preset
    fp8train.convert(model, recipe=Recipe(grad_format="e4m3"))  # or your own

Presets (``Recipe.named(name)``):

* ``"bf16"``  -- nothing changes (the baseline).
* ``"fp8"``   -- FP8 linear layers only (TransformerEngine-like): E4M3 inputs and weights with just-in-time
  per-tensor scales, E5M2 output gradients, fp32 accumulation, FP8-saved linear inputs.  Norms, activations
  and attention keep their own (bf16/fp32) saved tensors.
* ``"coat"``  -- FP8 linears plus COAT's compressed activations: norm, activation and gated-product inputs
  are saved as E4M3 with 1x16 group scales, and Llama-style decoder blocks use the precision-flow fast path
  (the norm hands the q/k/v projections their FP8 input; the MLP is one autograd Function that saves only
  FP8 tensors).  Pair it with ``fp8train.AdamW`` for FP8 optimizer states.
* ``"fp8-block"`` -- FP8 linears with DeepSeek-V3-style fine-grained scales: 1x128 groups for inputs and
  gradients, 128x128 blocks for weights, E4M3 everywhere.  Numerics only: the GEMMs run on dequantized
  operands (no speed-up), for accuracy comparisons in the stability lab.

Simulated formats (the stability lab, :mod:`fp8train.lab`): ``Recipe(simulate=SimulatedFormats(...))`` or
``Recipe(simulate="e3m4")`` turns every converted linear into a
:class:`~fp8train.lab.simulated_linear.SimulatedLinear` whose GEMM inputs are rounded to any ExMy format.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

__all__ = ["Recipe", "PRESETS", "resolve_recipe"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything :func:`fp8train.convert` needs to know (frozen and hashable, so it can key caches).

    Linear layers (``fp8_linears=True``):
      ``input_format``/``weight_format``/``grad_format`` -- number formats of the three GEMM operands;
      ``*_granularity`` -- their scale groups: ``"tensor"`` (the fast path, ``torch._scaled_mm``), or
      ``"1x128"`` / ``"128x128"`` (emulated: dequantize and matmul in fp32);
      ``fast_accumulation`` -- let the forward GEMM use the tensor cores' faster, less precise accumulation
      (off: every GEMM accumulates in fp32, as COAT does); ``fast_accumulation_grad_input`` -- the same for the
      input-gradient GEMMs (dX = dY W, contracting over a layer's output width); the weight-gradient GEMMs, which
      contract over every token of the batch, always promote to fp32;
      ``cache_fp8_weights`` -- make every weight's FP8 copies (row-major for forward, transposed for backward)
      once per optimizer step, in one batched pass, and reuse them until the next step, CUDA-graph replays
      included (see :mod:`fp8train.nn.weight_cache`); costs 2 bytes per linear weight parameter, kept between
      steps.  On in the ``"coat-lean"`` preset.

    Activations (``compress_activations=True``): norms, activation functions and the gated product (act(gate)
    * up) save their inputs in FP8 E4M3 with 1x16 group scales.  ``precision_flow`` enables the Llama-style
    fast path for decoder blocks whose structure it recognizes; ``recompute_gated_product`` makes the fast
    path's MLP rebuild act(gate) * up from the saved FP8 gate/up in backward instead of saving its FP8 copy.
    ``requantize_attention_output`` -- o_proj (any FP8 linear reading an attention kernel's output through
    views) keeps a reference to the bf16 output, which the attention kernel keeps for its own backward anyway,
    and quantizes it again in backward; off: it keeps the FP8 copy its forward made (hidden bytes per token per
    layer more, one quantize pass per layer less; same bits either way).

    Scales: ``delayed_scaling`` -- the fast path's gated product encodes act(gate) * up (E4M3) and its two
    gradients (E5M2) with a scale predicted from the previous call, in the pass that computes them, instead of an
    amax pass plus an encoding pass; a repair pass re-encodes just in time whenever the prediction was off, so
    nothing saturates (:mod:`fp8train.delayed_scaling`).  The same goes for FP8 linear layers' inputs and output
    gradients that no producer hands an amax (o_proj's input after attention, v_proj's gradient): one pass
    instead of an amax pass plus an encoding pass.  The predictions are a 3-float buffer per MLP and a 2-float
    buffer per FP8 linear layer.
    ``gated_gemm`` (experimental, needs ``delayed_scaling``) -- on FP8 GPUs the fast path's MLP computes gate/up
    and act(gate) * up in one Triton FP8 GEMM with the product in its epilogue, and dh with the product's
    backward in another (:mod:`fp8train.nn.gated_projection`): the GEMMs' bf16 outputs are never written.
    Off by default: with Triton 3.6 it is slower than cuBLAS plus the separate gated kernels on H100/H200
    (docs/performance.md, "Session 10").

    Loss: ``chunked_loss`` -- compute a causal LM's training loss with the chunked fused lm_head +
    cross-entropy (:mod:`fp8train.nn.chunked_cross_entropy`), so the vocabulary-sized logits are never
    materialised; calls that pass ``labels`` then return ``logits=None``.  ``loss_chunk_rows`` -- tokens per
    chunk, None (default): an eighth of the batch's tokens, from 2048 to 8192.  Larger chunks hold more at once
    (a chunk's bf16 logits and their gradient: 4 bytes per token per vocabulary entry, 0.26 GB at 2048 tokens x
    32k) and run the head's GEMMs faster (953M, batch 32 on an H200: 8192-token chunks +0.85 % end to end;
    batch 4: +0.5 % for 0.65 GB more peak, which the default does not take: docs/performance.md, "Session 15").
    Simulated formats (``simulate``): a :class:`fp8train.lab.SimulatedFormats` or its spec string (``"e3m4"``,
    ``"a=e3m4,w=e3m4,g=e5m2,scaling=1x16"``).  When set, every converted linear becomes a ``SimulatedLinear``
    (GEMM inputs rounded to the given formats, GEMMs in the compute dtype); the FP8 linear fields above are not
    used, and ``compress_activations`` must stay off.

    Rotary embeddings: ``fused_rotary`` -- make the model family of each Llama-style block use the fused
    rotary-embedding kernel (:mod:`fp8train.nn.rotary`; bit-identical to Hugging Face's eager op, one launch
    instead of ~10 element-wise kernels per layer).

    Attention: ``fp8_attention_saves`` -- the attention core of Llama-style blocks (Hugging Face models using
    ``"sdpa"``) runs the same fused causal kernel forward (same output bits) but keeps q, k and v for backward
    as E4M3 copies (one scale per head and token, after subtracting their mean over the sequence) instead of bf16,
    and backward reruns the attention forward on the dequantized copies before the fused backward
    (:mod:`fp8train.nn.fp8_saved_attention`, mode ``"recompute"``).  Saves ~half of the attention core's bytes
    at 3.5x its time (measured on an H200: the rerun plus unfused quantize/dequantize passes) -- an experimental
    memory lever, off by default; costs gradient fidelity (about 5 % relative error on
    the attention's input gradients for unit-variance q/k, more for sharp attention; docs/convert.md).  A
    padding mask, dropout, a KV cache or a backend other than cuDNN/flash falls back to HF's SDPA with a
    one-time warning.  Works with every recipe, ``"bf16"`` included.  ``flash_attention`` -- the attention core
    of Llama-style blocks runs FlashAttention-4 (PyPI ``flash-attn-4``) where it is installed and the GPU is
    sm90/sm100: exact attention, 1.11x SDPA's cuDNN kernels forward + backward on an H200
    (:mod:`fp8train.nn.flash_attention`).  None (default): where installed, quietly SDPA elsewhere (the
    ``"bf16"`` recipe converts nothing, so keeps SDPA); True: also warn once per reason a call falls back; False:
    SDPA.  ``fp8_attention_saves`` takes precedence.

    Fusion: ``fused_qkv`` -- the q/k/v projections of Llama-style attention blocks run as one FP8 GEMM against
    their stacked weights (one scale for the stack and one for the three output gradients; not bit-identical to
    separate layers).  Parameters and state_dict keys are unchanged (:mod:`fp8train.nn.fused_projections`).
    ``fused_residual`` (on by default; fast path only) -- Llama-style decoder layers run their two residual adds
    so that the residual gradients are summed by the norms' backward kernels instead of autograd's bf16 adds, and
    those kernels publish the summed gradient's amax for the next FP8 linear (:mod:`fp8train.nn.residual_stream`;
    same forward values, gradients differ only by the sums' rounding).

    Module selection: ``keep_bf16`` -- name patterns (globs, matched against the full module name and its
    last component) that are never converted; embeddings, the attention core and output heads stay bf16.
    """

    name: str = "custom"
    fp8_linears: bool = True
    compress_activations: bool = False
    precision_flow: bool = True
    input_format: str = "e4m3"
    weight_format: str = "e4m3"
    grad_format: str = "e5m2"
    input_granularity: str = "tensor"
    weight_granularity: str = "tensor"
    grad_granularity: str = "tensor"
    fast_accumulation: bool = False
    fast_accumulation_grad_input: bool = False
    cache_fp8_weights: bool = False
    recompute_gated_product: bool = True
    requantize_attention_output: bool = True
    keep_bf16: tuple = ("lm_head", "score", "classifier", "qa_outputs")
    chunked_loss: bool = False
    loss_chunk_rows: Optional[int] = None
    fused_rotary: bool = True
    fp8_attention_saves: bool = False
    flash_attention: Optional[bool] = None
    fused_qkv: bool = False
    fused_residual: bool = True
    delayed_scaling: bool = False
    gated_gemm: bool = False
    simulate: Optional[Any] = None  # fp8train.lab.SimulatedFormats (or its spec string)

    def __post_init__(self):
        from .formats import E5M2, Minifloat, parse_format
        from .quant import Granularity

        for field in ("input_format", "weight_format", "grad_format"):
            fmt = parse_format(getattr(self, field))
            if not isinstance(fmt, Minifloat) or fmt.torch_dtype is None or fmt.bits != 8:
                raise ValueError(f"Recipe.{field} must be an 8-bit float format with a torch dtype "
                                 f"(e4m3 or e5m2), got {getattr(self, field)!r}")
        for field in ("input_granularity", "weight_granularity", "grad_granularity"):
            g = Granularity.parse(getattr(self, field))
            if g.kind == "row":
                raise ValueError(f"Recipe.{field}='row' is not supported for linear layers; "
                                 "use 'tensor', '1x128' or '128x128'")
        if parse_format(self.input_format) == E5M2 and parse_format(self.weight_format) == E5M2:
            raise ValueError("inputs and weights cannot both be E5M2: FP8 GEMMs take E5M2 x E4M3 at most")
        # switches that change which kernels run: a truthy non-bool (a string "False") would silently turn them on
        for field in ("fused_rotary", "fast_accumulation", "fast_accumulation_grad_input", "fused_qkv",
                      "requantize_attention_output", "fused_residual", "delayed_scaling", "gated_gemm",
                      "fp8_attention_saves"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"Recipe.{field} must be True or False, got {getattr(self, field)!r}")
        if self.gated_gemm and not self.delayed_scaling:
            raise ValueError("Recipe.gated_gemm needs delayed_scaling=True: the fused GEMMs encode their FP8 outputs "
                             "with predicted scales (e.g. Recipe.named('coat-lean').replace(gated_gemm=True))")
        if self.loss_chunk_rows is not None and (not isinstance(self.loss_chunk_rows, int)
                                                 or isinstance(self.loss_chunk_rows, bool) or self.loss_chunk_rows < 1):
            raise ValueError(f"Recipe.loss_chunk_rows must be a positive int or None (an eighth of the batch's "
                             f"tokens, 2048 to 8192), got {self.loss_chunk_rows!r}")
        if not (self.flash_attention is None or isinstance(self.flash_attention, bool)):
            raise TypeError(f"Recipe.flash_attention must be None (where installed), True or False, got "
                            f"{self.flash_attention!r}")
        if not isinstance(self.keep_bf16, tuple):
            object.__setattr__(self, "keep_bf16", tuple(self.keep_bf16))
        if self.compress_activations and not self.fp8_linears:
            raise ValueError("compress_activations=True needs fp8_linears=True (the compressed ops hand FP8 "
                             "tensors to FP8 linear layers)")
        if self.simulate is not None:
            from .lab.simulated_linear import SimulatedFormats

            if not isinstance(self.simulate, (str, SimulatedFormats)):
                raise TypeError(f"Recipe.simulate must be a fp8train.lab.SimulatedFormats or a spec string such as "
                                f"'e3m4', got {type(self.simulate).__name__}")
            object.__setattr__(self, "simulate", SimulatedFormats.parse(self.simulate))
            if self.compress_activations:
                raise ValueError("Recipe.simulate replaces the linear layers with simulated ones, which do not take "
                                 "the compressed ops' FP8 hand-offs: use compress_activations=False")
            if self.name == "custom":
                object.__setattr__(self, "name", f"simulate[{self.simulate.describe()}]")

    @property
    def is_noop(self) -> bool:
        return (not self.fp8_linears and not self.compress_activations and not self.chunked_loss
                and self.simulate is None and not self.fp8_attention_saves and self.flash_attention is not True)

    @property
    def per_tensor(self) -> bool:
        """All three GEMM operands per-tensor scaled: the torch._scaled_mm fast path applies."""
        known = self.__dict__.get("_per_tensor")  # asked per linear call: kept, like linear_formats
        if known is None:
            known = all(g.kind == "tensor" for _, g in linear_formats(self))
            object.__setattr__(self, "_per_tensor", known)
        return known

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    @classmethod
    def named(cls, name: str) -> "Recipe":
        key = name.strip().lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown recipe {name!r}: use one of {sorted(PRESETS)} or pass a fp8train.Recipe")
        return PRESETS[key]


PRESETS = {
    "bf16": Recipe(name="bf16", fp8_linears=False, compress_activations=False),
    "fp8": Recipe(name="fp8", fp8_linears=True, compress_activations=False),
    "coat": Recipe(name="coat", fp8_linears=True, compress_activations=True),
    # coat without the logits buffer; pair it with bf16 parameters and
    # fp8train.AdamW(master_weights="bf16_stochastic") for a small footprint.  Two speed trades (953M model,
    # batch 4 x 2048, H200, benchmarks/results/2026-11-27-h200-session5-levers.md): act(gate) * up is kept as
    # E4M3 for backward instead of rebuilt (1.03x tokens/s for 0.74 GB), and every weight's FP8 copies are
    # made once per optimizer step (1.01x under a CUDA graph, 1.41x in eager mode, for 2 bytes per linear
    # weight: 1.7 GB).  recompute_gated_product=True, cache_fp8_weights=False give the smallest footprint.
    # Since session 9 also delayed scaling of the gated product (one encoding pass with predicted scales, repaired
    # when wrong): 108,261 -> 111,350 tokens/s (1.03x) under a CUDA graph, loss gap vs bf16 +0.13 % +- 0.09 (4
    # seeds; +0.04 % +- 0.12 without, same call: benchmarks/results/2026-11-28-h200-session9-delayed-*.md).
    # Since session 16 the forward and input-gradient GEMMs accumulate in the tensor cores' own precision
    # (fast_accumulation, fast_accumulation_grad_input): +2.1-2.2 % tokens/s at batch 44 (H200); loss gap vs bf16
    # +0.04 % +- 0.11 over 8 seeds, against +0.34 % +- 0.07 with fp32 promotion in the same call's 4 seeds
    # (benchmarks/results/2026-11-28-h200-session16-*); weight gradients, which contract over every token, keep fp32.
    "coat-lean": Recipe(name="coat-lean", fp8_linears=True, compress_activations=True, chunked_loss=True,
                        recompute_gated_product=False, cache_fp8_weights=True, delayed_scaling=True,
                        fast_accumulation=True, fast_accumulation_grad_input=True),
    "fp8-block": Recipe(name="fp8-block", fp8_linears=True, compress_activations=False,
                        input_granularity="1x128", weight_granularity="128x128", grad_granularity="1x128",
                        grad_format="e4m3"),
}


def resolve_recipe(recipe: Union[str, Recipe, None]) -> Recipe:
    """A preset name, a Recipe, or None (= "coat") -> a Recipe."""
    if recipe is None:
        return PRESETS["coat"]
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return Recipe.named(recipe)
    raise TypeError(f"recipe must be a name ({sorted(PRESETS)}) or a fp8train.Recipe, got {type(recipe).__name__}")


def linear_formats(recipe: Recipe):
    """Parsed (format, granularity) pairs for input, weight and grad of a recipe's linear layers."""
    # asked several times per linear layer and step: kept on the (frozen) recipe itself, since even an
    # lru_cache lookup hashes all of the recipe's fields each time
    parsed = recipe.__dict__.get("_parsed_linear_formats")
    if parsed is None:
        from .formats import parse_format
        from .quant import Granularity

        parsed = tuple((parse_format(getattr(recipe, f"{op}_format")),
                        Granularity.parse(getattr(recipe, f"{op}_granularity"))) for op in ("input", "weight", "grad"))
        object.__setattr__(recipe, "_parsed_linear_formats", parsed)
    return parsed
