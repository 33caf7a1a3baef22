"""Suite-wide checks of the CUDA kernels on the CPU executor: every kernel
in cuda/*.cu is launched by some CPU-executed test (run last), the
CPU-executed tests pass again under AddressSanitizer +
UndefinedBehaviorSanitizer with the threads of each block run in reverse
order, and every op copies operands the kernels could not read aligned.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import cupyconv as cc
import cpu_cuda
from cupyconv import _kernels

from conftest import FULL_SUITE, TESTS_DIR
from reference import assert_same_bits

# ------------------------------------------------------------ suite-wide

#: Kernels that only make sense on hardware (tensor-core mma/wmma), by
#: name, with the reason; the coverage test does not require them.
HARDWARE_ONLY = {}

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_GLOBAL = re.compile(r"__global__\b[^;{(]*?\b([A-Za-z_]\w*)\s*\(")


def global_kernels():
    """{file name: names of the __global__ functions it defines}."""
    kernels = {}
    for path in sorted(_kernels.cuda_source_dir().glob("*.cu")):
        text = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", _COMMENT.sub("", path.read_text()))
        kernels[path.name] = set(_GLOBAL.findall(text))
    return kernels


def kernel_name(expression):
    """``ns::kernel<float, 3>`` -> ``kernel``."""
    return expression.split("<", 1)[0].split("::")[-1].strip()


def test_global_kernels_are_found():
    assert "dilation_forward_gather" in global_kernels()["dilation.cu"]


def never_launched(launched):
    """Name expressions and __global__ kernels not among ``launched``
    ({(file name, name expression)}), as readable lines."""
    missing = [f"{family}.cu: {expression}"
               for family, expressions in _kernels.FAMILIES.items()
               for expression in expressions
               if (f"{family}.cu", expression) not in launched
               and kernel_name(expression) not in HARDWARE_ONLY]
    launched_names = {(file, kernel_name(expression)) for file, expression in launched}
    missing += [f"{file}: __global__ {name} (no name expression launches it)"
                for file, names in global_kernels().items() for name in sorted(names)
                if (file, name) not in launched_names and name not in HARDWARE_ONLY]
    return missing


def test_coverage_check_reports_what_was_not_launched():
    gather = "cupyconv::dilation::dilation_forward_gather"
    missing = never_launched({("dilation.cu", f"{gather}<unsigned char>")})
    assert f"dilation.cu: {gather}<unsigned short>" in missing
    assert f"dilation.cu: {gather}<unsigned char>" not in missing
    assert not any("__global__ dilation_forward_gather" in line for line in missing)
    assert "dilation.cu: __global__ dilation_forward_gather (no name expression launches it)" in (
        never_launched(set()))


@pytest.mark.run_last
def test_every_kernel_was_launched_on_the_cpu(request):
    if not request.config.stash[FULL_SUITE]:
        pytest.skip("kernel coverage needs the whole test suite in this session "
                    "(some test files were not collected or tests were deselected)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("kernel coverage needs all tests in one process (not pytest-xdist)")
    missing = never_launched(set(cpu_cuda.LAUNCHED))
    assert not missing, ("never launched by a CPU-executed test (use the cpu_kernels "
                         "fixture):\n  " + "\n  ".join(missing))


@pytest.mark.skipif(os.environ.get(cpu_cuda.SANITIZE_ENV) == "1",
                    reason="this is the sanitized run")
def test_cpu_kernel_tests_pass_under_sanitizers():
    """Re-run every ``cpu_kernels`` test with ASan + UBSan and the threads of
    each block in reverse order, shared memory poisoned with 0xFF (NaN)."""
    if cpu_cuda.compiler_unavailable_reason() is not None:
        pytest.skip(cpu_cuda.compiler_unavailable_reason())
    env = cpu_cuda.sanitizer_environment()
    env[cpu_cuda.SCHEDULE_ENV] = "reverse"
    env[cpu_cuda.SHARED_POISON_ENV] = "0xFF"
    package_root = str(pathlib.Path(cc.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "cpu_kernels",
               "-p", "no:cacheprovider", str(TESTS_DIR)]
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            cwd=package_root, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-8000:]}"
    assert re.search(r"\d+ passed", result.stdout), output[-8000:]


def misaligned(a):
    """A copy of ``a`` whose data starts 2 bytes past an aligned address."""
    raw = np.empty(a.nbytes + 2, np.uint8)
    view = raw[2:].view(a.dtype).reshape(a.shape)
    view[...] = a
    return view


@pytest.mark.paths("cpu_kernels")  # misaligned NumPy buffers
def test_conv2d_and_pooling_copy_misaligned_operands(path):
    rng = np.random.default_rng(3)
    x = misaligned(rng.standard_normal((2, 7, 5, 3)).astype(np.float32))
    w = misaligned(rng.standard_normal((3, 2, 3, 4)).astype(np.float32))
    g = misaligned(rng.standard_normal((2, 7, 4, 4)).astype(np.float32))
    assert x.ctypes.data % 4 and w.ctypes.data % 4 and g.ctypes.data % 4
    keywords = dict(padding=(1, 0))
    for got, expected in [
        (cc.conv2d(x, w, **keywords), path.on_numpy(cc.conv2d, x, w, **keywords)),
        (cc.conv2d_input(x.shape, w, g, **keywords),
         path.on_numpy(cc.conv2d_input, x.shape, w, g, **keywords)),
        (cc.conv2d_weight(x, w.shape, g, **keywords),
         path.on_numpy(cc.conv2d_weight, x, w.shape, g, **keywords)),
    ]:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for window in [(2, 1), (3, 2)]:
        out, idx = cc.max_pool2d(x, window, return_indices=True)
        expected_out, expected_idx = path.on_numpy(cc.max_pool2d, x, window, return_indices=True)
        assert_same_bits(out, expected_out)
        assert_same_bits(idx, expected_idx)
        grad = misaligned(rng.standard_normal(out.shape).astype(np.float32))
        assert_same_bits(cc.max_pool2d_backward(grad, x, window),
                         path.on_numpy(cc.max_pool2d_backward, grad, x, window))
        assert_same_bits(cc.max_pool2d_backward(grad, x, window, indices=misaligned(idx)),
                         path.on_numpy(cc.max_pool2d_backward, grad, x, window, indices=idx))
