"""Argument forms a NumPy or PyTorch user passes: Python numbers and lists
next to arrays (NumPy's weak scalars), integers in any form NumPy takes,
PyTorch's positional order, and window errors that name the arguments."""

import inspect
import re

import numpy as np
import pytest

import cupyconv as cc

RNG = np.random.default_rng(17)
X32 = RNG.standard_normal((2, 9, 8, 4)).astype(np.float32)   # NHWC
W32 = RNG.standard_normal((3, 2, 2, 6)).astype(np.float32)   # HWIO, groups=2


# ---- Python numbers and lists adapt to the arrays' dtype -------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_list_bias_takes_the_arrays_dtype(dtype):
    x, w = X32.astype(dtype), W32.astype(dtype)
    bias = [0.5, 0, -1, 2, 1e-3, 3]
    y = cc.conv2d(x, w, bias, groups=2)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, cc.conv2d(x, w, np.array(bias, dtype), groups=2))
    # Python ints too, as in NumPy: float32_array + [1, 2] is float32.
    assert cc.conv2d(x, w, [1, 2, 3, 4, 5, 6], groups=2).dtype == dtype


def test_array_likes_take_the_dtype_of_the_other_arrays():
    y = cc.conv2d(X32, W32, groups=2)
    g = np.ones_like(y)
    assert cc.conv2d(X32.tolist(), W32, groups=2).dtype == np.float32
    np.testing.assert_array_equal(cc.conv2d(X32, W32.tolist(), groups=2), y)
    gx = cc.conv2d_input(X32.shape, W32, g.tolist(), groups=2)
    assert gx.dtype == np.float32
    np.testing.assert_array_equal(gx, cc.conv2d_input(X32.shape, W32, g, groups=2))
    gw = cc.conv2d_weight(X32, W32.shape, g.tolist(), groups=2)
    assert gw.dtype == np.float32
    np.testing.assert_array_equal(gw, cc.conv2d_weight(X32, W32.shape, g, groups=2))
    p, at = cc.max_pool2d(X32, 2, return_indices=True)
    for grad_out in (np.ones(p.shape).tolist(), np.ones(p.shape, np.float32)):
        grad = cc.max_pool2d_backward(grad_out, X32, 2, indices=at)
        assert grad.dtype == np.float32
    np.testing.assert_array_equal(
        cc.max_pool2d_backward(np.ones(p.shape).tolist(), X32.astype(np.float16), 2),
        cc.max_pool2d_backward(np.ones(p.shape, np.float16), X32.astype(np.float16), 2))


def test_arrays_with_a_dtype_keep_it():
    with pytest.raises(TypeError, match="x is float32, w is float32, bias is float64"):
        cc.conv2d(X32, W32, np.zeros(6), groups=2)
    with pytest.raises(TypeError, match="grad_out is float64"):
        cc.conv2d_input(X32.shape, W32, np.ones((2, 7, 7, 6)), groups=2)
    with pytest.raises(TypeError, match="bias must be float16, bfloat16, float32 or float64"):
        cc.conv2d(X32, W32, [True] * 6, groups=2)
    # With no array at all, lists are what NumPy makes of them (float64).
    assert cc.conv2d(X32.tolist(), W32.tolist(), groups=2).dtype == np.float64


# ---- integers in any form NumPy takes ----------------------------------------------

