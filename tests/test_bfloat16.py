"""bfloat16 (``ml_dtypes.bfloat16`` arrays) on every op, on the NumPy path
and through the kernels on the CPU executor: computed in float32 and
rounded once, so each result equals the float32 result of the same values
rounded to bfloat16 (the tensor-core convolutions: within a bound, checked
in test_convolution_mma.py)."""

import subprocess
import sys

import numpy as np
import pytest

import cupyconv as cc

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.float32


def bf16(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(BF16)


def same(got, expected):
    assert got.dtype == BF16 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint16), expected.astype(BF16).view(np.uint16))


CONV = dict(stride=(2, 1), padding=1, groups=2)


def test_convolutions_on_the_numpy_path_round_once():
    x, w, bias = bf16((2, 7, 6, 4)), bf16((3, 2, 2, 6), 1), bf16((6,), 2)
    y = cc.conv2d(x, w, bias, **CONV)
    same(y, cc.conv2d(x.astype(F32), w.astype(F32), bias.astype(F32), **CONV))
    g = bf16(y.shape, 3)
    same(cc.conv2d_input(x.shape, w, g, **CONV),
         cc.conv2d_input(x.shape, w.astype(F32), g.astype(F32), **CONV))
    same(cc.conv2d_weight(x, w.shape, g, **CONV),
         cc.conv2d_weight(x.astype(F32), w.shape, g.astype(F32), **CONV))


def test_matrix_product_convolutions_on_the_kernels(cpu_kernels):
    """1x1 convolutions are matrix products (not the tensor-core kernels):
    float32 products of the bfloat16 values, rounded once."""
    x, w = bf16((2, 3, 5, 8)), bf16((1, 1, 8, 6), 1)
    y = cc.conv2d(x, w)
    same(y, cc.conv2d(x.astype(F32), w.astype(F32)))
    g = bf16(y.shape, 2)
    same(cc.conv2d_input(x.shape, w, g), cc.conv2d_input(x.shape, w.astype(F32), g.astype(F32)))
    same(cc.conv2d_weight(x, w.shape, g), cc.conv2d_weight(x.astype(F32), w.shape, g.astype(F32)))


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("window", [dict(kernel_size=(2, 1)),
                                    dict(kernel_size=3, stride=2, padding=1)])
def test_max_pool_and_backward(request, kernels, window):
    if kernels:
        request.getfixturevalue("cpu_kernels")
    x = bf16((2, 6, 5, 3))
    x[0, 0, 0, 0] = np.nan
    out, indices = cc.max_pool2d(x, return_indices=True, **window)
    out32, indices32 = cc.max_pool2d(x.astype(F32), return_indices=True, **window)
    same(out, out32)
    np.testing.assert_array_equal(indices, indices32)
    same(cc.max_pool2d(x, **window), out32)
    g = bf16(out.shape, 1)
    expected = cc.max_pool2d_backward(g.astype(F32), x.astype(F32), **window)
    same(cc.max_pool2d_backward(g, x, **window), expected)
    same(cc.max_pool2d_backward(g, x, indices=indices, **window), expected)


@pytest.mark.parametrize("kernels", [False, True])
def test_dilate_and_undilate_keep_the_bits(request, kernels):
    if kernels:
        request.getfixturevalue("cpu_kernels")
    x = bf16((2, 3, 4))
    d = cc.dilate(x, axes=(1, 2), dilation=2)
    assert d.dtype == BF16
    np.testing.assert_array_equal(d.view(np.uint16)[:, ::3, ::3], x.view(np.uint16))
    np.testing.assert_array_equal(cc.undilate(d, axes=(1, 2), dilation=2).view(np.uint16),
                                  x.view(np.uint16))


def test_mixed_dtypes_are_rejected():
    with pytest.raises(TypeError, match="x is bfloat16, w is float32"):
        cc.conv2d(bf16((1, 3, 3, 1)), np.ones((1, 1, 1, 1), F32))
    with pytest.raises(TypeError, match="grad_out is float32, x is bfloat16"):
        cc.max_pool2d_backward(np.ones((1, 1, 1, 1), F32), bf16((1, 2, 2, 1)), 2)


def test_ml_dtypes_is_imported_only_by_its_user():
    code = ("import sys, numpy as np, cupyconv as cc\n"
            "cc.conv2d(np.ones((1, 3, 3, 1), np.float32), np.ones((1, 1, 1, 1), np.float32))\n"
            "cc.max_pool2d(np.ones((1, 2, 2, 1), np.float32), 2)\n"
            "assert 'ml_dtypes' not in sys.modules, 'ml_dtypes imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
