"""The CuPy and PyTorch APIs that cupyconv's GPU code and the benchmark's
GPU part call exist, with the arguments used, in the installed versions.

Calling them needs a GPU; a renamed or removed API would otherwise show up
only on a machine with one.  Skips where CuPy or PyTorch is not installed.
"""

import inspect

import pytest

#: Attributes of the ``cupy`` module that cupyconv (kernel loading, dispatch,
#: backend description, demo) and the benchmark use.
CUPY_API = [
    "ndarray", "asarray", "empty", "zeros", "zeros_like", "ones", "matmul", "tensordot",
    "exp", "log", "sqrt", "arange", "get_array_module", "from_dlpack", "RawModule",
    "RawKernel", "get_default_memory_pool", "random.default_rng", "random.RandomState",
    "cuda.Event", "cuda.get_elapsed_time", "cuda.get_current_stream", "cuda.Device",
    "cuda.compiler.CompileException", "cuda.runtime.getDevice", "cuda.runtime.getDeviceCount",
    "cuda.runtime.getDeviceProperties", "cuda.runtime.runtimeGetVersion",
    "cuda.MemoryPointer.copy_from_device_async", "cuda.memory.MemoryPool.free_all_blocks",
    "cuda.Event.record", "cuda.Stream.synchronize", "RawModule.get_function",
    "random.Generator.random", "random.Generator.uniform",
    "random.RandomState.standard_normal",
]

#: Attributes of ``torch`` that the benchmark's GPU part uses.
TORCH_API = [
    "cuda.is_available", "cuda.Event", "cuda.synchronize", "cuda.empty_cache",
    "backends.cudnn.version", "backends.cudnn.benchmark", "backends.cuda.matmul",
    "from_dlpack", "channels_last", "contiguous_format",
    "ops.aten.max_pool2d_with_indices_backward",
]


def resolve(module, path):
    value = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("path", CUPY_API)
def test_cupy_api_exists(path):
    cupy = pytest.importorskip("cupy")
    resolve(cupy, path)


def test_cupy_signatures():
    cupy = pytest.importorskip("cupy")
    assert "dtype" in inspect.signature(cupy.random.RandomState.standard_normal).parameters
    # RawModule is a Cython class: its call signature is the docstring's first line.
    first_line = cupy.RawModule.__doc__.strip().splitlines()[0]
    for keyword in ("code", "options", "name_expressions"):
        assert keyword in first_line, first_line


@pytest.mark.parametrize("path", TORCH_API)
def test_torch_api_exists(path):
    torch = pytest.importorskip("torch")
    resolve(torch, path)


def test_torch_tf32_switches():
    """The benchmark sets TF32 through ``fp32_precision`` where PyTorch has it
    (both backends), else through the older ``allow_tf32`` flags."""
    torch = pytest.importorskip("torch")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        assert hasattr(torch.backends.cuda.matmul, "fp32_precision")
    else:
        assert hasattr(torch.backends.cudnn, "allow_tf32")
        assert hasattr(torch.backends.cuda.matmul, "allow_tf32")
