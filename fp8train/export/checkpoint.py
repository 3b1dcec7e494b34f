"""Writing (and reading back) a checkpoint in the compressed-tensors format that vLLM and transformers load.

A checkpoint directory holds

* ``config.json`` -- the model's Hugging Face config plus ``quantization_config`` (``quant_method:
  "compressed-tensors"``, ``format``, ``quantization_status: "compressed"``, ``config_groups`` with the
  QuantizationArgs of weights and input activations, and ``ignore``: the linear layers kept in bf16);
* ``model.safetensors`` -- per quantized layer ``weight`` (float8_e4m3fn / int8 codes) or ``weight_packed``
  (4-bit codes packed into int32 or uint8) with ``weight_scale`` (bf16, or uint8 E8M0 exponents for MX) and,
  for ``pack-quantized``, ``weight_shape``; every other tensor in bf16; LoRC factors as ``lorc_u``/``lorc_v``;
* ``fp8train_export.json`` -- what fp8train did (format, method, calibration, per-layer errors, skipped layers);
* the tokenizer and generation config of the source model when there are any.

Writing is atomic: everything goes into a hidden sibling directory (config.json last) that is renamed to the
output path only when complete, so a failed export never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Optional

import torch

from ..formats import E2M1, E4M3, INT4, INT8
from .packing import pack_fp4, pack_int4, unpack_fp4, unpack_int4
from .power_of_two_scales import e8m0_decode, e8m0_encode
from .schemes import Scheme
from .weights import QuantizedWeight

__all__ = ["compressed_tensors", "quantization_config", "write_checkpoint", "read_checkpoint",
           "scheme_from_config_group", "decode_module", "CONFIG_FILE", "WEIGHTS_FILE", "EXPORT_INFO_FILE"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXPORT_INFO_FILE = "fp8train_export.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


# -- tensors ------------------------------------------------------------------------------------------

def compressed_tensors(name: str, qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors one quantized linear layer ``name`` contributes to the safetensors file."""
    scheme = qweight.scheme
    codes = qweight.codes.detach().cpu()
    out: dict[str, torch.Tensor] = {}
    if scheme.compressed_format in ("float-quantized", "int-quantized", "naive-quantized"):
        out[f"{name}.weight"] = codes.contiguous()
        out[f"{name}.weight_scale"] = qweight.scale.detach().cpu().to(torch.bfloat16).contiguous()
    elif scheme.compressed_format == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_int4(codes)
        out[f"{name}.weight_scale"] = qweight.scale.detach().cpu().to(torch.bfloat16).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    elif scheme.compressed_format == "mxfp4-pack-quantized":
        out[f"{name}.weight_packed"] = pack_fp4(codes)
        out[f"{name}.weight_scale"] = e8m0_encode(qweight.scale.detach().cpu().float())
    else:
        raise ValueError(f"no writer for compressed-tensors format {scheme.compressed_format!r}")
    if qweight.lorc_u is not None:
        out[f"{name}.lorc_u"] = qweight.lorc_u.detach().cpu().to(torch.bfloat16).contiguous()
        out[f"{name}.lorc_v"] = qweight.lorc_v.detach().cpu().to(torch.bfloat16).contiguous()
    return out


def quantization_config(scheme: Scheme, ignore: list[str], *, embeddings: list[str] = ()) -> dict:
    """The ``quantization_config`` entry of config.json (``embeddings``: names of quantized embedding tables)."""
    groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": scheme.weight_args(),
            "input_activations": scheme.activation_args(),
            "output_activations": None,
            "format": scheme.compressed_format,
        }
    }
    if embeddings:
        # weight-only (a lookup has no input activations); targeted by name, which both the model-based
        # (transformers) and the model-free compressed-tensors readers match
        groups["group_1"] = {
            "targets": sorted(embeddings),
            "weights": scheme.weight_args(),
            "input_activations": None,
            "output_activations": None,
            "format": scheme.compressed_format,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": scheme.compressed_format,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# -- writing ------------------------------------------------------------------------------------------

def check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out directory or pass --overwrite "
                              "(overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")


