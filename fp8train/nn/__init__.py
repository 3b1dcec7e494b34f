"""FP8 building blocks for models.

Compressed non-linear ops (COAT's mixed-granularity activations), one per module, each with its torch
reference forward/backward, the dispatch to its Triton kernel, an autograd.Function and a small nn.Module:

* :mod:`fp8train.nn.rmsnorm` -- ``FP8RMSNorm``, ``rms_norm``, ``rmsnorm_forward`` / ``rmsnorm_backward``, and the
  fused residual add + norm ``add_rms_norm`` / ``add_rmsnorm_forward``
* :mod:`fp8train.nn.layernorm` -- ``FP8LayerNorm``, ``layer_norm``, ``layernorm_forward`` / ``layernorm_backward``
* :mod:`fp8train.nn.activation` -- ``FP8Activation``, ``activation``, ``activation_forward`` / ``activation_backward``
* :mod:`fp8train.nn.gated_mlp` -- ``gated_product`` (act(gate) * up), ``gated_product_forward`` / ``_backward``,
  ``FP8GatedMLP``
* :mod:`fp8train.nn.residual` -- ``residual_add`` (optionally emitting the next norm's FP8 copy)
* :mod:`fp8train.nn.rotary` -- ``fused_rotary_embedding`` (bit-identical to HF's ``apply_rotary_pos_emb``, one
  Triton launch for q and k) and ``install_fused_rotary``, which convert uses for Llama-style families
* :mod:`fp8train.nn.fp8_saved_attention` -- ``fp8_saved_attention`` (SDPA's causal forward, same bits, with q/k/v
  saved as E4M3 copies) and ``install_fp8_saved_attention``, which convert uses for ``Recipe.fp8_attention_saves``

FP8 linear layer and the wiring between ops:

* :mod:`fp8train.nn.linear` -- ``FP8Linear`` (an nn.Linear subclass), ``fp8_linear_forward`` / ``_backward``
* :mod:`fp8train.nn.handoff` -- attach a tensor's FP8 form for its consumers (one FP8 copy for q/k/v)
* :mod:`fp8train.nn.conv1d` -- ``FP8Conv1D`` for transformers' Conv1D (GPT-2)
* :mod:`fp8train.nn.precision_flow` -- the Llama-style decoder-block fast path; per-family adapters in
  :mod:`fp8train.nn.adapters`
* :mod:`fp8train.nn.saved_memory` -- ``SavedTensorCounter``: bytes autograd keeps for backward

What each saves is described in docs/activations.md and docs/convert.md.
"""
