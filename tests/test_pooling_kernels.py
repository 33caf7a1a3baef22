"""The max-pool kernels (cuda/pooling.cu through cupyconv/pooling/_cuda.py)
against the NumPy path, bit for bit: on the CPU executor and, where there is
one, on the GPU.
"""

import numpy as np
import pytest

import cupyconv as cc
import reference
from cupyconv import _backend, _kernels
from reference import nchw_to as to_layout

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES

# Shapes chosen so that each kernel meets both of its paths: 16-byte packs
# (row length W*C, or W for NCHW, a multiple of 16 bytes) and single elements.
KERNEL_CASES = {
    "2x1 packs": ("NHWC", (2, 5, 2, 16), ((2, 1), None, 0, 1, True)),
    "2x1 elements": ("NCHW", (1, 2, 4, 3), ((2, 1), None, 0, 1, False)),
    "window": ("NCHW", (1, 2, 5, 4), ((3, 2), (2, 1), (1, 1), (1, 2), True)),
    "window NHWC": ("NHWC", (1, 4, 5, 2), (3, 1, 1, 1, False)),
}


def _kernel_input(dtype, shape):
    """Ties, NaN, -inf, and subnormals and signed zeros (which a flushing
    float comparison would get wrong) among small integers; the first two
    rows of the first plane all NaN, so that windows hold several."""
    x = reference.pool_input(np.random.default_rng(1), shape, dtype, "ties")
    if np.dtype(dtype).kind == "f":
        x.flat[::7] = np.nan
        x.flat[3::11] = -np.inf
        tiny = np.finfo(dtype).smallest_subnormal
        x.flat[1::5] = tiny
        x.flat[2::9] = -tiny
        x.flat[4::13] = -0.0
        x.flat[5::17] = 0.0
        x[0, 0, :2] = np.nan
    return x


def _window_args(window):
    return dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), window))


def _forward_both(x, layout, window, path, to_device=None):
    """(NumPy path, ``path``) results of max_pool2d with indices; inputs go
    to ``path`` through ``to_device`` (default ``path.asarray``)."""
    to_device = to_device or path.asarray
    args = _window_args(window)
    with path.numpy():
        assert not _backend.use_kernels(np)
        want = cc.max_pool2d(x, layout=layout, return_indices=True, **args)
    got = cc.max_pool2d(to_device(x), layout=layout, return_indices=True, **args)
    return want, tuple(path.asnumpy(g) for g in got)


def _backward_both(x, layout, window, path, to_device=None):
    """NumPy path's gradient, and ``path``'s from x and from indices."""
    to_device = to_device or path.asarray
    args = _window_args(window)
    with path.numpy():
        out, at = cc.max_pool2d(x, layout=layout, return_indices=True, **args)
        g = np.random.default_rng(2).standard_normal(out.shape).astype(x.dtype)
        want = cc.max_pool2d_backward(g, x, layout=layout, **args)
    got = [cc.max_pool2d_backward(to_device(g), to_device(x), layout=layout,
                                  indices=indices, **args)
           for indices in (None, to_device(at))]
    return want, [path.asnumpy(r) for r in got]


@pytest.mark.paths("cpu_kernels", "gpu")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_forward_kernels(path, dtype):
    """Both forward kernels, every dtype, exactly as the NumPy path."""
    assert _backend.use_kernels(path.xp)
    cases = ["2x1 packs", "window"]
    if dtype in (np.float16, np.int64, np.uint8):
        cases.append("2x1 elements")
    for case in cases:
        layout, shape, window = KERNEL_CASES[case]
        want, got = _forward_both(_kernel_input(dtype, shape), layout, window, path)
        np.testing.assert_array_equal(got[0], want[0], err_msg=case)
        np.testing.assert_array_equal(got[1], want[1], err_msg=case)


