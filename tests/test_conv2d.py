"""conv2d, conv2d_input and conv2d_weight: the NumPy path against a float64
loop reference, PyTorch, finite differences and lower precisions; every
argument error; and (on a GPU) the CuPy path against the NumPy path."""

import sys
import time
import types

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _parallel, convolution


# --- independent reference --------------------------------------------------


def reference_padding(padding, kernel, stride, dilation, size):
    """((top, bottom), (left, right)) from the definitions in the docs."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        result = []
        for k, s, d, n in zip(kernel, stride, dilation, size):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
            result.append((total // 2, total - total // 2))
        return tuple(result)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def reference(x, w, grad_out, stride, padding, dilation, groups):
    """y (no bias), d sum(y*grad_out)/dx and /dw by loops over output pixels
    and taps, in float64, NHWC / HWIO; ``padding`` explicit.  Every product
    is spelled out: output pixel (oh, ow) reads padded (oh*sh + i*dh, ow*sw + j*dw)."""
    (sh, sw), (dh, dw) = stride, dilation
    x, w = x.astype(np.float64), w.astype(np.float64)
    xp = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    n, hp, wp, c_in = xp.shape
    kh, kw, cin_g, c_out = w.shape
    cout_g = c_out // groups
    oh_count = (hp - dh * (kh - 1) - 1) // sh + 1
    ow_count = (wp - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, oh_count, ow_count, c_out))
    grad_xp = np.zeros_like(xp)
    grad_w = np.zeros_like(w)
    for oh in range(oh_count):
        for ow in range(ow_count):
            for i in range(kh):
                for j in range(kw):
                    r, c = oh * sh + i * dh, ow * sw + j * dw
                    for g in range(groups):
                        ins = slice(g * cin_g, (g + 1) * cin_g)
                        outs = slice(g * cout_g, (g + 1) * cout_g)
                        y[:, oh, ow, outs] += xp[:, r, c, ins] @ w[i, j, :, outs]
                        if grad_out is not None:
                            go = grad_out[:, oh, ow, outs].astype(np.float64)
                            grad_xp[:, r, c, ins] += go @ w[i, j, :, outs].T
                            grad_w[i, j, :, outs] += xp[:, r, c, ins].T @ go
    (top, _), (left, _) = padding
    grad_x = grad_xp[:, top:top + x.shape[1], left:left + x.shape[2]]
    return y, grad_x, grad_w


def to_layout(x, w, layout):
    """NHWC activations / HWIO weights in ``layout``."""
    if layout == "NHWC":
        return x, w
    return x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)


def from_layout(a, layout):
    """Activations in ``layout`` as NHWC."""
    return a if layout == "NHWC" else a.transpose(0, 2, 3, 1)


def weight_from_layout(w, layout):
    """A kernel in ``layout`` as HWIO."""
    return w if layout == "NHWC" else w.transpose(2, 3, 1, 0)


class Case:
    """One convolution; shapes in NHWC terms."""

    def __init__(self, n, h, w, c_in, c_out, kernel, stride=1, padding=0,
                 dilation=1, groups=1):
        self.n, self.h, self.w, self.c_in, self.c_out = n, h, w, c_in, c_out
        self.kernel, self.groups = kernel, groups
        self.stride = stride if isinstance(stride, tuple) else (stride, stride)
        self.dilation = dilation if isinstance(dilation, tuple) else (dilation, dilation)
        self.padding = padding
        self.explicit_padding = reference_padding(
            padding, kernel, self.stride, self.dilation, (h, w))

    def kwargs(self, layout):
        return dict(stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups, layout=layout)

    def arrays(self, dtype=np.float64, seed=0):
        """x (NHWC), w (HWIO), bias, grad_out (NHWC) of the case."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.n, self.h, self.w, self.c_in))
        w = rng.standard_normal(self.kernel + (self.c_in // self.groups, self.c_out))
        bias = rng.standard_normal(self.c_out)
        y, _, _ = reference(x, w, None, self.stride, self.explicit_padding,
                            self.dilation, self.groups)
        grad_out = rng.standard_normal(y.shape)
        return tuple(a.astype(dtype) for a in (x, w, bias, grad_out))

    def __repr__(self):
        return (f"N{self.n}_{self.h}x{self.w}_{self.c_in}to{self.c_out}_k{self.kernel}"
                f"_s{self.stride}_p{self.padding}_d{self.dilation}_g{self.groups}")


CASES = [
    Case(2, 9, 7, 3, 4, (5, 3), padding=(2, 1)),                  # seed-like
    Case(2, 8, 9, 2, 3, (3, 5), stride=(1, 2), padding=1),
    Case(1, 5, 12, 3, 2, (1, 9), padding="same"),                 # even total
    Case(2, 11, 4, 1, 3, (7, 1), stride=(2, 1), padding="same"),  # odd total
    Case(1, 7, 8, 4, 6, (2, 4), padding="same", groups=2),        # odd totals
    Case(3, 13, 11, 2, 4, (3, 2), stride=(3, 5), padding="same"),  # same + stride
    Case(2, 10, 9, 3, 3, (3, 3), stride=(4, 3), padding=((2, 0), (1, 3))),
    Case(1, 9, 10, 2, 4, (3, 2), dilation=(2, 3), padding=((0, 1), (3, 2))),
    Case(2, 12, 13, 4, 4, (3, 3), stride=(2, 3), dilation=(3, 2), padding="valid"),
    Case(2, 7, 6, 6, 6, (3, 3), padding=1, groups=6),             # depthwise
    Case(1, 6, 7, 4, 8, (2, 3), stride=2, padding=1, groups=4),   # depth multiplier 2
    Case(2, 8, 7, 6, 9, (3, 2), stride=(1, 5), groups=3, dilation=(1, 2)),
    Case(1, 5, 3, 1, 2, (7, 5), padding=(1, 1)),                  # kernel == padded input
    Case(1, 4, 6, 2, 3, (4, 8), padding=((0, 0), (1, 1)), dilation=(1, 1)),
    Case(3, 1, 1, 5, 7, (1, 1)),                                  # 1x1 on 1x1
    Case(2, 6, 5, 3, 4, (1, 1), stride=(2, 3)),                   # strided 1x1
    Case(1, 13, 11, 1, 1, (2, 2), stride=(5, 4), padding=((3, 1), (0, 2))),
]


@pytest.fixture(params=["tap-major", "pixel-major"])
def gather_order(request, monkeypatch):
    """Run the NumPy path with every gathered matrix in one memory order
    (normally chosen by channels per group)."""
    limit = 10**9 if request.param == "tap-major" else -1
    monkeypatch.setattr(convolution, "_TAP_MAJOR_MAX_CHANNELS", limit)
    return request.param


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_reference(case, layout, gather_order):
    x, w, bias, grad_out = case.arrays()
    y_ref, gx_ref, gw_ref = reference(x, w, grad_out, case.stride,
                                      case.explicit_padding, case.dilation,
                                      case.groups)
    xl, wl = to_layout(x, w, layout)
    gl = to_layout(grad_out, w, layout)[0]
    kwargs = case.kwargs(layout)
    y = cc.conv2d(xl, wl, bias, **kwargs)
    grad_x = cc.conv2d_input(xl.shape, wl, gl, **kwargs)
    grad_w = cc.conv2d_weight(xl, wl.shape, gl, **kwargs)
    for result in (y, grad_x, grad_w):
        assert isinstance(result, np.ndarray) and result.dtype == np.float64
        assert result.flags.c_contiguous
    np.testing.assert_allclose(from_layout(y, layout), y_ref + bias, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(from_layout(grad_x, layout), gx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weight_from_layout(grad_w, layout), gw_ref,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block_elements", [1, 40, 500])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_blocking(monkeypatch, block_elements, layout, threads, gather_order):
    """Bands of rows of one image, and several images per block, give the
    same result as one block, whether the blocks run one after another or
    are shared among threads."""
    case = Case(5, 9, 8, 4, 6, (3, 2), stride=(2, 1), padding="same", groups=2)
    x, w, bias, grad_out = case.arrays()
    xl, wl = to_layout(x, w, layout)
    gl = to_layout(grad_out, w, layout)[0]
    kwargs = case.kwargs(layout)
    whole = (cc.conv2d(xl, wl, bias, **kwargs),
             cc.conv2d_input(xl.shape, wl, gl, **kwargs),
             cc.conv2d_weight(xl, wl.shape, gl, **kwargs))
    monkeypatch.setattr(convolution, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(convolution, "_MIN_SHARED_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(_parallel, "CPUS", threads)
    monkeypatch.setattr(_parallel, "blas_threads_limited", lambda: threads > 1)
    assert len(convolution._blocks(cc._args.conv2d_geometry(
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
    monkeypatch.setattr(convolution, "_BLOCK_ELEMENTS", 300)
    monkeypatch.setattr(convolution, "_MIN_SHARED_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(_parallel, "CPUS", 3)
    monkeypatch.setattr(_parallel, "blas_threads_limited", lambda: True)
    gather, delays = convolution._im2col, np.random.default_rng(6)

    def uneven_gather(*args):  # threads finish blocks in a different order each time
        time.sleep(delays.uniform(0, 2e-3))
        gather(*args)
    monkeypatch.setattr(convolution, "_im2col", uneven_gather)
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
    monkeypatch.setattr(convolution, "_CHUNK_OUTPUT_BYTES", 4 * 6 * 8)  # 4 float64 rows
    calls = []
    matmul = np.matmul

    def counting(a, b, **kw):
        calls.append(a.ndim)
        return matmul(a, b, **kw)

    monkeypatch.setattr(convolution.numpy, "matmul", counting)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 5, 1))  # NHWC: 2*7*5 = 70 rows, 17 chunks + 2
    w = rng.standard_normal((3, 3, 1, 6))
    xl, wl = to_layout(x, w, layout)
    got = cc.conv2d(xl, wl, padding=1, layout=layout)
    monkeypatch.setattr(convolution.numpy, "matmul", matmul)
    assert max(calls) == 4  # a stack of chunks was multiplied
    want = reference(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)[0]
    np.testing.assert_allclose(from_layout(got, layout), want, rtol=1e-12, atol=1e-12)


def test_blocks_split_work_among_cores(monkeypatch):
    """A batch that fits one block is still cut into several per core."""
    monkeypatch.setattr(_parallel, "CPUS", 2)
    geom = cc._args.conv2d_geometry((128, 32, 15, 1), (5, 3, 1, 64), 1, (2, 1),
                                    1, 1, "NHWC")
    blocks = convolution._blocks(geom)
    assert len(blocks) >= 2 * convolution._BLOCKS_PER_CORE
    covered = [n for (n0, n1), rows in blocks for n in range(n0, n1)]
    assert covered == list(range(128))


TORCH_CASES = [CASES[i] for i in (0, 5, 6, 8, 9, 11)]


@pytest.mark.parametrize("case", TORCH_CASES, ids=repr)
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, w, bias, grad_out = case.arrays()
    xl, wl = to_layout(x, w, "NCHW")
    gl = to_layout(grad_out, w, "NCHW")[0]
    (top, bottom), (left, right) = case.explicit_padding
    xt = torch.tensor(xl, requires_grad=True)
    wt = torch.tensor(wl, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    yt = torch.nn.functional.conv2d(
        torch.nn.functional.pad(xt, (left, right, top, bottom)), wt, bt,
        stride=case.stride, dilation=case.dilation, groups=case.groups)
    yt.backward(torch.tensor(gl))
    kwargs = case.kwargs("NCHW")
    np.testing.assert_allclose(cc.conv2d(xl, wl, bias, **kwargs),
                               yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cc.conv2d_input(xl.shape, wl, gl, **kwargs),
                               xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cc.conv2d_weight(xl, wl.shape, gl, **kwargs),
                               wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    # The bias gradient, as the docstrings say.
    np.testing.assert_allclose(gl.sum(axis=(0, 2, 3)), bt.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("case", [
    Case(1, 5, 4, 2, 2, (3, 2), stride=(2, 1), padding="same"),
    Case(2, 4, 5, 2, 4, (2, 3), stride=(1, 2), dilation=(2, 1), padding=1, groups=2),
], ids=repr)
def test_finite_differences(case):
    x, w, bias, grad_out = case.arrays()
    kwargs = case.kwargs("NHWC")

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
    case = Case(2, 9, 8, 8, 6, (3, 3), stride=(2, 1), padding="same", groups=2)
    x, w, bias, grad_out = case.arrays()
    xl, wl = to_layout(x, w, layout)
    gl = to_layout(grad_out, w, layout)[0]
    kwargs = case.kwargs(layout)
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
    case = Case(2, 7, 6, 4, 6, (3, 2), stride=(2, 1), padding=1, groups=2)
    x, w, bias, grad_out = case.arrays()
    xl, wl = to_layout(x, w, layout)
    gl = to_layout(grad_out, w, layout)[0]
    kwargs = case.kwargs(layout)
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
    case = Case(2, 7, 6, 2, 3, (3, 2), stride=(2, 1), padding=spelling.lower())
    x, w, bias, _ = case.arrays()
    np.testing.assert_array_equal(cc.conv2d(x, w, padding=spelling, stride=(2, 1)),
                                  cc.conv2d(x, w, padding=spelling.lower(), stride=(2, 1)))
    y_ref = reference(x, w, None, case.stride, case.explicit_padding, case.dilation, 1)[0]
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
     "output size 0x4 is below 1: x's padded size 6x5 .* kernel 7x2 of w"),
    (lambda: cc.conv2d(X, W, dilation=(1, 5)), ValueError, "output size .* below 1"),
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
    (lambda: cc.conv2d_input(np.array([2, 6, 5, 4]), W, G), TypeError,
     "input_shape must be a tuple"),
    (lambda: cc.conv2d_input((2, 6.0, 5, 4), W, G), TypeError, r"input_shape\[1\] must be an integer"),
    (lambda: cc.conv2d_input((2, -6, 5, 4), W, G), ValueError, "input_shape entries must be >= 0"),
    (lambda: cc.conv2d_input((2, 6, 5, 3), W, G), ValueError,
     "w has 4 input channels per group but input_shape has 3"),
    (lambda: cc.conv2d_input((2, 2, 5, 4), W, G), ValueError, "output size .* input_shape"),
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
    (lambda: cc.conv2d_weight(X, (9, 2, 4, 6), G), ValueError, "output size .* weight_shape"),
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


# --- GPU: the CuPy path against the NumPy path ------------------------------

needs_gpu = pytest.mark.skipif(
    not cc.gpu_available(), reason=f"no GPU: {cc.gpu_unavailable_reason()}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 3, 5, 6, 8, 9, 11, 12, 14)], ids=repr)
def test_gpu_matches_numpy(case, layout, dtype):
    import cupy

    x, w, bias, grad_out = case.arrays(dtype)
    xl, wl = to_layout(x, w, layout)
    gl = to_layout(grad_out, w, layout)[0]
    kwargs = case.kwargs(layout)
    on_gpu = [cupy.asarray(a) for a in (xl, wl, bias, gl)]
    results = (cc.conv2d(*on_gpu[:3], **kwargs),
               cc.conv2d_input(xl.shape, on_gpu[1], on_gpu[3], **kwargs),
               cc.conv2d_weight(on_gpu[0], wl.shape, on_gpu[3], **kwargs))
    expected = (cc.conv2d(xl, wl, bias, **kwargs),
                cc.conv2d_input(xl.shape, wl, gl, **kwargs),
                cc.conv2d_weight(xl, wl.shape, gl, **kwargs))
    tolerance = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for result, exact in zip(results, expected):
        assert isinstance(result, cupy.ndarray) and result.dtype == dtype
        assert result.shape == exact.shape
        scale = max(1.0, float(np.abs(exact.astype(np.float64)).max()))
        np.testing.assert_allclose(cupy.asnumpy(result).astype(np.float64),
                                   exact.astype(np.float64), rtol=0,
                                   atol=tolerance * scale)


@pytest.mark.gpu
@needs_gpu
def test_gpu_non_contiguous_and_seed_layer():
    import cupy

    case = Case(8, 16, 15, 64, 128, (5, 3), padding=(2, 1))
    x, w, bias, grad_out = case.arrays(np.float32)
    kwargs = case.kwargs("NHWC")
    xs = cupy.asarray(np.asfortranarray(x))
    results = (cc.conv2d(xs, cupy.asarray(w), cupy.asarray(bias), **kwargs),
               cc.conv2d_input(x.shape, cupy.asarray(w), cupy.asarray(grad_out)[..., ::1], **kwargs),
               cc.conv2d_weight(xs, w.shape, cupy.asarray(grad_out), **kwargs))
    expected = (cc.conv2d(x, w, bias, **kwargs),
                cc.conv2d_input(x.shape, w, grad_out, **kwargs),
                cc.conv2d_weight(x, w.shape, grad_out, **kwargs))
    for result, exact in zip(results, expected):
        scale = float(np.abs(exact).max())
        np.testing.assert_allclose(cupy.asnumpy(result), exact, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("stride", [(2**61, 1), (1, 2**61), 2**61])
def test_a_stride_longer_than_the_input_reads_one_window(stride):
    """Any stride at least the padded size gives one output along that axis:
    the result equals the one at that size (no overflow in the views)."""
    case = Case(2, 6, 5, 3, 4, (3, 2), padding=1)
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
