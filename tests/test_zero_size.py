"""Zero-size axes on every path (NumPy, NumPy with numba's loops, the CUDA
kernels in the CPU executor) and layout: empty batches, channels, channel
groups and spatial axes give empty (or all-zero, or bias-only) results, and
an empty input whose window does not fit gets the window error, never a
ZeroDivisionError.

Expected values are exact: with no output pixel, or no input channel, or
no output channel, every gradient is zero and the forward is the bias.
"""

import numpy as np
import pytest

import cupyconv as cc

# (x shape NHWC, w shape HWIO, conv keywords); "same" padding and 1-row
# kernels over 0 rows give 0 rows, as the output-size formula does.
CONV_CASES = {
    "no-output-channels": ((2, 8, 8, 3), (3, 3, 3, 0), {}),
    "no-input-channels": ((2, 8, 8, 0), (3, 3, 0, 4), {}),
    "no-images": ((0, 8, 8, 3), (3, 3, 3, 4), {"padding": 1}),
    "groups-of-no-input-channels": ((2, 8, 8, 0), (3, 3, 0, 4), {"groups": 2}),
    "groups-of-no-output-channels": ((2, 8, 8, 4), (3, 3, 2, 0), {"groups": 2}),
    "no-rows": ((2, 0, 8, 3), (1, 3, 3, 4), {}),
    "no-columns-strided": ((2, 8, 0, 3), (3, 1, 3, 4), {"stride": 2}),
    "no-rows-same-padding": ((2, 0, 8, 3), (3, 3, 3, 4), {"padding": "same"}),
    "all-empty-1x1": ((0, 0, 0, 0), (1, 1, 0, 0), {}),
    "1x1-no-output-channels": ((2, 4, 4, 3), (1, 1, 3, 0), {}),
    "1x1-no-rows": ((2, 0, 5, 3), (1, 1, 3, 4), {}),
}

# (x shape NHWC, max_pool2d keywords): the general window, the 2x1 path.
POOL_CASES = {
    "no-channels-3x3": ((2, 8, 8, 0), {"kernel_size": 3}),
    "no-channels-3x3-overlapping": ((2, 8, 8, 0), {"kernel_size": 3, "stride": 1,
                                                  "padding": 1}),
    "no-images-3x3": ((0, 8, 8, 3), {"kernel_size": 3, "stride": 2, "padding": 1}),
    "no-channels-2x1": ((2, 8, 8, 0), {"kernel_size": (2, 1)}),
    "no-images-2x1-ceil": ((0, 7, 8, 3), {"kernel_size": (2, 1), "ceil_mode": True}),
    "no-rows-2x1": ((2, 0, 8, 3), {"kernel_size": (2, 1)}),
    "no-rows-1x2": ((2, 0, 8, 3), {"kernel_size": (1, 2)}),
    "no-columns-dilated": ((2, 8, 0, 3), {"kernel_size": (3, 1), "dilation": (2, 3)}),
}

# (shape, axes, dilation)
DILATE_CASES = [((2, 0, 3), (0, 1), (1, 2)), ((0,), 0, 3), ((3, 4, 0), -1, 1),
                ((0, 5), (0, 1), 0)]

LAYOUTS = ["NHWC", "NCHW"]


def to_layout(shape_or_array, layout, weight=False):
    """NHWC (activations) or HWIO (weights) shapes/arrays in ``layout``."""
    axes = ((3, 2, 0, 1) if weight else (0, 3, 1, 2)) if layout == "NCHW" else (0, 1, 2, 3)
    if isinstance(shape_or_array, tuple):
        return tuple(shape_or_array[a] for a in axes)
    return shape_or_array.transpose(axes)


def nhwc(a, layout):
    """An activation in ``layout`` seen as NHWC."""
    return a.transpose(0, 2, 3, 1) if layout == "NCHW" else a


