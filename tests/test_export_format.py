"""Export formats: scales, codes, packing, and the written checkpoint read by compressed-tensors (the reader)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from _export_models import tiny_llama, token_batch
from fp8train.export.packing import pack_fp4, pack_int4, unpack_fp4, unpack_int4
from fp8train.export.power_of_two_scales import e8m0_decode, e8m0_encode, power_of_two_ceil, shared_max_scales
from fp8train.export.schemes import FORMAT_NAMES, get_scheme
from fp8train.export.weights import choose_scales, quantize_weight

ct = pytest.importorskip("compressed_tensors")


# -- packing: our writer against compressed-tensors' unpackers ------------------------------------------------

@pytest.mark.parametrize("cols", [8, 13, 128, 200])
def test_int4_packing_is_what_compressed_tensors_unpacks(cols):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    gen = torch.Generator().manual_seed(cols)
    codes = torch.randint(-8, 8, (5, cols), generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols // 8))
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([5, cols])), codes)
    assert torch.equal(unpack_int4(packed, (5, cols)), codes)


def test_fp4_packing_is_what_compressed_tensors_unpacks():
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    gen = torch.Generator().manual_seed(0)
    values = grid[torch.randint(0, 8, (6, 64), generator=gen)] * torch.where(torch.rand(6, 64, generator=gen) < .5,
                                                                            -1.0, 1.0)
    packed = pack_fp4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(unpack_fp4_from_uint8(packed, 6, 64, dtype=torch.float32), values)
    assert torch.equal(unpack_fp4(packed), values)
    with pytest.raises(ValueError, match="E2M1 grid"):
        pack_fp4(torch.full((2, 2), 0.7))


# -- scales and codes ------------------------------------------------------------------------------------------

def _weight(rows=64, cols=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w[3, 17] = 0.9  # an outlier
    w[5] = 0.0  # an all-zero row
    return w


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_round_to_nearest_never_clips_and_dequantizes_within_half_a_step(name):
    scheme = get_scheme(name)
    w = _weight()
    q = quantize_weight(w, scheme)
    assert q.scale.dtype == torch.bfloat16
    fmt = scheme.weight_format
    groups = 1 if scheme.group_size is None else w.shape[1] // scheme.group_size
    assert q.scale.shape == (w.shape[0], groups)
    deq = q.dequantize()
    # no group's largest element is clipped: amax / scale <= format max
    full_scale = q.scale.float().repeat_interleave(w.shape[1] // groups, dim=1)
    assert (w.abs() / full_scale).max() <= fmt.max
    # round to nearest: the error is at most half the local step of the format
    step = fmt.quantum(w / full_scale).float() * full_scale if hasattr(fmt, "quantum") else full_scale
    assert bool(((deq - w).abs() <= step / 2 + 1e-12).all())
    assert torch.equal(deq[5], torch.zeros(w.shape[1]))


def test_power_of_two_scales_m1_and_m2():
    s = torch.tensor([[0.3, 1.0, 0.26, 0.0009], [1.5, 0.75, 3.0, 6.0]])
    m1 = power_of_two_ceil(s)
    assert torch.equal(m1, torch.tensor([[0.5, 1.0, 0.5, 2.0 ** -10], [2.0, 1.0, 4.0, 8.0]]))
    m2 = shared_max_scales(s)
    assert bool((m2 >= s).all()) and bool((m2 < 2 * s).all())
    ratio = s.amax(dim=1, keepdim=True) / m2
    assert torch.equal(torch.log2(ratio), torch.log2(ratio).round())  # S_max over a power of two
    assert torch.equal(e8m0_decode(e8m0_encode(m1)), m1)


def test_fp4_scale_rules_order_of_error():
    """ZeroQuant-FP: unconstrained scales < M2 < M1 in weight error (on Gaussian weights)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=gen)
    errors = {}
    for rule in ("amax", "pow2-shared-max", "pow2"):
        scheme = get_scheme("w4a8-fp").with_options(scale_rule=rule)
        errors[rule] = float((quantize_weight(w, scheme).dequantize() - w).norm() / w.norm())
    assert errors["amax"] < errors["pow2-shared-max"] < errors["pow2"]


def test_w4a8_scales_are_exact_powers_of_two_in_mx_layout():
    q = quantize_weight(_weight(), get_scheme("w4a8-fp"))
    s = q.scale.float()
    nonzero = s[s > 0]
    assert torch.equal(torch.log2(nonzero), torch.log2(nonzero).round())
    assert q.scale.shape[1] == 256 // 32


def test_choose_scales_rejects_nonfinite():
    w = _weight()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        choose_scales(w, get_scheme("fp8-dynamic"))


# -- the written checkpoint, read by compressed-tensors ------------------------------------------------------

