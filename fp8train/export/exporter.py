"""Quantize a trained model for inference and write it as a compressed-tensors checkpoint.

    from fp8train.export import export
    export(model, "out/llama-fp8", format="fp8-dynamic")                       # no data needed
    export(model, "out/llama-w4", format="w4a16", calibration=token_ids)       # GPTQ
    export(model, "out/llama-int8", format="w8a8-int8", calibration=token_ids, smoothquant=0.8)

Every ``nn.Linear`` is a candidate (fp8train's FP8Linear subclasses it, so a model trained with the ``coat``
recipe exports directly: the fp32 master weights are read in place, no bf16 copy is written); the output
projection (lm_head) and the embeddings stay bf16 unless asked.  Layers whose input width is not a multiple
of the format's group size stay bf16 with a warning naming them.

Pipeline: [SmoothQuant] -> per layer round-to-nearest or GPTQ (block by block, later blocks calibrated on the
outputs of the quantized earlier ones) -> [LoRC] -> tensors -> atomic write.  Calibration runs on a float32
working copy of the model (a plain Hugging Face model of the same config), so the caller's model -- FP8
modules and all -- is never modified.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import warnings
from typing import Optional, Union

import torch
from torch import nn

from .. import __version__
from .calibration import BlockReplay, as_batches, decoder_blocks, forward_all, input_hooks
from .checkpoint import check_out_dir, compressed_tensors, quantization_config, write_checkpoint
from .gptq import HessianAccumulator, gptq_quantize
from .lorc import low_rank_compensation
from .schemes import Scheme, get_scheme
from .smoothquant import collect_input_amax, find_smoothing_groups, smooth
from .weights import QuantizedWeight, quantize_weight, relative_error

__all__ = ["QuantizedModel", "quantize_model", "export"]


@dataclasses.dataclass
class QuantizedModel:
    """A quantized model in memory: what :func:`export` writes and :func:`evaluate` simulates."""

    scheme: Scheme
    config: dict  # Hugging Face config.json content, without quantization_config
    tensors: dict[str, torch.Tensor]  # every unquantized tensor (bf16, after smoothing)
    weights: dict[str, QuantizedWeight]  # quantized layers by module name
    embeddings: set  # names in ``weights`` that are embedding tables (weight-only)
    ignore: list[str]  # linear layers kept in bf16 (compressed-tensors "ignore")
    info: dict  # what was done: method, calibration, per-layer errors, skipped layers

    def activation_formats(self) -> dict:
        return {n: (None if n in self.embeddings else self.scheme.activation_format) for n in self.weights}

    def checkpoint_config(self) -> dict:
        config = dict(self.config)
        config["quantization_config"] = quantization_config(self.scheme, self.ignore,
                                                            embeddings=sorted(self.embeddings))
        return config

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().cpu() for k, v in self.tensors.items()}
        for name, qweight in self.weights.items():
            out.update(compressed_tensors(name, qweight))
        return out


def _hf_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"export needs a Hugging Face causal LM (a PreTrainedModel with .config); got "
                        f"{type(model).__name__}.  Load it with AutoModelForCausalLM.from_pretrained(dir) first.")
    d = config.to_dict()
    d.pop("quantization_config", None)
    if not d.get("architectures"):
        d["architectures"] = [type(model).__name__]
    return d


def _reference_keys(config: dict, model: nn.Module) -> tuple[list[str], bool]:
    """The state-dict keys of a plain Hugging Face model of this config, and whether lm_head is tied."""
    from .simulate import empty_model

    try:
        ref = empty_model(config, "meta")
    except Exception as exc:  # noqa: BLE001 - fall back to the model's own parameters
        warnings.warn(f"could not build a reference model of this config ({exc!r}); exporting the model's "
                      "parameters and persistent buffers as they are", stacklevel=3)
        keys = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        keys += [n for n, _ in model.named_buffers() if not n.endswith("inv_freq")]
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        return keys, out is not None and inp is not None and out.weight is inp.weight
    keys = list(ref.state_dict().keys())
    out, inp = ref.get_output_embeddings(), ref.get_input_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    return keys, tied


def _module_names_of(model: nn.Module, module: Optional[nn.Module]) -> set:
    if module is None:
        return set()
    return {n for n, m in model.named_modules(remove_duplicate=False) if m is module}


def quantize_model(
    model: nn.Module,
    format: Union[str, Scheme] = "fp8-dynamic",
    *,
    calibration=None,
    method: Optional[str] = None,
    smoothquant: Optional[float] = None,
    lorc_rank: int = 0,
    group_size: Union[int, str, None] = "keep",
    fp4_scales: Optional[str] = None,
    quantize_lm_head: bool = False,
    quantize_embeddings: bool = False,
    damping: float = 0.01,
    act_order: bool = False,
    calibration_batch_size: int = 8,
) -> QuantizedModel:
    """Quantize ``model`` in memory (see :func:`export` for the arguments)."""
    started = time.time()
    scheme = get_scheme(format)
    if group_size != "keep" or fp4_scales is not None:
        scheme = scheme.with_options(group_size=group_size, scale_rule=fp4_scales)
    if method is None:
        method = scheme.default_method if calibration is not None else "rtn"
        if scheme.default_method == "gptq" and calibration is None:
            warnings.warn(f"{scheme.name}: no calibration data, so weights are rounded to nearest; give "
                          "calibration samples (--calibration-samples) for GPTQ, which is more accurate",
                          stacklevel=2)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"unknown method {method!r}: use 'rtn' (round to nearest) or 'gptq'")
    if method == "gptq" and calibration is None:
        raise ValueError("method='gptq' needs calibration data: pass calibration= token ids (a few hundred "
                         "sequences from the training corpus)")
    if smoothquant is not None:
        if calibration is None:
            raise ValueError("SmoothQuant needs calibration data to measure activation ranges: pass calibration=")
        if scheme.activation_format is None:
            raise ValueError(f"SmoothQuant balances activation and weight ranges; {scheme.name} does not quantize "
                             "activations, so it has nothing to smooth")
    if lorc_rank < 0:
        raise ValueError(f"lorc_rank must be >= 0, got {lorc_rank}")

    config = _hf_config(model)
    keys, tied = _reference_keys(config, model)
    state = model.state_dict()
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"the model lacks {len(missing)} parameters of its config's architecture, e.g. {missing[:3]}")

    # -- which layers -------------------------------------------------------------------------------
    key_set = set(keys)
    output_names = _module_names_of(model, model.get_output_embeddings())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in key_set}
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in linears.items():
        if name in output_names and not quantize_lm_head:
            skipped[name] = "output projection (kept in bf16; pass quantize_lm_head=True to quantize it)"
            continue
        in_features = module.weight.shape[1]
        if scheme.group_size is not None and in_features % scheme.group_size:
            skipped[name] = (f"{in_features} input features are not a multiple of the group size "
                             f"{scheme.group_size}; kept in bf16")
            warnings.warn(f"{name}: {skipped[name]}", stacklevel=2)
            continue
        targets[name] = module
    embedding_names = set()
    if quantize_embeddings:
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and f"{name}.weight" in key_set:
                dim = module.weight.shape[1]
                if scheme.group_size is not None and dim % scheme.group_size:
                    skipped[name] = f"embedding width {dim} is not a multiple of the group size {scheme.group_size}"
                    warnings.warn(f"{name}: {skipped[name]}; kept in bf16", stacklevel=2)
                    continue
                embedding_names.add(name)
    if not targets and not embedding_names:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "the model has no nn.Linear layers"
        raise ValueError(f"nothing to quantize for {scheme.name}: {reasons}")
    untie = tied and (quantize_lm_head or quantize_embeddings)

    # -- working copy for calibration (the caller's model is never modified) ---------------------------
    needs_data = method == "gptq" or smoothquant is not None
    work = None
    batches = None
    if needs_data:
        from .simulate import empty_model

        batches = as_batches(calibration, calibration_batch_size)
        device = next(model.parameters()).device
        work = empty_model(config, device if device.type != "meta" else None)
        work.load_state_dict({k: state[k].detach().float() for k in keys}, strict=True)
        work.eval()
        if untie:  # lm_head and the embedding are quantized separately: they must stop sharing storage
            out_emb = work.get_output_embeddings()
            out_emb.weight = nn.Parameter(out_emb.weight.detach().clone(), requires_grad=False)
        work_modules = dict(work.named_modules())
        work_targets = {n: work_modules[n] for n in targets}
    source = dict(work.named_modules()) if work is not None else dict(model.named_modules())

    info: dict = {"format": scheme.name, "method": method, "fp8train_version": __version__,
                  "compressed_tensors_format": scheme.compressed_format, "group_size": scheme.group_size,
                  "scale_rule": scheme.scale_rule, "lorc_rank": lorc_rank, "smoothquant_alpha": smoothquant,
                  "act_order": act_order if method == "gptq" else None,
                  "damping": damping if method == "gptq" else None,
                  "calibration": None, "skipped": skipped, "layers": {}}
    if batches is not None:
        info["calibration"] = {"samples": sum(b.shape[0] for b in batches),
                               "tokens": sum(b.numel() for b in batches)}

    with torch.no_grad():
        if smoothquant is not None:
            groups = find_smoothing_groups(work, batches[0], work_targets)
            amax = collect_input_amax(work, batches, work_targets)
            smooth(work, groups, amax, alpha=smoothquant)
            info["smoothquant_groups"] = [dataclasses.asdict(g) for g in groups]

        quantized: dict[str, QuantizedWeight] = {}

        def finish(name: str, original: torch.Tensor, qweight: QuantizedWeight) -> None:
            if lorc_rank:
                qweight.lorc_u, qweight.lorc_v = low_rank_compensation(
                    original, qweight.dequantize(lorc=False), lorc_rank)
            quantized[name] = qweight
            info["layers"][name] = {"shape": list(original.shape),
                                    "weight_rel_error": relative_error(original, qweight.dequantize())}

        if method == "rtn":
            for name in list(targets) + sorted(embedding_names):
                w = source[name].weight.detach().float()
                finish(name, w, quantize_weight(w, scheme))
        else:
            _gptq_all(work, work_targets, batches, scheme, damping, act_order, finish)
            for name in sorted(embedding_names):  # embeddings have no input Hessian: round to nearest
                w = source[name].weight.detach().float()
                finish(name, w, quantize_weight(w, scheme))

    # -- the unquantized tensors ---------------------------------------------------------------------
    final_state = work.state_dict() if work is not None else state
    tensors = {}
    quantized_keys = {f"{n}.weight" for n in quantized}
    output_weight_keys = {f"{n}.weight" for n in output_names}
    for key in keys:
        if key in quantized_keys:
            continue
        if tied and not untie and key in output_weight_keys:
            continue  # stored once, as the input embedding
        tensors[key] = final_state[key].detach().to(device="cpu", dtype=torch.bfloat16)
    config["dtype"] = "bfloat16"
    if "torch_dtype" in config:
        config["torch_dtype"] = "bfloat16"
    if untie:
        config["tie_word_embeddings"] = False
    ignore = sorted(set(linears) - set(quantized))
    if not quantize_embeddings:
        # model-free readers match every "*.weight"; naming the embeddings keeps them from treating it as quantized
        ignore += sorted(n for n, m in model.named_modules() if isinstance(m, nn.Embedding)
                         and f"{n}.weight" in key_set)
    info["quantized_layers"] = len(quantized)
    info["seconds"] = round(time.time() - started, 2)
    return QuantizedModel(scheme=scheme, config=config, tensors=tensors, weights=quantized,
                          embeddings=embedding_names, ignore=ignore, info=info)


def _gptq_all(work, targets, batches, scheme, damping, act_order, finish) -> None:
    """GPTQ every target, one decoder block at a time (each block calibrated on quantized predecessors)."""
    _, blocks = decoder_blocks(work)
    in_blocks: list[list[str]] = []
    block_of = {}
    if blocks is not None:
        for i, block in enumerate(blocks):
            in_blocks.append([])
            for m in block.modules():
                block_of[id(m)] = i
        for name, module in targets.items():
            if id(module) in block_of:
                in_blocks[block_of[id(module)]].append(name)
    outside = [n for n in targets if id(targets[n]) not in block_of]

    def quantize_group(names, run):
        hessians = {n: HessianAccumulator(targets[n].in_features, device=targets[n].weight.device)
                    for n in names}
        with input_hooks({n: targets[n] for n in names}, lambda n, x: hessians[n].add(x)):
            run()
        for n in names:
            w = targets[n].weight.detach().float().clone()
            qweight = gptq_quantize(w, hessians[n].hessian, scheme, damping=damping, act_order=act_order, name=n)
            finish(n, w, qweight)
            # later layers are calibrated on what the quantized model computes
            targets[n].weight.data.copy_(qweight.dequantize(torch.float32))
            hessians[n] = None

    if blocks is not None and any(in_blocks):
        replay = BlockReplay(work, blocks, batches)
        for i in range(len(blocks)):
            if in_blocks[i]:
                quantize_group(in_blocks[i], lambda i=i: replay.run(i))
            if i + 1 < len(blocks):
                replay.advance(i)
    if outside:
        quantize_group(outside, lambda: forward_all(work, batches))


def export(
    model,
    out_dir,
    format: Union[str, Scheme] = "fp8-dynamic",
    *,
    calibration=None,
    overwrite: bool = False,
    method: Optional[str] = None,
    smoothquant: Optional[float] = None,
    lorc_rank: int = 0,
    group_size: Union[int, str, None] = "keep",
    quantize_lm_head: bool = False,
    quantize_embeddings: bool = False,
    damping: float = 0.01,
    act_order: bool = False,
    copy_from=None,
    source=None,
) -> dict:
    """Quantize ``model`` to ``format`` and write a compressed-tensors checkpoint to ``out_dir``.

    ``model``: a Hugging Face causal LM (any dtype/device, fp8train-converted or not), or a model directory or
    ``fp8train train`` run directory (its newest checkpoint; the tokenizer files are copied along).
    ``format``: ``fp8-dynamic`` | ``w8a8-int8`` | ``w4a16`` | ``w4a8-fp``.
    ``calibration``: token ids (LongTensor [samples, tokens] or a list of 1-D tensors) for GPTQ / SmoothQuant.
    ``method``: ``rtn`` or ``gptq`` (default: GPTQ for the 4-bit formats when calibration is given).
    ``smoothquant``: alpha (e.g. 0.8) to apply SmoothQuant first (formats with quantized activations).
    ``lorc_rank``: rank of the low-rank error compensation (0: off).
    ``overwrite``: replace an existing ``out_dir`` (otherwise refused).
    ``copy_from``: a directory whose tokenizer / generation-config files are copied into the export.
    ``source``: the :class:`fp8train.export.io.Source` the model came from (recorded in the export info).
    Returns the export info (also written to ``fp8train_export.json``) with ``path`` added.
    """
    out = pathlib.Path(out_dir)
    check_out_dir(out, overwrite)  # fail before the (possibly long) quantization
    reason = get_scheme(format).with_options(group_size=group_size).exportable
    if reason:
        raise ValueError(f"cannot write {format}: {reason}")
    if isinstance(model, (str, pathlib.Path)):
        from .io import open_source

        source = open_source(model)
        copy_from = copy_from or source.files_dir
        model = source.load_model()
    qmodel = quantize_model(model, format, calibration=calibration, method=method, smoothquant=smoothquant,
                            lorc_rank=lorc_rank, group_size=group_size, quantize_lm_head=quantize_lm_head,
                            quantize_embeddings=quantize_embeddings, damping=damping, act_order=act_order)
    if source is not None:
        qmodel.info["source"] = {"path": str(source.path.resolve()), "kind": source.kind,
                                 "weights": str(source.weights.resolve())}
    write_checkpoint(out, config=qmodel.checkpoint_config(), tensors=qmodel.checkpoint_tensors(),
                     export_info=qmodel.info, overwrite=overwrite, copy_from=copy_from)
    return {**qmodel.info, "path": str(out)}
