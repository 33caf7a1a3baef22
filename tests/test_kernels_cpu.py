"""cuda/dilation.cu through the CPU executor, bit for bit against the NumPy path.

Also home of two suite-wide checks: every kernel in cuda/*.cu is launched by
some CPU-executed test (run last), and the CPU-executed tests pass again
under AddressSanitizer + UndefinedBehaviorSanitizer with the threads of each
block run in reverse order.
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
from cupyconv.dilation import _cuda as dilation_cuda

from conftest import FULL_SUITE, TESTS_DIR

# One dtype per copy instantiation (item size 1, 2, 4, 8, 16) and a few more.
COPY_DTYPES = [np.bool_, np.int8, np.float16, np.int16, np.float32, np.int32,
               np.float64, np.int64, np.complex64, np.complex128]


def random_array(shape, dtype, seed=0):
    """Arbitrary bit patterns (NaN payloads included): a copy must keep them."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    raw = rng.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def numpy_path(function, *args, **kwargs):
    """``function`` computed by the NumPy code path, not the kernels."""
    with cpu_cuda.numpy_path():
        return function(*args, **kwargs)


def assert_same_bits(got, expected):
    assert type(got) is type(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(np.frombuffer(got.tobytes(), np.uint8),
                                  np.frombuffer(expected.tobytes(), np.uint8))


# (input view, axes, dilation, shape or None): sizes not multiples of the
# 256-thread block, length-1 and length-0 axes, views of every layout.
def _cases():
    base = np.arange(6 * 7 * 5).reshape(6, 7, 5)
    return {
        "1d-odd": (lambda a: a[:, 0, 0], 0, 2, None),
        "2d-both-axes": (lambda a: a[:5, :7, 0], (0, 1), (1, 3), None),
        "3d-last-axis": (lambda a: a, -1, 4, None),
        "single-element-dims": (lambda a: a[:1, :1, :3], (0, 1, 2), (2, 0, 1), None),
        "zero-dilation": (lambda a: a[:3, :4, 1], (0, 1), 0, None),
        "transposed": (lambda a: a[:, :, 2].T, (0, 1), (2, 1), None),
        "reversed": (lambda a: a[::-1, ::-1, 0], 1, 3, None),
        "strided": (lambda a: a[::2, 1::3, ::2], (0, 2), (1, 2), None),
        "negative-strided-3d": (lambda a: a[::-2, :, ::-1].transpose(2, 0, 1), (1, 2), (3, 1), None),
        "large-dilation": (lambda a: a[:3, 0, 0], 0, 1000, None),
        "explicit-shape": (lambda a: a[:4, :3, 0], (0, 1), (1, 2), (9, 10)),
        "minimal-shape": (lambda a: a[:4, :3, 0], (0, 1), (1, 2), (7, 7)),
        "zero-length-axis": (lambda a: a[:0, :4, 0], (0, 1), (1, 1), None),
        "zero-length-other-axis": (lambda a: a[:3, :0, 0], 0, 2, None),
        # Trailing runs not dilated move as wider words (5 and 4 elements).
        "contiguous-tail": (lambda a: a, (0, 1), (1, 2), None),
        "tail-of-4": (lambda a: a[:, 1:, :4], (0, 1), (2, 1), None),
        "length-1-axes-between": (lambda a: a[:, :1, :4, None], (0, 2), 1, None),
        "four-axes": (lambda a: a.reshape(2, 3, 7, 5), (0, 1, 2), (1, 2, 1), None),
    }, base


CASES, BASE_SHAPE = _cases()


@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dilate_matches_numpy_path(cpu_kernels, case, dtype):
    select, axes, dilation, shape = CASES[case]
    a = select(random_array(BASE_SHAPE.shape, dtype, seed=len(case)))
    expected = numpy_path(cc.dilate, a, axes, dilation, shape=shape)
    assert_same_bits(cc.dilate(a, axes, dilation, shape=shape), expected)


@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_undilate_matches_numpy_path(cpu_kernels, case, dtype):
    select, axes, dilation, _ = CASES[case]
    a = select(random_array(BASE_SHAPE.shape, dtype, seed=len(case)))
    expected = numpy_path(cc.undilate, a, axes, dilation)
    assert_same_bits(cc.undilate(a, axes, dilation), expected)


@pytest.mark.parametrize("dtype", [np.int8, np.complex128], ids=lambda d: np.dtype(d).name)
def test_dilate_zero_dimensional(cpu_kernels, dtype):
    a = random_array((), dtype)
    assert_same_bits(cc.dilate(a, (), ()), numpy_path(cc.dilate, a, (), ()))


@pytest.mark.parametrize("dtype", [np.int8, np.complex128], ids=lambda d: np.dtype(d).name)
def test_undilate_zero_dimensional(cpu_kernels, dtype):
    a = random_array((), dtype)
    expected = numpy_path(cc.undilate, a, (), ())
    assert isinstance(expected, np.ndarray)
    assert_same_bits(cc.undilate(a, (), ()), expected)


@pytest.mark.parametrize("case", ["2d-both-axes", "contiguous-tail", "negative-strided-3d",
                                  "explicit-shape", "length-1-axes-between"])
def test_64_bit_index_path(cpu_kernels, monkeypatch, case):
    """Outputs of 2**31 elements and more decode positions with 64-bit
    divisions; shown here on small inputs by lowering the threshold."""
    monkeypatch.setattr(_kernels, "FAST_INDEX_LIMIT", 0)
    select, axes, d, shape = CASES[case]
    a = select(random_array(BASE_SHAPE.shape, np.float32, seed=4))
    assert_same_bits(cc.dilate(a, axes, d, shape=shape),
                     numpy_path(cc.dilate, a, axes, d, shape=shape))
    assert_same_bits(cc.undilate(a, axes, d), numpy_path(cc.undilate, a, axes, d))


@pytest.mark.parametrize("limit", [2**31, 0], ids=["32-bit", "64-bit"])
def test_many_axes(cpu_kernels, monkeypatch, limit):
    """More axes than the kernel's unrolled cases (4) after merging."""
    monkeypatch.setattr(_kernels, "FAST_INDEX_LIMIT", limit)
    a = random_array((2, 3, 2, 3, 2, 3), np.int16, seed=6)[..., ::-1]
    axes, d = (0, 1, 2, 3, 4), (1, 0, 2, 1, 3)
    assert len(dilation_cuda._merged_axes(
        a.shape, a.shape, (2, 1, 3, 2, 4, 1), a.strides)) == 6
    assert_same_bits(cc.dilate(a, axes, d), numpy_path(cc.dilate, a, axes, d))
    assert_same_bits(cc.undilate(a, axes, d), numpy_path(cc.undilate, a, axes, d))


def test_gather_merges_axes_and_moves_wide_words():
    # NHWC float32, 16 channels, dilated along H and W: the channels move as
    # four 16-byte words and the batch axis stays, the length-1 axis goes.
    axes = dilation_cuda._merged_axes((8, 1, 31, 31, 16), (8, 1, 16, 16, 16), (1, 1, 2, 2, 1),
                                 (16384, 16384, 1024, 64, 4))
    assert axes == [(8, 8, 1, 16384), (31, 16, 2, 1024), (31, 16, 2, 64), (16, 16, 1, 4)]
    assert dilation_cuda._in_units(axes, 4, 4096) == (16, axes[:3] + [(4, 4, 1, 16)])
    # Contiguous axes not dilated merge into one; a misaligned address
    # narrows the words, down to parts of one element.
    assert dilation_cuda._merged_axes((4, 5, 6), (4, 5, 6), (1, 1, 1), (240, 48, 8)) == [(120, 120, 1, 8)]
    assert dilation_cuda._in_units([(120, 120, 1, 8)], 8, 4100) == (4, [(240, 240, 1, 4)])
    assert dilation_cuda._in_units([(9, 5, 2, 16)], 8, 4098) == (2, [(9, 5, 2, 16), (4, 4, 1, 2)])


def test_axis_table_is_made_once_per_geometry(cpu_kernels):
    """Repeated calls reuse the kernel's table of axes: on a GPU a fresh one
    would be a host-to-device copy that waits for the queue to drain."""
    a = random_array((4, 6, 8), np.float32, seed=8)
    cc.dilate(a, (0, 1), 1)
    before = dilation_cuda._axis_table.cache_info()
    for _ in range(3):
        cc.dilate(a, (0, 1), 1)
    after = dilation_cuda._axis_table.cache_info()
    assert after.hits == before.hits + 3 and after.misses == before.misses


def test_divisor32_is_exact():
    rng = np.random.default_rng(0)
    divisors = np.concatenate([np.arange(1, 300), 2 ** np.arange(31), 2 ** np.arange(2, 31) - 1,
                               rng.integers(1, 2**31, 500)])
    for d in divisors.tolist():
        magic, shift = _kernels.divisor32(d)
        assert 0 < magic < 2**32
        n = np.concatenate([rng.integers(0, 2**31, 200), [0, d - 1, d, 2**31 - 1],
                            np.minimum(np.arange(1, 40) * d, 2**31 - 1) - 1]).astype(np.uint64)
        got = (((n * np.uint64(magic)) >> np.uint64(32)) + n) >> np.uint64(shift)
        np.testing.assert_array_equal(got, n // np.uint64(d), err_msg=f"divisor {d}")


def test_roundtrip_through_kernels(cpu_kernels):
    a = random_array((17, 3, 9), np.float32, seed=3)
    d = cc.dilate(a[:, ::-1], (0, 2), (2, 5))
    assert_same_bits(cc.undilate(d, (0, 2), (2, 5)), np.ascontiguousarray(a[:, ::-1]))


def test_grid_stride_loop(cpu_kernels):
    # More elements than grid_for's 8192 blocks x 256 threads: each thread
    # handles two or more elements through the kernel's grid-stride loop.
    a = random_array((1100, 1000), np.uint8, seed=5)
    assert a.size * 2 > 8192 * 256
    got = cc.dilate(a, 1, 1)
    assert_same_bits(got, numpy_path(cc.dilate, a, 1, 1))


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


@pytest.mark.parametrize("dtype", [np.complex64, np.int64, np.complex128, np.float32],
                         ids=lambda d: np.dtype(d).name)
def test_views_not_aligned_to_their_itemsize(cpu_kernels, dtype):
    """A view reinterpreted at an odd byte offset (legal in NumPy and CuPy) is
    moved in narrower units instead of being read misaligned."""
    itemsize = np.dtype(dtype).itemsize
    raw = random_array((6 * 7 * itemsize + 2,), np.uint8)
    a = raw[2:].view(dtype).reshape(6, 7)[:, ::-2]  # 2-byte aligned only
    for case in [((0, 1), (1, 2), None), ((1,), 3, (6, 13))]:
        axes, dilation, shape = case
        assert_same_bits(cc.dilate(a, axes, dilation, shape=shape),
                         numpy_path(cc.dilate, a, axes, dilation, shape=shape))
        assert_same_bits(cc.undilate(a, axes, dilation),
                         numpy_path(cc.undilate, a, axes, dilation))


def misaligned(a):
    """A copy of ``a`` whose data starts 2 bytes past an aligned address."""
    raw = np.empty(a.nbytes + 2, np.uint8)
    view = raw[2:].view(a.dtype).reshape(a.shape)
    view[...] = a
    return view


def test_conv2d_and_pooling_copy_misaligned_operands(cpu_kernels):
    rng = np.random.default_rng(3)
    x = misaligned(rng.standard_normal((2, 7, 5, 3)).astype(np.float32))
    w = misaligned(rng.standard_normal((3, 2, 3, 4)).astype(np.float32))
    g = misaligned(rng.standard_normal((2, 7, 4, 4)).astype(np.float32))
    assert x.ctypes.data % 4 and w.ctypes.data % 4 and g.ctypes.data % 4
    keywords = dict(padding=(1, 0))
    for got, expected in [
        (cc.conv2d(x, w, **keywords), numpy_path(cc.conv2d, x, w, **keywords)),
        (cc.conv2d_input(x.shape, w, g, **keywords),
         numpy_path(cc.conv2d_input, x.shape, w, g, **keywords)),
        (cc.conv2d_weight(x, w.shape, g, **keywords),
         numpy_path(cc.conv2d_weight, x, w.shape, g, **keywords)),
    ]:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for window in [(2, 1), (3, 2)]:
        out, idx = cc.max_pool2d(x, window, return_indices=True)
        expected_out, expected_idx = numpy_path(cc.max_pool2d, x, window, return_indices=True)
        assert_same_bits(out, expected_out)
        assert_same_bits(idx, expected_idx)
        grad = misaligned(rng.standard_normal(out.shape).astype(np.float32))
        assert_same_bits(cc.max_pool2d_backward(grad, x, window),
                         numpy_path(cc.max_pool2d_backward, grad, x, window))
        assert_same_bits(cc.max_pool2d_backward(grad, x, window, indices=misaligned(idx)),
                         numpy_path(cc.max_pool2d_backward, grad, x, window, indices=idx))
