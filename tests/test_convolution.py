"""conv2d, conv2d_input and conv2d_weight: the NumPy path against the float64
loop reference (reference.py), PyTorch, finite differences and lower
precisions; every argument error.  The kernels' paths are in
test_convolution_kernels.py."""

import sys
import time
import types

import numpy as np
import pytest

import cupyconv as cc
import reference
from cupyconv import _parallel
from cupyconv.convolution import _cpu as conv_cpu, _geometry as conv_geometry
from reference import ConvCase


CASES = reference.CONV_CASES


@pytest.fixture(params=["tap-major", "pixel-major"])
def gather_order(request, monkeypatch):
    """Run the NumPy path with every gathered matrix in one memory order
    (normally chosen by channels per group)."""
    limit = 10**9 if request.param == "tap-major" else -1
    monkeypatch.setattr(conv_cpu, "_TAP_MAJOR_MAX_CHANNELS", limit)
    return request.param


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_reference(case, layout, gather_order):
    case = case.replace(layout=layout)
    x, w, bias, grad_out = case.arrays()
    y_ref, gx_ref, gw_ref = case.expected(x, w, bias, grad_out)
    kwargs = case.kwargs()
    y = cc.conv2d(x, w, bias, **kwargs)
    grad_x = cc.conv2d_input(x.shape, w, grad_out, **kwargs)
    grad_w = cc.conv2d_weight(x, w.shape, grad_out, **kwargs)
    for result in (y, grad_x, grad_w):
        assert isinstance(result, np.ndarray) and result.dtype == np.float64
        assert result.flags.c_contiguous
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_x, gx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_w, gw_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block_elements", [1, 40, 500])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_blocking(monkeypatch, block_elements, layout, threads, gather_order):
    """Bands of rows of one image, and several images per block, give the
    same result as one block, whether the blocks run one after another or
    are shared among threads."""
    case = ConvCase(5, 9, 8, 4, 6, (3, 2), stride=(2, 1), padding="same", groups=2,
                    layout=layout)
    xl, wl, bias, gl = case.arrays()
    kwargs = case.kwargs()
    whole = (cc.conv2d(xl, wl, bias, **kwargs),
             cc.conv2d_input(xl.shape, wl, gl, **kwargs),
             cc.conv2d_weight(xl, wl.shape, gl, **kwargs))
    monkeypatch.setattr(conv_cpu, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(conv_cpu, "_MIN_SHARED_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(_parallel, "CPUS", threads)
    monkeypatch.setattr(_parallel, "blas_threads_limited", lambda: threads > 1)
    assert len(conv_cpu._blocks(conv_geometry.conv2d_geometry(
        xl.shape, wl.shape, case.stride, case.padding, case.dilation,
        case.groups, layout))) > 1
    blocked = (cc.conv2d(xl, wl, bias, **kwargs),
               cc.conv2d_input(xl.shape, wl, gl, **kwargs),
               cc.conv2d_weight(xl, wl.shape, gl, **kwargs))
    for a, b in zip(whole, blocked):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_weight_grad_is_the_same_on_every_run(monkeypatch):
    """Blocks shared among threads still sum the weight gradient in one
    order: repeated calls agree bit for bit."""
    monkeypatch.setattr(conv_cpu, "_BLOCK_ELEMENTS", 300)
    monkeypatch.setattr(conv_cpu, "_MIN_SHARED_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(_parallel, "CPUS", 3)
    monkeypatch.setattr(_parallel, "blas_threads_limited", lambda: True)
    gather, delays = conv_cpu._im2col, np.random.default_rng(6)

    def uneven_gather(*args):  # threads finish blocks in a different order each time
        time.sleep(delays.uniform(0, 2e-3))
        gather(*args)
    monkeypatch.setattr(conv_cpu, "_im2col", uneven_gather)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 9, 7, 3), dtype=np.float32)
    g = rng.standard_normal((16, 9, 7, 4), dtype=np.float32)
    first = cc.conv2d_weight(x, (3, 3, 3, 4), g, padding=1)
    for _ in range(10):
        np.testing.assert_array_equal(cc.conv2d_weight(x, (3, 3, 3, 4), g, padding=1), first)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_short_reductions_run_in_row_chunks(monkeypatch, layout):
    """Products with a short reduction run as stacks of row chunks, with the
    rows left over in a product of their own: same results."""
    monkeypatch.setattr(conv_cpu, "_CHUNK_OUTPUT_BYTES", 4 * 6 * 8)  # 4 float64 rows
    calls = []
    matmul = np.matmul

    def counting(a, b, **kw):
        calls.append(a.ndim)
        return matmul(a, b, **kw)

    monkeypatch.setattr(conv_cpu.numpy, "matmul", counting)
    # 2*7*5 = 70 rows, 17 chunks + 2
    case = ConvCase(2, 7, 5, 1, 6, (3, 3), padding=1, layout=layout, bias=False)
    xl, wl, _, _ = case.arrays(seed=3)
    got = cc.conv2d(xl, wl, **case.kwargs())
    monkeypatch.setattr(conv_cpu.numpy, "matmul", matmul)
    assert max(calls) == 4  # a stack of chunks was multiplied
    want = reference.conv2d(xl, wl, None, *case.params())
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_blocks_split_work_among_cores(monkeypatch):
    """A batch that fits one block is still cut into several per core."""
    monkeypatch.setattr(_parallel, "CPUS", 2)
    geom = conv_geometry.conv2d_geometry((128, 32, 15, 1), (5, 3, 1, 64), 1, (2, 1),
                                    1, 1, "NHWC")
    blocks = conv_cpu._blocks(geom)
    assert len(blocks) >= 2 * conv_cpu._BLOCKS_PER_CORE
    covered = [n for (n0, n1), rows in blocks for n in range(n0, n1)]
    assert covered == list(range(128))


TORCH_CASES = [CASES[i] for i in (0, 5, 6, 8, 9, 11)]


@pytest.mark.parametrize("case", TORCH_CASES, ids=repr)
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    case = case.replace(layout="NCHW")
    xl, wl, bias, gl = case.arrays()
    (top, bottom), (left, right) = case.explicit_padding
    xt = torch.tensor(xl, requires_grad=True)
    wt = torch.tensor(wl, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    yt = torch.nn.functional.conv2d(
        torch.nn.functional.pad(xt, (left, right, top, bottom)), wt, bt,
        stride=case.stride, dilation=case.dilation, groups=case.groups)
    yt.backward(torch.tensor(gl))
    kwargs = case.kwargs()
    np.testing.assert_allclose(cc.conv2d(xl, wl, bias, **kwargs),
                               yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cc.conv2d_input(xl.shape, wl, gl, **kwargs),
                               xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cc.conv2d_weight(xl, wl.shape, gl, **kwargs),
                               wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    # The bias gradient, as the docstrings say.
    np.testing.assert_allclose(gl.sum(axis=(0, 2, 3)), bt.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("case", [
    ConvCase(1, 5, 4, 2, 2, (3, 2), stride=(2, 1), padding="same"),
    ConvCase(2, 4, 5, 2, 4, (2, 3), stride=(1, 2), dilation=(2, 1), padding=1, groups=2),
], ids=repr)
def test_finite_differences(case):
    x, w, bias, grad_out = case.arrays()
    kwargs = case.kwargs()

    def loss(x, w):
        return np.sum(cc.conv2d(x, w, bias, **kwargs) * grad_out)

    eps = 1e-6
    for name, a, grad in (
        ("x", x, cc.conv2d_input(x.shape, w, grad_out, **kwargs)),
        ("w", w, cc.conv2d_weight(x, w.shape, grad_out, **kwargs)),
    ):
        numeric = np.zeros_like(a)
        for index in np.ndindex(a.shape):
            plus, minus = a.copy(), a.copy()
            plus[index] += eps
            minus[index] -= eps
            args = {"x": x, "w": w}
            args[name] = plus
            up = loss(**args)
            args[name] = minus
            numeric[index] = (up - loss(**args)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7, err_msg=name)


def test_unread_input_pixels_get_zero_gradient():
    # Stride 3 with a 1x1 kernel reads rows/columns 0, 3, 6 only.
    w = np.ones((1, 1, 2, 3))
    grad_out = np.ones((1, 3, 3, 3))
    grad_x = cc.conv2d_input((1, 8, 7, 2), w, grad_out, stride=3)
    read = np.zeros((8, 7), bool)
    read[::3, ::3] = True
    assert np.all(grad_x[0][read] == 3.0)
    assert np.all(grad_x[0][~read] == 0.0)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float16, 1e-2)])
def test_low_precision_against_float64(dtype, rtol, layout):
    case = ConvCase(2, 9, 8, 8, 6, (3, 3), stride=(2, 1), padding="same", groups=2,
                    layout=layout)
    xl, wl, bias, gl = case.arrays()
    kwargs = case.kwargs()
    low = [a.astype(dtype) for a in (xl, wl, bias, gl)]
    exact = (cc.conv2d(*(a.astype(np.float64) for a in low[:3]), **kwargs),
             cc.conv2d_input(xl.shape, low[1].astype(np.float64),
                             low[3].astype(np.float64), **kwargs),
             cc.conv2d_weight(low[0].astype(np.float64), wl.shape,
                              low[3].astype(np.float64), **kwargs))
    results = (cc.conv2d(*low[:3], **kwargs),
               cc.conv2d_input(xl.shape, low[1], low[3], **kwargs),
               cc.conv2d_weight(low[0], wl.shape, low[3], **kwargs))
    for result, expected in zip(results, exact):
        assert result.dtype == dtype
        # Error relative to the size of the terms summed, not of the result.
        scale = np.abs(expected).max()
        np.testing.assert_allclose(result, expected, rtol=0, atol=rtol * scale)


def test_float16_accumulates_in_float32():
    # 4096 products of 1: float16 accumulation would stop at 2048.
    x = np.ones((1, 64, 64, 1), np.float16)
    w = np.ones((64, 64, 1, 1), np.float16)
    assert cc.conv2d(x, w)[0, 0, 0, 0] == 4096
    grad_w = cc.conv2d_weight(np.ones((1, 64, 64, 1), np.float16), (1, 1, 1, 1),
                              np.ones((1, 64, 64, 1), np.float16))
    assert grad_w[0, 0, 0, 0] == 4096


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_non_contiguous_inputs(layout):
    case = ConvCase(2, 7, 6, 4, 6, (3, 2), stride=(2, 1), padding=1, groups=2, layout=layout)
    xl, wl, bias, gl = case.arrays()
    kwargs = case.kwargs()
    expected = (cc.conv2d(xl, wl, bias, **kwargs),
                cc.conv2d_input(xl.shape, wl, gl, **kwargs),
                cc.conv2d_weight(xl, wl.shape, gl, **kwargs))

    def strided(a):
        """a as a view with a gap between elements, and Fortran-ordered."""
        spread = np.zeros(a.shape[:-1] + (2 * a.shape[-1],))
        spread[..., ::2] = a
        return np.asfortranarray(spread)[..., ::2]

    xs, ws, bs, gs = (strided(a) for a in (xl, wl, bias, gl))
    assert not any(a.flags.c_contiguous for a in (xs, ws, gs))
    results = (cc.conv2d(xs, ws, bs, **kwargs),
               cc.conv2d_input(xl.shape, ws, gs, **kwargs),
               cc.conv2d_weight(xs, wl.shape, gs, **kwargs))
    for result, exact in zip(results, expected):
        np.testing.assert_allclose(result, exact, rtol=1e-12, atol=1e-12)
    swapped = tuple(a.astype(a.dtype.newbyteorder(">" if np.little_endian else "<"))
                    for a in (xl, wl, bias, gl))
    xb, wb, bb, gb = swapped
    results = (cc.conv2d(xb, wb, bb, **kwargs),
               cc.conv2d_input(xl.shape, wb, gb, **kwargs),
               cc.conv2d_weight(xb, wl.shape, gb, **kwargs))
    for result, exact in zip(results, expected):
        assert result.dtype == np.float64  # native byte order, like NumPy's arithmetic
        np.testing.assert_array_equal(result, exact)


@pytest.mark.parametrize("spelling", ["same", "SAME", "valid", "VALID"])
def test_padding_strings_in_either_case(spelling):
    """JAX spells the padding strings in capitals."""
    case = ConvCase(2, 7, 6, 2, 3, (3, 2), stride=(2, 1), padding=spelling.lower())
    x, w, bias, _ = case.arrays()
    np.testing.assert_array_equal(cc.conv2d(x, w, padding=spelling, stride=(2, 1)),
                                  cc.conv2d(x, w, padding=spelling.lower(), stride=(2, 1)))
    y_ref = reference.conv2d(x, w, None, *case.params())
    np.testing.assert_allclose(cc.conv2d(x, w, padding=spelling, stride=(2, 1)), y_ref,
                               rtol=1e-12, atol=1e-12)


def test_array_likes_and_no_bias():
    x = [[[[1.0], [2.0]], [[3.0], [4.0]]]]  # (1, 2, 2, 1)
    w = [[[[1.0]], [[10.0]]]]                 # (1, 2, 1, 1)
    y = cc.conv2d(x, w)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y[0, :, :, 0], [[21.0], [43.0]])


