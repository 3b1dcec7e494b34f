"""fp8train.kernels.launch: host helpers against Triton's, and the fast launcher's caching logic.

The launcher's work with real compiled kernels (same bits as Triton's path, no recompiles) is checked on the GPU
(benchmarks/gpu/host.py); here a stand-in for the JITFunction records what the launcher asks of it.
"""

import types

import pytest

triton = pytest.importorskip("triton")

from fp8train.kernels import launch  # noqa: E402


def test_host_helpers_match_triton():
    for n in range(0, 5000, 7):
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 16, 128, 1000):
            assert launch.cdiv(n, d) == triton.cdiv(n, d)


class _Compiled:
    def __init__(self, name):
        self.name, self.function, self.packed_metadata, self.launches = name, f"fn-{name}", f"meta-{name}", []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)

    def run(self, *args):
        self.launches.append(args)


class _StandIn:
    """What FastKernel uses of a JITFunction: ``device_caches[device][4]`` (the binder) and ``run``."""

    def __init__(self):
        self.compiled, self.slow_runs = {}, []

        def binder(x, n, BLOCK=64, **options):
            # Triton's binder: the bound arguments, what it specializes on, the launch options
            return {"x": x, "n": n, "BLOCK": BLOCK}, [("*fp32", x % 16 == 0), ("i32", n == 1), ("constexpr", BLOCK)], options

        self.device_caches = {0: ({}, {}, None, None, binder)}

    def run(self, *args, grid, warmup, **kwargs):
        params, specialization, options = self.device_caches[0][4](*args, **kwargs)
        key = (tuple(specialization), tuple(options.items()))
        kernel = self.compiled.setdefault(key, _Compiled(len(self.compiled)))
        self.slow_runs.append((grid, args, kwargs))
        return kernel


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(launch, "_driver", types.SimpleNamespace(get_current_stream=lambda device: 1234))
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    launch.set_enabled(True)
    return _StandIn()


def test_repeat_launches_go_straight_to_the_compiled_kernel(stand_in):
    kernel = launch.FastKernel(stand_in)
    first = kernel[(5,)](32, 7, BLOCK=128, num_warps=4)  # compiled (and launched) by Triton's path
    assert len(stand_in.slow_runs) == 1 and first.launches == []
    again = kernel[(6, 2)](48, 9, BLOCK=128, num_warps=4)  # same specialization: the fast path
    assert again is first and len(stand_in.slow_runs) == 1
    (launched,) = first.launches
    assert launched == (6, 2, 1, 1234, "fn-0", "meta-0", ("metadata", (6, 2), 1234),
                        launch.triton.knobs.runtime.launch_enter_hook, launch.triton.knobs.runtime.launch_exit_hook,
                        48, 9, 128)


class _Launcher:
    """Triton's CudaLauncher as the direct path sees it: a C launch function and what the kernel needs."""

    def __init__(self, scratch=0):
        self.global_scratch_size, self.profile_scratch_size, self.num_ctas = scratch, 0, 1
        self.launch_cooperative_grid, self.launch_pdl = False, True
        self.c_calls, self.object_calls = [], []

    def launch(self, *args):
        self.c_calls.append(args)

    def __call__(self, *args):
        self.object_calls.append(args)


@pytest.mark.parametrize("scratch", [0, 256])
def test_kernels_without_scratch_memory_are_launched_by_the_c_function(stand_in, monkeypatch, scratch):
    kernel = launch.FastKernel(stand_in)
    compiled = kernel[(1,)](32, 7)
    compiled.run = _Launcher(scratch)
    kernel._compiled.clear()
    kernel[(1,)](32, 7)  # re-registers the compiled kernel (Triton's path), now with its launcher object
    kernel[(3,)](32, 5)
    if scratch:  # needs scratch memory: Triton's launcher object allocates it
        assert compiled.run.c_calls == [] and compiled.run.object_calls[0][:3] == (3, 1, 1)
    else:
        assert compiled.run.object_calls == []
        assert compiled.run.c_calls == [(3, 1, 1, 1234, "fn-0", False, True, None, None, "meta-0", None, None, None,
                                         32, 5, 64)]
    # with a launch hook registered (Proton), launches go through Triton's launcher with metadata and hooks
    hooks = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[print]),
                                  launch_exit_hook=types.SimpleNamespace(calls=[]))
    monkeypatch.setattr(launch, "_knobs", types.SimpleNamespace(runtime=hooks))
    kernel[(4,)](32, 5)
    assert compiled.run.object_calls[-1][:7] == (4, 1, 1, 1234, "fn-0", "meta-0", ("metadata", (4,), 1234))


def test_a_new_specialization_or_option_takes_tritons_path(stand_in):
    kernel = launch.FastKernel(stand_in)
    kernel[(1,)](32, 7)
    kernel[(1,)](33, 7)  # pointer alignment changes
    kernel[(1,)](32, 1)  # an int becomes 1
    kernel[(1,)](32, 7, BLOCK=256)  # constexpr
    kernel[(1,)](32, 7, num_warps=8)  # launch option
    assert len(stand_in.slow_runs) == 5
    kernel[(1,)](64, 3)  # like the first call: no new compile, launched directly
    assert len(stand_in.slow_runs) == 5 and len(stand_in.compiled[((("*fp32", True), ("i32", False),
                                                                    ("constexpr", 64)), ())].launches) == 1


def test_callable_grid_gets_the_bound_arguments(stand_in):
    kernel = launch.FastKernel(stand_in)
    grid = lambda meta: (launch.cdiv(meta["n"], meta["BLOCK"]),)  # noqa: E731
    compiled = kernel[grid](32, 300)
    kernel[grid](32, 700)
    assert compiled.launches[0][:3] == (11, 1, 1)


def test_switched_off_every_launch_takes_tritons_path(stand_in):
    kernel = launch.FastKernel(stand_in)
    previous = launch.set_enabled(False)
    try:
        for _ in range(3):
            kernel[(1,)](32, 7)
    finally:
        launch.set_enabled(previous)
    assert len(stand_in.slow_runs) == 3


def test_attributes_reach_the_wrapped_kernel(stand_in):
    kernel = launch.FastKernel(stand_in)
    assert kernel.device_caches is stand_in.device_caches


def test_plain_kernels_are_wrapped_and_others_left_alone():
    @triton.jit
    def _kernel(x_ptr, BLOCK: triton.language.constexpr):
        pass

    assert isinstance(launch.fast_launch(_kernel), launch.FastKernel) == launch._KNOWN_TRITON
    not_a_kernel = object()
    assert launch.fast_launch(not_a_kernel) is not_a_kernel
