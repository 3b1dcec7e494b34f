"""Triton kernels may only read module globals that are ``tl.constexpr`` (or functions/modules): the GPU compiler
refuses anything else, while the CPU interpreter accepts it -- a mistake that twice reached the GPU before being
caught.  This check needs no GPU: it inspects the global names every @triton.jit function of fp8train.kernels uses."""

import importlib
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fp8train.kernels  # noqa: E402


def _kernel_modules():
    for info in pkgutil.iter_modules(fp8train.kernels.__path__):
        yield importlib.import_module(f"fp8train.kernels.{info.name}")


def _code_names(code):
    names = set(code.co_names)
    for const in code.co_consts:  # nested code objects (comprehensions, inner functions)
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def test_jit_functions_read_only_constexpr_globals():
    checked, bad = 0, []
    for module in _kernel_modules():
        for name, obj in vars(module).items():
            if not isinstance(obj, triton.runtime.JITFunction):
                continue
            checked += 1
            for used in _code_names(obj.fn.__code__):
                value = obj.fn.__globals__.get(used)
                if value is None or isinstance(value, (types.ModuleType, tl.constexpr, triton.runtime.JITFunction,
                                                       type, types.FunctionType, types.BuiltinFunctionType)):
                    continue
                bad.append(f"{module.__name__}.{name} reads global {used} = {value!r}")
    assert checked > 10, "no Triton kernels found"
    assert not bad, "non-constexpr globals inside @triton.jit functions:\n" + "\n".join(bad)