def _ct_decompress(path):
    """compressed-tensors' model-free reader (its checkpoint dequantizer): config parsed, modules decompressed."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = load_file(str(path / "model.safetensors"))
    dequantized = CompressedTensorsDequantizer(str(path), dtype=torch.float32).process(dict(tensors))
    quantized = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    return qconfig, tensors, {name: dequantized[f"{name}.weight"] for name in quantized}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_checkpoint_is_read_by_compressed_tensors_exactly(tmp_path, name):
    from fp8train.export import export, quantize_model

    model = tiny_llama()
    calibration = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_model(model, name, calibration=calibration)
        info = export(model, tmp_path / name, name, calibration=calibration)
    assert info["quantized_layers"] == 14 and "lm_head" in info["skipped"]
    qconfig, tensors, decompressed = _ct_decompress(tmp_path / name)
    scheme = get_scheme(name)
    assert qconfig.quant_method == "compressed-tensors" and qconfig.format == scheme.compressed_format
    assert qconfig.quantization_status == "compressed"
    assert "lm_head" in qconfig.ignore
    group = qconfig.config_groups["group_0"]
    assert group.targets == ["Linear"] and group.weights.num_bits == scheme.weight_bits
    assert (group.input_activations is None) == (scheme.activation_format is None)
    if group.input_activations is not None:
        assert group.input_activations.strategy == "token" and group.input_activations.dynamic is True
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert set(decompressed) == set(qmodel.weights)
    for layer, qweight in qmodel.weights.items():
        # compressed-tensors multiplies codes by the bf16 scale in bf16: one rounding of our exact product
        ours = qweight.dequantize(torch.bfloat16).float()
        assert torch.equal(decompressed[layer], ours), layer


@pytest.mark.parametrize("name", ["fp8-dynamic", "w4a16", "w4a8-fp"])
def test_transformers_loads_the_checkpoint_through_compressed_tensors(tmp_path, name):
    from transformers import AutoModelForCausalLM

    from fp8train.export import export, load, quantize_model

    model = tiny_llama(tie=(name == "w4a16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_model(model, name, method="rtn")
        export(model, tmp_path / "ckpt", name, method="rtn")
        ct_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    x = token_batch(2, 16)
    with torch.no_grad():
        ct_model(input_ids=x)  # the first forward decompresses
        modules = dict(ct_model.named_modules())
        for layer, qweight in qmodel.weights.items():
            assert torch.equal(modules[layer].weight, qweight.dequantize(modules[layer].weight.dtype)), layer
        # compressed-tensors' own runtime (dynamic fake-quantized activations), run in float32, against
        # fp8train's simulation given the same bf16-rounded weights: the same arithmetic, so the same numbers
        # (with fp8train's exact weights, activation rounding flips would make them differ by quantization noise)
        ct_logits = torch.nn.Module.float(ct_model)(input_ids=x).logits
        sim = load(tmp_path / "ckpt")
        for layer, qweight in qmodel.weights.items():
            sim.get_submodule(layer).weight.data = qweight.dequantize(torch.bfloat16).float()
        sim_logits = sim(input_ids=x).logits
    rel = float((ct_logits - sim_logits).norm() / sim_logits.norm())
    assert rel < 1e-4


def test_own_loader_matches_in_memory_simulation_and_applies_lorc(tmp_path):
    from fp8train.export import export, load, quantize_model
    from fp8train.export.simulate import build_model

    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_model(model, "w4a8-fp", method="rtn", lorc_rank=4)
        export(model, tmp_path / "ckpt", "w4a8-fp", method="rtn", lorc_rank=4)
    _, tensors, decompressed = _ct_decompress(tmp_path / "ckpt")
    layer = "model.layers.0.mlp.down_proj"
    assert tensors[f"{layer}.lorc_u"].shape == (128, 4) and tensors[f"{layer}.lorc_v"].shape == (4, 256)
    # compressed-tensors ignores the LoRC factors; fp8train's loader adds U @ V
    assert torch.equal(decompressed[layer], qmodel.weights[layer].dequantize(torch.bfloat16, lorc=False).float())
    loaded = load(tmp_path / "ckpt")
    expected = qmodel.weights[layer].dequantize(torch.float32)
    assert torch.equal(loaded.get_submodule(layer).weight, expected)
    assert not torch.equal(expected, qmodel.weights[layer].dequantize(torch.float32, lorc=False))
    in_memory = build_model(qmodel.config, qmodel.tensors, qmodel.weights, qmodel.activation_formats())
    x = token_batch(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, in_memory(input_ids=x).logits)


def test_tied_embeddings_stay_tied_unless_lm_head_is_quantized(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fp8train.export import export

    model = tiny_llama(tie=True)
    export(model, tmp_path / "tied", "fp8-dynamic")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    info = export(model, tmp_path / "untied", "fp8-dynamic", quantize_lm_head=True, quantize_embeddings=True)
    assert "lm_head" in info["layers"] and "model.embed_tokens" in info["layers"]
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["config_groups"]["group_1"]["targets"] == ["model.embed_tokens"]
    _, _, decompressed = _ct_decompress(tmp_path / "untied")  # the model-free reader finds it by name
    assert set(decompressed) == {"lm_head", "model.embed_tokens"} | {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    tensors = load_file(str(tmp_path / "untied" / "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.embed_tokens.weight"].dtype == torch.float8_e4m3fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct_model = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
        ct_model(input_ids=token_batch(1, 8))
    expected = (tensors["model.embed_tokens.weight"].float() * tensors["model.embed_tokens.weight_scale"].float())
    assert torch.equal(ct_model.model.embed_tokens.weight, expected.to(torch.bfloat16))


def test_gptq_on_a_tied_lm_head_leaves_the_embedding_alone(tmp_path):
    from safetensors.torch import load_file

    from fp8train.export import export

    model = tiny_llama(tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, tmp_path / "out", "w4a16", calibration=token_batch(), quantize_lm_head=True)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight_packed" in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight.to(torch.bfloat16))


def test_a_coat_converted_model_exports_directly(tmp_path):
    """FP8Linear subclasses nn.Linear: a model converted for COAT training exports like the plain model."""
    convert = pytest.importorskip("fp8train.convert").convert
    from safetensors.torch import load_file

    from fp8train.export import export

    plain = tiny_llama()
    converted = convert(tiny_llama(), recipe="coat")
    assert any(type(m).__name__ == "FP8Linear" for m in converted.modules())
    calibration = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("plain", plain), ("coat", converted)):
            export(model, tmp_path / name, "w4a16", calibration=calibration)
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "coat" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