def test_empty_batch():
    x = np.zeros((0, 5, 5, 2))
    w = np.ones((3, 3, 2, 4))
    assert cc.conv2d(x, w).shape == (0, 3, 3, 4)
    assert cc.conv2d_input(x.shape, w, np.zeros((0, 3, 3, 4))).shape == x.shape
    np.testing.assert_array_equal(
        cc.conv2d_weight(x, w.shape, np.zeros((0, 3, 3, 4))), np.zeros(w.shape))


# --- errors -----------------------------------------------------------------

X = np.zeros((2, 6, 5, 4))
W = np.zeros((3, 2, 4, 6))
G = np.zeros((2, 4, 4, 6))


@pytest.mark.parametrize("call, error, match", [
    (lambda: cc.conv2d(X[0], W), ValueError, "x must be 4-D"),
    (lambda: cc.conv2d(X, W[0]), ValueError, "w must be 4-D"),
    (lambda: cc.conv2d(X, np.zeros((3, 2, 3, 6))), ValueError,
     "w has 3 input channels per group but x has 4"),
    (lambda: cc.conv2d(X, np.zeros((3, 2, 1, 6)), groups=3), ValueError,
     "groups=3 does not divide the 4 input channels of x"),
    (lambda: cc.conv2d(X, np.zeros((3, 2, 2, 5)), groups=2), ValueError,
     "groups=2 does not divide the 5 output channels of w"),
    (lambda: cc.conv2d(X, W, groups=0), ValueError, "groups must be >= 1"),
    (lambda: cc.conv2d(X, W, groups=1.0), TypeError, "groups must be an integer"),
    (lambda: cc.conv2d(X, W, stride=0), ValueError, "stride must be >= 1"),
    (lambda: cc.conv2d(X, W, stride=(1, 0)), ValueError, "stride must be >= 1"),
    (lambda: cc.conv2d(X, W, stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
    (lambda: cc.conv2d(X, W, dilation=(0, 1)), ValueError, "dilation must be >= 1"),
    (lambda: cc.conv2d(X, W, dilation=1.5), TypeError, "dilation must be an integer"),
    (lambda: cc.conv2d(X, W, padding=-1), ValueError, "padding must be non-negative"),
    (lambda: cc.conv2d(X, W, padding=((1, -1), (0, 0))), ValueError,
     "padding must be non-negative"),
    (lambda: cc.conv2d(X, W, padding="full"), ValueError, "padding must be 'valid', 'same'"),
    (lambda: cc.conv2d(X, W, padding=1.0), TypeError, "padding must be an integer"),
    (lambda: cc.conv2d(X, W, padding=2**40), ValueError,
     r"padding: the input padded would have shape \(2, 2199023255558, .* than any array"),
    (lambda: cc.conv2d_input(X.shape, W, G[:, :1, :1], padding=2**40, stride=2**42),
     ValueError, "padding: the input padded"),
    (lambda: cc.conv2d(X, np.zeros((7, 2, 4, 6))), ValueError,
     r"w's kernel \(7, 2\) with dilation \(1, 1\) spans 7 rows, more than the 6 rows "
     r"of the padded input \(x's 6 rows \+ padding 0\+0\)"),
    (lambda: cc.conv2d(X, W, dilation=(1, 5)), ValueError,
     r"dilation \(1, 5\) spans 6 columns, more than the 5 columns"),
    (lambda: cc.conv2d(X, np.zeros((0, 2, 4, 6))), ValueError, "w must have a kernel of at least 1x1"),
    (lambda: cc.conv2d(X, W, layout="NCWH"), ValueError, "layout must be 'NHWC' or 'NCHW'"),
    (lambda: cc.conv2d(X.astype(int), W), TypeError, "x must be float16, bfloat16, float32 or float64"),
    (lambda: cc.conv2d(X, W.astype(np.int8)), TypeError, "w must be float16"),
    (lambda: cc.conv2d(X.astype(np.float32), W), TypeError,
     "arguments must share one dtype: x is float32, w is float64"),
    (lambda: cc.conv2d(X, W, np.zeros(6, np.float32)), TypeError, "bias is float32"),
    (lambda: cc.conv2d(X, W, np.zeros(5)), ValueError, r"bias must have shape \(C_out,\) = \(6,\)"),
    (lambda: cc.conv2d(X, W, np.zeros((1, 6))), ValueError, "bias must have shape"),
    # conv2d_input
    (lambda: cc.conv2d_input((2, 6, 5), W, G), ValueError, "input_shape must have 4 entries"),
    (lambda: cc.conv2d_input(6, W, G), TypeError, "input_shape must be a sequence"),
    (lambda: cc.conv2d_input((2, 6.0, 5, 4), W, G), TypeError, r"input_shape\[1\] must be an integer"),
    (lambda: cc.conv2d_input((2, -6, 5, 4), W, G), ValueError, "input_shape entries must be >= 0"),
    (lambda: cc.conv2d_input((2, 6, 5, 3), W, G), ValueError,
     "w has 4 input channels per group but input_shape has 3"),
    (lambda: cc.conv2d_input((2, 2, 5, 4), W, G), ValueError,
     "more than the 2 rows of the padded input .input_shape's 2 rows"),
    (lambda: cc.conv2d_input(X.shape, W[0], G), ValueError, "w must be 4-D"),
    (lambda: cc.conv2d_input(X.shape, W, G[0]), ValueError, "grad_out must have"),
    (lambda: cc.conv2d_input(X.shape, W, G[:, :3]), ValueError,
     r"grad_out must have the convolution's output shape \(2, 4, 4, 6\)"),
    (lambda: cc.conv2d_input(X.shape, W, G.astype(np.float32)), TypeError, "grad_out is float32"),
    (lambda: cc.conv2d_input(X.shape, W.astype(int), G), TypeError, "w must be float16"),
    (lambda: cc.conv2d_input(X.shape, W, G, stride=0), ValueError, "stride must be >= 1"),
    # conv2d_weight
    (lambda: cc.conv2d_weight(X, (3, 2, 4), G), ValueError, "weight_shape must have 4 entries"),
    (lambda: cc.conv2d_weight(X, (3, 2, 4, "6"), G), TypeError, r"weight_shape\[3\]"),
    (lambda: cc.conv2d_weight(X, (3, 2, 2, 6), G), ValueError,
     "weight_shape has 2 input channels per group but x has 4"),
    (lambda: cc.conv2d_weight(X, (3, 2, 4, 7), G), ValueError, "grad_out must have"),
    (lambda: cc.conv2d_weight(X, (3, 0, 4, 6), G), ValueError, "weight_shape must have a kernel"),
    (lambda: cc.conv2d_weight(X, (9, 2, 4, 6), G), ValueError,
     r"weight_shape's kernel \(9, 2\) with dilation \(1, 1\) spans 9 rows"),
    (lambda: cc.conv2d_weight(X[0], W.shape, G), ValueError, "x must be 4-D"),
    (lambda: cc.conv2d_weight(X.astype(np.float16), W.shape, G), TypeError,
     "x is float16, grad_out is float64"),
    (lambda: cc.conv2d_weight(X, W.shape, G.astype(bool)), TypeError, "grad_out must be float16"),
    (lambda: cc.conv2d_weight(X, W.shape, G, layout="nhwc"), ValueError, "layout must be"),
    (lambda: cc.conv2d_weight(X, W.shape, G, groups=2), ValueError,
     "weight_shape has 4 input channels per group but x has 4 channels in 2 group"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mixing_cupy_and_numpy_names_the_arguments(monkeypatch):
    class FakeCupyArray:
        pass

    fake = types.ModuleType("cupy")
    fake.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(TypeError, match="w is a cupy.ndarray"):
        cc.conv2d(X, FakeCupyArray())
    with pytest.raises(TypeError, match="grad_out is a cupy.ndarray"):
        cc.conv2d_weight(X, W.shape, FakeCupyArray())


@pytest.mark.parametrize("stride", [(2**61, 1), (1, 2**61), 2**61])
def test_a_stride_longer_than_the_input_reads_one_window(stride):
    """Any stride at least the padded size gives one output along that axis:
    the result equals the one at that size (no overflow in the views)."""
    case = ConvCase(2, 6, 5, 3, 4, (3, 2), padding=1)
    x, w, bias, _ = case.arrays()
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    short = (min(sh, 8), min(sw, 7))  # the padded size is 8 x 7
    y = cc.conv2d(x, w, bias, stride=stride, padding=1)
    np.testing.assert_array_equal(y, cc.conv2d(x, w, bias, stride=short, padding=1))
    g = np.ones(y.shape)
    np.testing.assert_array_equal(cc.conv2d_input(x.shape, w, g, stride=stride, padding=1),
                                  cc.conv2d_input(x.shape, w, g, stride=short, padding=1))
    np.testing.assert_array_equal(cc.conv2d_weight(x, w.shape, g, stride=stride, padding=1),
                                  cc.conv2d_weight(x, w.shape, g, stride=short, padding=1))


@pytest.mark.parametrize("name", ["stride", "padding", "dilation", "groups"])
def test_integers_beyond_64_bit_index_math_are_refused(name):
    x, w = np.ones((1, 4, 4, 1)), np.ones((2, 2, 1, 1))
    with pytest.raises(ValueError, match=f"{name} must be below 2\\*\\*62"):
        cc.conv2d(x, w, **{name: 2**62})
