"""Backend dispatch, helpers and kernel-source lookup, with and without CuPy."""

import subprocess
import sys
import types

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _backend, _kernels


class FakeCupyArray:
    """Stands in for cupy.ndarray: dispatch only looks at the type."""


@pytest.fixture
def fake_cupy(monkeypatch):
    module = types.ModuleType("cupy")
    module.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


def test_numpy_inputs_and_array_likes_go_to_numpy():
    assert cc.get_array_module(np.ones(2), [1, 2], 3.0, None) is np
    assert cc.get_array_module() is np


def test_cupy_inputs_go_to_cupy(fake_cupy):
    assert cc.get_array_module(FakeCupyArray(), None, FakeCupyArray()) is fake_cupy


def test_mixing_names_the_arguments(fake_cupy):
    with pytest.raises(TypeError, match=r"x is a cupy.ndarray, w is a numpy.ndarray"):
        _backend.dispatch(x=FakeCupyArray(), w=np.ones(2), bias=None)
    with pytest.raises(TypeError, match=r"a is a list"):
        _backend.dispatch(a=[1, 2], b=FakeCupyArray())
    with pytest.raises(TypeError, match=r"arrays\[0\] is a numpy.ndarray"):
        cc.get_array_module(np.ones(1), FakeCupyArray())


def test_asnumpy():
    a = np.arange(3)
    assert cc.asnumpy(a) is a
    np.testing.assert_array_equal(cc.asnumpy((1, 2)), [1, 2])


def test_gpu_probe_reasons(monkeypatch):
    _backend._probe_gpu.cache_clear()
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    try:
        assert cc.gpu_available() is False
        assert cc.gpu_unavailable_reason().startswith("CuPy is not installed")
        info = cc.backend_info()
        assert info["backend"] == "NumPy fallback" and "not installed" in info["reason"]
    finally:
        _backend._probe_gpu.cache_clear()


def test_gpu_probe_without_driver(monkeypatch, fake_cupy):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver")

    fake_cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_driver))
    _backend._probe_gpu.cache_clear()
    try:
        assert not cc.gpu_available()
        assert "no usable CUDA driver" in cc.gpu_unavailable_reason()
        fake_cupy.cuda.runtime.getDeviceCount = lambda: 0
        _backend._probe_gpu.cache_clear()
        assert cc.gpu_unavailable_reason() == "CuPy found no CUDA device"
    finally:
        _backend._probe_gpu.cache_clear()


def test_import_never_imports_cupy():
    code = "import sys, cupyconv; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_every_family_has_its_source():
    source_dir = _kernels.cuda_source_dir()
    for family, expressions in _kernels.FAMILIES.items():
        assert (source_dir / f"{family}.cu").is_file(), family
        assert expressions and len(set(expressions)) == len(expressions)


def test_unknown_kernel_name_is_rejected():
    with pytest.raises(KeyError, match="not declared"):
        _kernels.get_function("dilation", "dilation_forward_gather<float>")


def test_main_prints_backend_and_self_check():
    out = subprocess.run([sys.executable, "-m", "cupyconv"], capture_output=True,
                         text=True)
    assert "cupyconv " + cc.__version__ in out.stdout
    assert "backend:" in out.stdout and "dilate/undilate" in out.stdout
    assert out.returncode == 0, out.stdout + out.stderr


def test_compile_error_names_the_file_and_carries_the_log(monkeypatch, fake_cupy):
    """The CuPy provider turns NVRTC's exception into KernelCompileError."""

    class CompileException(Exception):
        def get_message(self):
            return "dilation.cu(12): error: expected a ';'"

    class RawModule:
        def __init__(self, code, options, name_expressions):
            assert "dilation_forward_gather" in code and "-std=c++17" in options
            assert any(o.startswith("-I") for o in options)

        def compile(self):
            raise CompileException()

    fake_cupy.RawModule = RawModule
    fake_cupy.cuda = types.SimpleNamespace(
        compiler=types.SimpleNamespace(CompileException=CompileException),
        runtime=types.SimpleNamespace(getDevice=lambda: 0))
    with _kernels.use_provider(_kernels.CupyProvider()):
        with pytest.raises(cc.KernelCompileError, match=r"dilation\.cu failed:\n.*expected a ';'"):
            _kernels.get_function("dilation", _kernels.FAMILIES["dilation"][0])


def test_modules_compile_once_per_source_options_and_device(fake_cupy):
    """Lazily, on the first get_function, then reused; a new device compiles again."""
    built = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            built.append(options)

        def compile(self):
            pass

        def get_function(self, name):
            return name

    device = [0]
    fake_cupy.RawModule = RawModule
    fake_cupy.cuda = types.SimpleNamespace(
        compiler=types.SimpleNamespace(CompileException=RuntimeError),
        runtime=types.SimpleNamespace(getDevice=lambda: device[0]))
    names = _kernels.FAMILIES["dilation"]
    with _kernels.use_provider(_kernels.CupyProvider()):
        assert built == []
        assert _kernels.get_function("dilation", names[0]) == names[0]
        assert _kernels.get_function("dilation", names[1]) == names[1]
        assert len(built) == 1
        device[0] = 1
        _kernels.get_function("dilation", names[0])
        assert len(built) == 2