@pytest.mark.paths("cpu_kernels", "gpu")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_kernels(path, dtype):
    """Both gradient kernels, from x and from indices, exactly as NumPy
    (overlapping windows: sums in the same order, float16 in float32)."""
    for case in ("2x1 packs", "window NHWC"):
        layout, shape, window = KERNEL_CASES[case]
        want, got = _backward_both(_kernel_input(dtype, shape), layout, window, path)
        for g in got:
            np.testing.assert_array_equal(g, want, err_msg=case)


@pytest.mark.paths("cpu_kernels", "gpu")
@pytest.mark.parametrize("stride", [(2**61, 1), (2, 2**61)])
def test_a_stride_longer_than_the_input(path, stride):
    """One window along an axis whatever the stride: kernels (64-bit index
    math) and NumPy path agree, values, indices and gradients."""
    x = _kernel_input(np.float32, (2, 5, 4, 3))
    window = ((2, 2), stride, 0, 1, False)
    want, got = _forward_both(x, "NHWC", window, path)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    want, got = _backward_both(x, "NHWC", window, path)
    for g in got:
        np.testing.assert_array_equal(g, want)


@pytest.mark.paths("cpu_kernels")  # a misaligned NumPy buffer
def test_2x1_kernels_fall_back_on_misaligned_buffers(path):
    """A contiguous input that does not start on 16 bytes takes the
    element-wise path and still matches."""
    x = _kernel_input(np.float32, (1, 3, 2, 4))
    buffer = np.empty(x.size + 1, np.float32)
    shifted = buffer[1:].reshape(x.shape)
    shifted[...] = x
    assert shifted.ctypes.data % 16 != 0 and shifted.flags.c_contiguous
    window = ((2, 1), None, 0, 1, True)
    want, got = _forward_both(x, "NHWC", window, path, lambda a: shifted)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    want, got = _backward_both(x, "NHWC", window, path,
                               lambda a: shifted if a.shape == x.shape else a)
    np.testing.assert_array_equal(got[0], want)


@pytest.mark.paths("cpu_kernels", "gpu")
@pytest.mark.parametrize("case", ["2x1 packs", "2x1 elements"])
def test_2x1_kernels_64_bit_index_path(path, monkeypatch, case):
    """Arrays of 2**31 elements and more split positions with 64-bit
    divisions; shown here on small inputs by lowering the threshold."""
    monkeypatch.setattr(_kernels, "FAST_INDEX_LIMIT", 0)
    layout, shape, window = KERNEL_CASES[case]
    x = _kernel_input(np.float32, shape)
    want, got = _forward_both(x, layout, window, path)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    want, got = _backward_both(x, layout, window, path)
    for g in got:
        np.testing.assert_array_equal(g, want)


# ---- GPU ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.paths("gpu")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_gpu_matches_numpy(path, case, dtype):
    layout, shape, window = KERNEL_CASES[case]
    # Larger than the executor shapes: many blocks, both layouts' fast paths.
    shape = (shape[0] * 8,) + shape[1:]
    x = _kernel_input(dtype, shape)
    want, got = _forward_both(x, layout, window, path)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if np.dtype(dtype).kind == "f":
        want, got = _backward_both(x, layout, window, path)
        for g in got:
            np.testing.assert_array_equal(g, want)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_gpu_2x1_realistic_size(gpu, layout):
    cupy = gpu
    x = np.random.default_rng(0).standard_normal((64, 32, 15, 64), dtype=np.float32)
    x = to_layout(x.transpose(0, 3, 1, 2), layout)
    want = cc.max_pool2d(x, (2, 1), layout=layout, return_indices=True)
    got = cc.max_pool2d(cupy.asarray(x), (2, 1), layout=layout, return_indices=True)
    np.testing.assert_array_equal(got[0].get(), want[0])
    np.testing.assert_array_equal(got[1].get(), want[1])
    g = np.ones(want[0].shape, np.float32)
    np.testing.assert_array_equal(
        cc.max_pool2d_backward(cupy.asarray(g), cupy.asarray(x), (2, 1), layout=layout).get(),
        cc.max_pool2d_backward(g, x, (2, 1), layout=layout))
