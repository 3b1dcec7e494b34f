"""Launch plans (fp8train.kernels.plans) change speed only: every element-wise kernel gives the same bits under
any plan.  Run by the Triton CPU interpreter on small shapes in a subprocess (TRITON_INTERPRET must be set before
triton loads); the GPU sweep (benchmarks/gpu/plans.py) checks the same on the device.
"""

import os

import pytest

from triton_interpreter import run_under_interpreter

# two plans far from the default on every field
OTHER_PLANS = (
    dict(tile_elements=2048, max_cols=64, warps=4, programs_per_sm=1, transposed_tile=(32, 64), transposed_warps=4,
         gather_scales=True, max_registers=80, joint_amax=True),
    dict(tile_elements=16384, max_cols=256, warps=16, programs_per_sm=16, transposed_tile=(128, 32),
         transposed_warps=8, gather_scales=False),
)


def test_plan_validation():
    pytest.importorskip("triton")
    from fp8train.kernels import plans

    with pytest.raises(ValueError, match="power of two"):
        plans.Plan(tile_elements=1000)
    with pytest.raises(ValueError, match="transposed_tile"):
        plans.Plan(transposed_tile=(8, 128))
    with pytest.raises(ValueError, match="warps"):
        plans.Plan(warps=3)
    with pytest.raises(ValueError, match="max_registers"):
        plans.Plan(max_registers=8)
    assert plans.register_cap("gated_backward") == {}  # no cap in its plan
    with plans.using_plan("gated_backward", max_registers=80):
        assert plans.register_cap("gated_backward") == {"maxnreg": 80}
    with pytest.raises(ValueError, match="unknown kernel family"):
        plans.plan("gated")
    before = plans.plan("quantize")
    with plans.using_plan("quantize", warps=4) as p:
        assert plans.plan("quantize") is p and p.warps == 4 and plans.plan("residual") == plans.DEFAULT
    assert plans.plan("quantize") == before
    # set_plan(..., None) goes back to the shipped plan: the GPU-tuned one where there is one
    tuned = plans.plan("gated_backward")
    assert tuned == plans.TUNED["gated_backward"] != plans.DEFAULT
    plans.set_plan("gated_backward", plans.DEFAULT)
    assert plans.plan("gated_backward") == plans.DEFAULT
    plans.set_plan("gated_backward", None)
    assert plans.plan("gated_backward") == tuned
    assert plans.elementwise_tile(5632, "residual") == (16, 512)
    assert plans.elementwise_tile(48, "residual", group=128) == (64, 128)
    assert plans.elementwise_tile(48, "residual", transposed=True) == plans.DEFAULT.transposed_tile
    assert plans.elementwise_tile(5632, "quantize") == (8, 2048)  # TUNED


def test_plans_from_environment():
    """FP8TRAIN_PLANS changes single fields of the shipped plans, typed like the fields; mistakes are errors."""
    pytest.importorskip("triton")
    import dataclasses
    import subprocess
    import sys

    from fp8train.kernels import plans

    got = plans.overrides_from_env(" gated_backward_predicted.gather_scales=1, residual.warps=4,"
                                   "gated_forward_predicted.transposed_tile=32x64,residual.gather_scales=true")
    assert got["gated_backward_predicted"] == dataclasses.replace(plans.TUNED["gated_backward_predicted"],
                                                                  gather_scales=True)
    assert got["residual"] == plans.Plan(warps=4, gather_scales=True)
    assert got["gated_forward_predicted"].transposed_tile == (32, 64)
    assert plans.overrides_from_env("") == {}
    chosen = {"quantize": plans.Plan(tile_elements=2048, transposed_tile=(32, 64), gather_scales=True),
              "gated_forward_predicted": plans.Plan(max_registers=80)}
    assert plans.overrides_from_env(plans.env_spec(chosen)) == chosen
    for bad, message in (("quantize.bogus=1", "not a Plan field"), ("quantize.warps=four", "bad value"),
                         ("quantize.gather_scales=2", "bad value"), ("quantize=1", "family.field=value"),
                         ("gated.warps=4", "unknown kernel family"), ("quantize.warps=3", "power of two")):
        with pytest.raises(ValueError, match=message):
            plans.overrides_from_env(bad)
    # read once at import: the process's plans are the shipped ones changed by the variable
    code = "from fp8train.kernels import plans; print(plans.plan('gated_backward_predicted').gather_scales)"
    env = dict(os.environ, FP8TRAIN_PLANS="gated_backward_predicted.gather_scales=1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True" and not plans.plan("gated_backward_predicted").gather_scales


def test_plans_give_identical_bits_under_interpreter():
    pytest.importorskip("triton")
    run_under_interpreter(__file__, marker="plans: ok")


def _flat(result):
    """Every tensor in a kernel's result (QuantizedTensors opened up), in order."""
    import torch

    from fp8train.quant import QuantizedTensor

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, QuantizedTensor):
        return [t for t in (result.data, result.amax) if t is not None]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flat(item)]
    return []


def _bits(t):
    import torch

    t = t.detach().contiguous()
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t.view(-1).clone()