def check_conv(path, case, layout, dtype=np.float32):
    x_shape, w_shape, kw = CONV_CASES[case]
    x = np.ones(to_layout(x_shape, layout), dtype)
    w = np.ones(to_layout(w_shape, layout, weight=True), dtype)
    c_out = w_shape[3]
    bias = np.arange(c_out, dtype=dtype) + 1
    y = path.run(cc.conv2d, x, w, bias, layout=layout, **kw)
    y_nhwc = nhwc(y, layout)
    n, h, wd, _ = x_shape
    assert y.dtype == dtype and y.flags.c_contiguous
    assert y_nhwc.shape[0] == n and y_nhwc.shape[3] == c_out
    if kw.get("padding") == "same":
        assert y_nhwc.shape[1:3] == (h, wd)
    # No input channel: every output pixel is the bias alone.
    if x_shape[3] == 0:
        np.testing.assert_array_equal(y_nhwc, np.broadcast_to(bias, y_nhwc.shape))
    else:
        assert y.size == 0
    grad_out = np.ones(y.shape, dtype)
    grad_x = path.run(cc.conv2d_input, x.shape, w, grad_out, layout=layout, **kw)
    grad_w = path.run(cc.conv2d_weight, x, w.shape, grad_out, layout=layout, **kw)
    for got, want in ((grad_x, x), (grad_w, w)):
        assert got.shape == want.shape and got.dtype == dtype
        np.testing.assert_array_equal(got, np.zeros_like(want))


def check_pool(path, case, layout, dtype=np.float32):
    x_shape, kw = POOL_CASES[case]
    x = np.ones(to_layout(x_shape, layout), dtype)
    out, indices = path.run(cc.max_pool2d, x, layout=layout, return_indices=True, **kw)
    assert out.size == 0 and out.shape == indices.shape
    assert out.dtype == dtype and indices.dtype == np.int64
    n, c = x_shape[0], x_shape[3]
    out_nhwc = nhwc(out, layout)
    assert (out_nhwc.shape[0], out_nhwc.shape[3]) == (n, c)
    assert path.run(cc.max_pool2d, x, layout=layout, **kw).shape == out.shape
    grad_out = np.ones(out.shape, dtype)
    for picks in (None, indices):
        grad = path.run(cc.max_pool2d_backward, grad_out, x, layout=layout,
                        indices=picks, **kw)
        assert grad.shape == x.shape and grad.dtype == dtype


def check_dilate(path, shape, axes, dilation):
    a = np.ones(shape, np.float32)
    d = path.run(cc.dilate, a, axes, dilation)
    np.testing.assert_array_equal(path.run(cc.undilate, d, axes, dilation), a)
    want = list(shape)
    axes = np.atleast_1d(axes)
    for axis, step in zip(axes, np.broadcast_to(dilation, axes.shape)):
        want[axis] *= step + 1
    assert d.shape == tuple(want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(case, layout, path):
    check_conv(path, case, layout)


@pytest.mark.paths("numpy", "numba", "cpu_kernels")
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_conv2d_other_dtypes(dtype, path):
    check_conv(path, "no-output-channels", "NHWC", dtype)
    check_conv(path, "no-input-channels", "NCHW", dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d(case, layout, path):
    check_pool(path, case, layout)


@pytest.mark.paths("numpy", "numba", "cpu_kernels")
def test_max_pool2d_other_dtypes(path):
    for dtype in (np.float16, np.float64):
        check_pool(path, "no-channels-3x3", "NHWC", dtype)
    out = path.run(cc.max_pool2d, np.ones((2, 8, 8, 0), np.int8), 3)
    assert out.shape == (2, 2, 2, 0) and out.dtype == np.int8


@pytest.mark.parametrize("case", DILATE_CASES)
def test_dilate(case, path):
    check_dilate(path, *case)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_input_whose_window_does_not_fit(layout):
    """Validation comes first: an empty array still gets the window error."""
    x = np.ones(to_layout((2, 2, 2, 0), layout))
    w = np.ones(to_layout((3, 3, 0, 4), layout, weight=True))
    with pytest.raises(ValueError, match=r"w's kernel \(3, 3\) .* spans 3 rows, more "
                                         r"than the 2 rows of the padded input"):
        cc.conv2d(x, w, layout=layout)
    with pytest.raises(ValueError, match=r"kernel_size \(3, 3\) .* spans 3 rows"):
        cc.max_pool2d(x, 3, layout=layout)
    with pytest.raises(ValueError, match=r"spans 3 rows, more than the 0 rows"):
        cc.max_pool2d(np.ones(to_layout((2, 0, 4, 3), layout)), 3, stride=1,
                      layout=layout)
    # 0 rows and a window of padding only (a -inf PyTorch would return).
    with pytest.raises(ValueError, match="x has 0 rows: its 1 window along h"):
        cc.max_pool2d(np.ones(to_layout((2, 0, 4, 3), layout)), 2, padding=1,
                      layout=layout)