def write_checkpoint(out_dir, *, config: dict, tensors: dict[str, torch.Tensor], export_info: dict,
                     overwrite: bool = False, copy_from: Optional[os.PathLike] = None) -> pathlib.Path:
    """Write config.json + model.safetensors (+ info and tokenizer files) atomically to ``out_dir``."""
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    partial = out.parent / f".{out.name}.partial-{tag}"
    partial.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        if copy_from is not None:
            for name in COPIED_FILES:
                src = pathlib.Path(copy_from) / name
                if src.is_file():
                    shutil.copy2(src, partial / name)
            if (partial / "tokenizer.json").is_file() and not (partial / "tokenizer_config.json").is_file():
                # a bare tokenizers file (fp8train runs save one): tell AutoTokenizer how to load it
                (partial / "tokenizer_config.json").write_text(json.dumps(
                    {"tokenizer_class": "PreTrainedTokenizerFast",
                     "model_max_length": config.get("max_position_embeddings", 2048)}, indent=2) + "\n")
        (partial / EXPORT_INFO_FILE).write_text(json.dumps(export_info, indent=2, sort_keys=True) + "\n")
        (partial / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # last
        check_out_dir(out, overwrite)  # it may have appeared meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


# -- reading (fp8train's own loader; compressed-tensors is the independent reader in the tests) --------

def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json (as a dict) and every tensor of the checkpoint's safetensors files."""
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model directory")
    config = json.loads(config_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return config, tensors


_WEIGHT_FORMATS = {("float", 8): E4M3, ("float", 4): E2M1, ("int", 8): INT8, ("int", 4): INT4}
_ACTIVATION_FORMATS = {("float", 8): E4M3, ("int", 8): INT8}


def scheme_from_config_group(group: dict) -> Scheme:
    """Rebuild the :class:`Scheme` of a config group written by fp8train (or an equivalent one)."""
    w = group.get("weights") or {}
    a = group.get("input_activations")
    fmt = _WEIGHT_FORMATS.get((w.get("type"), w.get("num_bits")))
    if fmt is None or not w.get("symmetric", True) or w.get("strategy") not in ("channel", "group"):
        raise ValueError(f"unsupported weight quantization {w}: fp8train reads symmetric per-channel / per-group "
                         "FP8, INT8, INT4 and FP4 weights; load other checkpoints with compressed-tensors")
    act = None
    if a is not None:
        act = _ACTIVATION_FORMATS.get((a.get("type"), a.get("num_bits")))
        if act is None or a.get("strategy") != "token" or not a.get("dynamic"):
            raise ValueError(f"unsupported input activation quantization {a}: fp8train simulates dynamic "
                             "per-token FP8 / INT8 activations")
    group_size = w.get("group_size") if w.get("strategy") == "group" else None
    return Scheme(name=f"{group.get('format')}", weight_format=fmt, group_size=group_size, activation_format=act,
                  compressed_format=group.get("format") or "", default_method="rtn",
                  scale_rule="pow2" if str(w.get("scale_dtype")) == "torch.uint8" else "amax")


def decode_module(tensors: dict[str, torch.Tensor], name: str, scheme: Scheme) -> QuantizedWeight:
    """Read one quantized layer's codes and scales back into a :class:`QuantizedWeight`."""
    scale = tensors[f"{name}.weight_scale"]
    if f"{name}.weight_packed" in tensors:
        packed = tensors[f"{name}.weight_packed"]
        if scheme.weight_format is E2M1:
            codes = unpack_fp4(packed)
            scale = e8m0_decode(scale).to(torch.bfloat16) if scale.dtype == torch.uint8 else scale
        else:
            shape = tensors[f"{name}.weight_shape"].tolist()
            codes = unpack_int4(packed, shape)
    else:
        codes = tensors[f"{name}.weight"]
    lorc_u = tensors.get(f"{name}.lorc_u")
    lorc_v = tensors.get(f"{name}.lorc_v")
    return QuantizedWeight(codes=codes, scale=scale, scheme=scheme, lorc_u=lorc_u, lorc_v=lorc_v)