def calls():
    """(name, family, zero-argument callable) for every element-wise kernel entry point."""
    import torch

    import triton_interpreter as ti
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels import activation, gated_from_copies, gated_product, layernorm, quantize, residual, rmsnorm
    from fp8train.quant import quantize as quantize_ref

    shape = (33, 160)
    x = ti._inputs(shape, torch.bfloat16)
    y = ti._inputs(shape, torch.bfloat16, seed=1)
    dy = ti._inputs(shape, torch.bfloat16, seed=2)
    w = ti._inputs((160,), torch.float32, seed=3) + 1.0
    b = ti._inputs((160,), torch.float32, seed=4)
    copy_x = quantize_ref(x, "e4m3", "1x16", scale_dtype=torch.bfloat16)
    copy_y = quantize_ref(y, "e4m3", "1x16", scale_dtype=torch.bfloat16)
    per_tensor = quantize_ref(x, "e4m3", "tensor")
    _, rstd, _ = rmsnorm.rmsnorm_forward(x, w, 1e-6, "llama")
    _, ln_rstd, centred = layernorm.layernorm_forward(x, w, b, 1e-5)
    return [
        ("quantize_groups", "quantize", lambda: quantize.quantize_groups(x, E4M3)),
        ("quantize_groups 1x32", "quantize", lambda: quantize.quantize_groups(x, E4M3, group_size=32)),
        ("quantize_tensorwise + T", "quantize", lambda: quantize.quantize_tensorwise(x, E5M2, with_transpose=True)),
        ("dequantize_tensorwise", "dequantize",
         lambda: quantize.dequantize_tensorwise(per_tensor.data, per_tensor.amax, 448.0, torch.bfloat16)),
        ("activation fwd", "activation", lambda: activation.activation_forward(x, "silu")),
        ("activation fwd E4M3 + T", "activation",
         lambda: activation.activation_forward(x, "gelu_tanh", quantize_output=True, output_transpose=True)),
        ("activation bwd", "activation", lambda: activation.activation_backward(dy, copy_x, "silu")),
        ("gated fwd", "gated_forward", lambda: gated_product.gated_product_forward(x, y, "silu")),
        ("gated fwd E4M3 + T", "gated_forward",
         lambda: gated_product.gated_product_forward(x, y, "silu", quantize_output=True, output_transpose=True)),
        ("gated bwd", "gated_backward", lambda: gated_product.gated_product_backward(dy, copy_x, copy_y, "silu")),
        ("gated bwd E5M2 + T", "gated_backward",
         lambda: gated_product.gated_product_backward(dy, copy_x, copy_y, "silu", quantize_output=True,
                                                      output_transpose=True)),
        ("gated fwd predicted E4M3 + T", "gated_forward_predicted",
         lambda: gated_product.gated_product_forward(x, y, "silu", quantize_output=True, output_transpose=True,
                                                     prediction=torch.full((1,), 7.0))),
        ("gated bwd predicted E5M2 + T", "gated_backward_predicted",
         lambda: gated_product.gated_product_backward(dy, copy_x, copy_y, "silu", quantize_output=True,
                                                      output_transpose=True, prediction=torch.full((2,), 3.0))),
        ("product from copies + T", "product_from_copies",
         lambda: gated_from_copies.product_from_copies(copy_x, copy_y, "silu", torch.bfloat16, with_transpose=True)),
        ("residual add + copy", "residual", lambda: residual.residual_add(x, y, emit_fp8_copy=True)),
        ("rmsnorm fwd E4M3 + T", "norm",
         lambda: rmsnorm.rmsnorm_forward(x, w, 1e-6, "llama", quantize_output=True, output_transpose=True)),
        ("rmsnorm bwd", "norm", lambda: rmsnorm.rmsnorm_backward(dy, copy_x, rstd, w, "llama", second_dy=y)),
        ("layernorm fwd E4M3 + T", "norm",
         lambda: layernorm.layernorm_forward(x, w, b, 1e-5, quantize_output=True, output_transpose=True)),
        ("layernorm bwd", "norm", lambda: layernorm.layernorm_backward(dy, centred, ln_rstd, w, True)),
    ]


def _quantized(result):
    from fp8train.quant import QuantizedTensor

    if isinstance(result, QuantizedTensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [q for item in result for q in _quantized(item)]
    return []


def check():
    import torch

    import triton_interpreter as ti
    from fp8train.kernels import plans

    ti.patch_interpreter()
    hinted = 0
    for name, family, call in calls():
        result = call()
        for q in _quantized(result):
            if q.scale_hint is not None:  # the per-tensor kernels store amax / fmax beside the amax
                inverse = torch.tensor(1.0) / torch.tensor(q.fmt.max, dtype=torch.float32)
                assert torch.equal(q.scale_hint, q.amax.float() * inverse), name
                # 256-byte aligned: cuBLASLt refuses a scale pointer 4 bytes into an allocation
                assert q.scale_hint.storage_offset() % 64 == 0 and q.amax.storage_offset() % 64 == 0, name
                hinted += 1
        reference = [_bits(t) for t in _flat(result)]
        assert reference, name
        for changes in OTHER_PLANS:
            with plans.using_plan(family, **changes):
                got = [_bits(t) for t in _flat(call())]
            assert len(got) == len(reference), name
            for i, (g, r) in enumerate(zip(got, reference)):
                assert torch.equal(g, r), f"{name}: output {i} differs under plan {changes}"
    assert hinted >= 8, hinted
    print("plans: ok")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    check()