class Index:
    """Not an int, but usable as one (``operator.index``)."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value


INT_FORMS = [lambda v: v, np.int64, np.int32, np.uint8, np.array, Index]
PAIR_FORMS = [tuple, list, np.array, lambda v: np.array(v, np.int32),
              lambda v: [np.int64(v[0])] + [np.array(i) for i in v[1:]],
              lambda v: [Index(i) if isinstance(i, int) else i for i in v]]


@pytest.mark.parametrize("form", range(len(INT_FORMS)))
def test_integer_scalars(form):
    as_int = INT_FORMS[form]
    want = cc.conv2d(X32, W32, None, 2, 1, 2, 2)
    np.testing.assert_array_equal(
        cc.conv2d(X32, W32, stride=as_int(2), padding=as_int(1), dilation=as_int(2),
                  groups=as_int(2)), want)
    np.testing.assert_array_equal(cc.max_pool2d(X32, as_int(3), as_int(2), as_int(1)),
                                  cc.max_pool2d(X32, 3, 2, 1))
    np.testing.assert_array_equal(cc.dilate(X32, as_int(1), as_int(2)),
                                  cc.dilate(X32, 1, 2))


@pytest.mark.parametrize("form", range(len(PAIR_FORMS)))
def test_integer_pairs_and_shapes(form):
    as_seq = PAIR_FORMS[form]
    np.testing.assert_array_equal(
        cc.max_pool2d(X32, as_seq([2, 1]), as_seq([2, 1]), as_seq([1, 0]), as_seq([1, 2])),
        cc.max_pool2d(X32, (2, 1), (2, 1), (1, 0), (1, 2)))
    want = cc.conv2d(X32, W32, stride=(2, 1), padding=((1, 0), (0, 2)), groups=2)
    np.testing.assert_array_equal(
        cc.conv2d(X32, W32, stride=as_seq([2, 1]),
                  padding=as_seq([as_seq([1, 0]), as_seq([0, 2])]), groups=2), want)
    g = np.ones_like(want)
    np.testing.assert_array_equal(
        cc.conv2d_input(as_seq(list(X32.shape)), W32, g, (2, 1), ((1, 0), (0, 2)), 1, 2),
        cc.conv2d_input(X32.shape, W32, g, (2, 1), ((1, 0), (0, 2)), 1, 2))
    np.testing.assert_array_equal(
        cc.conv2d_weight(X32, as_seq(list(W32.shape)), g, (2, 1), ((1, 0), (0, 2)), 1, 2),
        cc.conv2d_weight(X32, W32.shape, g, (2, 1), ((1, 0), (0, 2)), 1, 2))
    np.testing.assert_array_equal(
        cc.dilate(X32, as_seq([1, 2]), as_seq([2, 1]), shape=as_seq([2, 27, 17, 4])),
        cc.dilate(X32, (1, 2), (2, 1), shape=(2, 27, 17, 4)))
    np.testing.assert_array_equal(cc.undilate(X32, as_seq([1, 2]), as_seq([2, 1])),
                                  cc.undilate(X32, (1, 2), (2, 1)))


def test_input_shape_as_an_array_of_the_shape():
    g = np.ones((2, 7, 7, 6), np.float32)
    np.testing.assert_array_equal(
        cc.conv2d_input(np.array(X32.shape), W32, g, groups=2),
        cc.conv2d_input(X32.shape, W32, g, groups=2))


@pytest.mark.parametrize("call, match", [
    (lambda: cc.max_pool2d(X32, np.array([2.0, 1.0])),
     r"kernel_size\[0\] must be an integer, not float"),
    (lambda: cc.max_pool2d(X32, np.array([True, False])),
     r"kernel_size\[0\] must be an integer, not bool"),
    (lambda: cc.max_pool2d(X32, np.array(2.0)), "kernel_size must be an integer, not ndarray of float64"),
    (lambda: cc.max_pool2d(X32, np.float64(2)), "kernel_size must be an integer, not float64"),
    (lambda: cc.max_pool2d(X32, np.array(True)), "kernel_size must be an integer, not bool"),
    (lambda: cc.max_pool2d(X32, 2, stride=2.0), "stride must be an integer, not float"),
    (lambda: cc.conv2d(X32, W32, groups=np.bool_(True)), "groups must be an integer, not bool"),
    (lambda: cc.conv2d(X32, W32, groups=2, padding=np.array([[1.0, 0], [0, 1]])),
     r"padding\[0\]\[0\] must be an integer, not float"),
    (lambda: cc.conv2d_input(np.array([2.0, 9, 8, 4]), W32, np.ones((2, 7, 7, 6)), groups=2),
     r"input_shape\[0\] must be an integer, not float"),
    (lambda: cc.conv2d_weight(X32, np.array(W32.shape) > 0, np.ones((2, 7, 7, 6))),
     r"weight_shape\[0\] must be an integer, not bool"),
    (lambda: cc.dilate(X32, np.array([1.0]), 1), r"axes\[0\] must be an integer, not float"),
])
def test_floats_and_bools_are_refused(call, match):
    with pytest.raises(TypeError, match=match):
        call()


# ---- PyTorch's positional order ----------------------------------------------------

@pytest.mark.parametrize("function, positional, keyword_only", [
    (cc.conv2d, ["x", "w", "bias", "stride", "padding", "dilation", "groups"],
     ["layout", "precision"]),
    (cc.conv2d_input, ["input_shape", "w", "grad_out", "stride", "padding", "dilation",
                       "groups"], ["layout", "precision"]),
    (cc.conv2d_weight, ["x", "weight_shape", "grad_out", "stride", "padding", "dilation",
                        "groups"], ["layout", "precision"]),
    (cc.max_pool2d, ["x", "kernel_size", "stride", "padding", "dilation"],
     ["ceil_mode", "layout", "return_indices"]),
    (cc.max_pool2d_backward, ["grad_out", "x", "kernel_size", "stride", "padding", "dilation"],
     ["ceil_mode", "layout", "indices"]),
])
def test_signatures(function, positional, keyword_only):
    params = inspect.signature(function).parameters.values()
    assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == positional
    assert [p.name for p in params if p.kind == p.KEYWORD_ONLY] == keyword_only


def test_positional_calls_match_keyword_calls():
    x = X32.transpose(0, 3, 1, 2)
    w = W32.transpose(3, 2, 0, 1)
    b = np.arange(6, dtype=np.float32)
    kw = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2, layout="NCHW")
    y = cc.conv2d(x, w, b, (2, 1), 1, (1, 2), 2, layout="NCHW")
    np.testing.assert_array_equal(y, cc.conv2d(x, w, b, **kw))
    g = np.ones_like(y)
    np.testing.assert_array_equal(
        cc.conv2d_input(x.shape, w, g, (2, 1), 1, (1, 2), 2, layout="NCHW"),
        cc.conv2d_input(x.shape, w, g, **kw))
    np.testing.assert_array_equal(
        cc.conv2d_weight(x, w.shape, g, (2, 1), 1, (1, 2), 2, layout="NCHW"),
        cc.conv2d_weight(x, w.shape, g, **kw))
    p = cc.max_pool2d(X32, 3, 2, 1, (1, 2))
    np.testing.assert_array_equal(
        p, cc.max_pool2d(X32, kernel_size=3, stride=2, padding=1, dilation=(1, 2)))
    np.testing.assert_array_equal(
        cc.max_pool2d_backward(np.ones_like(p), X32, 3, 2, 1, (1, 2)),
        cc.max_pool2d_backward(np.ones_like(p), X32, 3, stride=2, padding=1, dilation=(1, 2)))
    with pytest.raises(TypeError):
        cc.conv2d(x, w, b, 1, 0, 1, 2, "NCHW")   # layout is keyword-only
    with pytest.raises(TypeError):
        cc.max_pool2d(X32, 2, 2, 0, 1, True)     # so is ceil_mode


def test_ported_pytorch_calls():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = X32.transpose(0, 3, 1, 2).copy()
    w = W32.transpose(3, 2, 0, 1).copy()
    b = np.arange(6, dtype=np.float32)
    tx, tw, tb = map(torch.from_numpy, (x, w, b))
    args = ((2, 1), 1, (1, 2), 2)
    y = cc.conv2d(x, w, b, *args, layout="NCHW")
    np.testing.assert_allclose(y, F.conv2d(tx, tw, tb, *args).numpy(), rtol=1e-5, atol=1e-5)
    g = np.ones_like(y)
    np.testing.assert_allclose(
        cc.conv2d_input(x.shape, w, g, *args, layout="NCHW"),
        torch.nn.grad.conv2d_input(x.shape, tw, torch.from_numpy(g), *args).numpy(),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        cc.conv2d_weight(x, w.shape, g, *args, layout="NCHW"),
        torch.nn.grad.conv2d_weight(tx, w.shape, torch.from_numpy(g), *args).numpy(),
        rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cc.max_pool2d(x, 3, 2, 1, (1, 2), layout="NCHW"),
                                  F.max_pool2d(tx, 3, 2, 1, (1, 2)).numpy())


# ---- window errors name the arguments, never a negative size ----------------------

X4 = np.zeros((1, 4, 4, 1))


@pytest.mark.parametrize("call, message", [
    (lambda: cc.conv2d(X4, np.zeros((5, 3, 1, 1)), dilation=(2, 1), padding=1),
     "w's kernel (5, 3) with dilation (2, 1) spans 9 rows, more than the 6 rows of the "
     "padded input (x's 4 rows + padding 1+1)"),
    (lambda: cc.conv2d(np.zeros((1, 8, 8, 1)), np.zeros((201, 201, 1, 1))),
     "w's kernel (201, 201) with dilation (1, 1) spans 201 rows, more than the 8 rows of "
     "the padded input (x's 8 rows + padding 0+0)"),
    (lambda: cc.conv2d(X4, np.zeros((1, 3, 1, 1)), padding=((0, 0), (0, 1)), dilation=3),
     "w's kernel (1, 3) with dilation (3, 3) spans 7 columns, more than the 5 columns of "
     "the padded input (x's 4 columns + padding 0+1)"),
    (lambda: cc.conv2d_input((1, 1, 4, 1), np.zeros((2, 1, 1, 1)), np.zeros((1, 1, 4, 1))),
     "w's kernel (2, 1) with dilation (1, 1) spans 2 rows, more than the 1 row of the "
     "padded input (input_shape's 1 row + padding 0+0)"),
    (lambda: cc.conv2d_weight(X4, (9, 1, 1, 1), np.zeros((1, 1, 1, 1))),
     "weight_shape's kernel (9, 1) with dilation (1, 1) spans 9 rows, more than the 4 rows "
     "of the padded input (x's 4 rows + padding 0+0)"),
    (lambda: cc.max_pool2d(X4, (3, 7), padding=(1, 0)),
     "kernel_size (3, 7) with dilation (1, 1) spans 7 columns, more than the 4 columns of "
     "the padded input (x's 4 columns + padding 0+0)"),
    (lambda: cc.max_pool2d(X4, (3, 2), dilation=(2, 1), padding=(0, 1)),
     "kernel_size (3, 2) with dilation (2, 1) spans 5 rows, more than the 4 rows of the "
     "padded input (x's 4 rows + padding 0+0)"),
    (lambda: cc.max_pool2d_backward(np.zeros((1, 1, 1, 1)), X4, 2, padding=1, dilation=6),
     "kernel_size (2, 2) with dilation (6, 6) spans 7 rows, more than the 6 rows of the "
     "padded input (x's 4 rows + padding 1+1)"),
])
def test_window_errors_name_the_arguments(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
    assert not re.search(r"-\d", str(error.value)), str(error.value)
