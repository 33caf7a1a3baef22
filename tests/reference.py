"""Float64 references and case records that every test imports (as JAX's
tests keep ``lax_reference.py``).

Each reference computes an op from its definition in the docs, loop by loop
and in float64, with no code of the package: the tests compare every path
(NumPy, numba, the CUDA kernels on the CPU executor, the GPU) with these.
(Only :attr:`ConvCase.geom` calls the package: tests that call a path's
functions directly hand them the geometry the public functions would.)
``test_convolution_kernels.test_reference_matches_torch`` and the pooling
tests against PyTorch check the references themselves.
"""

import itertools
import math

import numpy as np

from cupyconv.convolution import _geometry as conv_geometry

# ---- layouts ------------------------------------------------------------------


def nchw_to(a, layout):
    """An NCHW array in ``layout``, C-contiguous."""
    return np.ascontiguousarray(a if layout == "NCHW" else a.transpose(0, 2, 3, 1))


def to_nchw(a, layout):
    """An array in ``layout`` as an NCHW view."""
    return a if layout == "NCHW" else a.transpose(0, 3, 1, 2)


def _nhwc(a, layout):
    return a if layout == "NHWC" else a.transpose(0, 2, 3, 1)


def _from_nhwc(a, layout):
    return a if layout == "NHWC" else a.transpose(0, 3, 1, 2)


def _hwio(w, layout):
    """A kernel in ``layout`` as (kh, kw, C_in/groups, C_out)."""
    return w if layout == "NHWC" else w.transpose(2, 3, 1, 0)


def _from_hwio(w, layout):
    return w if layout == "NHWC" else w.transpose(3, 2, 0, 1)


# ---- data ----------------------------------------------------------------------


def random_bits(shape, dtype, seed=0):
    """Arbitrary bit patterns (NaN payloads included): a copy must keep them."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    raw = rng.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def small_integers(rng, shape, dtype):
    """Integers in [-5, 5] (real and imaginary parts for complex dtypes)."""
    data = rng.integers(-5, 6, size=shape)
    if np.dtype(dtype).kind == "c":
        return (data + 1j * rng.integers(-5, 6, size=shape)).astype(dtype)
    return data.astype(dtype)


def assert_same_bits(got, expected):
    """Same type, dtype, shape and bytes, and ``got`` C-contiguous."""
    assert type(got) is type(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(np.frombuffer(got.tobytes(), np.uint8),
                                  np.frombuffer(expected.tobytes(), np.uint8))


# ---- convolution ------------------------------------------------------------------


def conv_padding(padding, kernel, stride, dilation, size):
    """((top, bottom), (left, right)) of any padding form, from the docs'
    definitions (``'same'``: output ``ceil(size / stride)``, the odd one
    at the bottom / right)."""
    if isinstance(padding, str):
        padding = padding.lower()
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


_NHWC_AXES = {"NHWC": (0, 1, 2, 3), "NCHW": (0, 2, 3, 1)}
_HWIO_AXES = {"NHWC": (0, 1, 2, 3), "NCHW": (2, 3, 1, 0)}


def _conv_sizes(x_shape, w_shape, stride, padding, dilation, layout):
    """NHWC-ordered sizes and the output size, from the conv2d formula."""
    n, h, w, c_in = (x_shape[axis] for axis in _NHWC_AXES[layout])
    kh, kw, cin_g, c_out = (w_shape[axis] for axis in _HWIO_AXES[layout])
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, h, w, c_in, kh, kw, cin_g, c_out, oh, ow


def _tap_views(x_padded, i, j, out_hw, stride, dilation):
    """The input pixels tap (i, j) meets, one per output pixel: (N, OH, OW, C)."""
    (oh, ow), (sh, sw), (dh, dw) = out_hw, stride, dilation
    return x_padded[:, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                    j * dw:j * dw + sw * (ow - 1) + 1:sw, :]


def _padded(x, padding):
    (top, bottom), (left, right) = padding
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def conv2d(x, w, bias, stride, padding, dilation, groups, layout):
    """``y[n, oh, ow, co] = bias[co] + sum over i, j, c of xpad[n, oh*sh +
    i*dh, ow*sw + j*dw, g*Cig + c] * w[i, j, c, co]`` in float64, tap by tap;
    ``padding`` explicit, arrays in ``layout``."""
    x, w = _nhwc(np.asarray(x, np.float64), layout), _hwio(np.asarray(w, np.float64), layout)
    n, h, wd, c_in, kh, kw, cin_g, c_out, oh, ow = _conv_sizes(
        x.shape, w.shape, stride, padding, dilation, "NHWC")
    cout_g = c_out // groups
    xp = _padded(x, padding)
    y = np.zeros((n, oh, ow, c_out))
    for i in range(kh):
        for j in range(kw):
            taps = _tap_views(xp, i, j, (oh, ow), stride, dilation)
            for g in range(groups):
                y[..., g * cout_g:(g + 1) * cout_g] += (
                    taps[..., g * cin_g:(g + 1) * cin_g]
                    @ w[i, j, :, g * cout_g:(g + 1) * cout_g])
    if bias is not None:
        y += np.asarray(bias, np.float64)
    return _from_nhwc(y, layout)


def conv2d_input(w, grad_out, input_shape, stride, padding, dilation, groups, layout):
    """``d/dx sum(conv2d(x, w) * grad_out)`` in float64: each tap's products
    added back onto the padded input pixels it read."""
    go = _nhwc(np.asarray(grad_out, np.float64), layout)
    w = _hwio(np.asarray(w, np.float64), layout)
    n, h, wd, c_in, kh, kw, cin_g, c_out, oh, ow = _conv_sizes(
        input_shape, _from_hwio(w, layout).shape, stride, padding, dilation, layout)
    cout_g = c_out // groups
    (top, bottom), (left, right) = padding
    grad_padded = np.zeros((n, h + top + bottom, wd + left + right, c_in))
    for i in range(kh):
        for j in range(kw):
            taps = _tap_views(grad_padded, i, j, (oh, ow), stride, dilation)
            for g in range(groups):
                taps[..., g * cin_g:(g + 1) * cin_g] += (
                    go[..., g * cout_g:(g + 1) * cout_g]
                    @ w[i, j, :, g * cout_g:(g + 1) * cout_g].T)
    return _from_nhwc(grad_padded[:, top:top + h, left:left + wd], layout)


def conv2d_weight(x, grad_out, weight_shape, stride, padding, dilation, groups, layout):
    """``d/dw sum(conv2d(x, w) * grad_out)`` in float64, tap by tap."""
    x = _nhwc(np.asarray(x, np.float64), layout)
    go = _nhwc(np.asarray(grad_out, np.float64), layout)
    n, h, wd, c_in, kh, kw, cin_g, c_out, oh, ow = _conv_sizes(
        _from_nhwc(x, layout).shape, weight_shape, stride, padding, dilation, layout)
    cout_g = c_out // groups
    xp = _padded(x, padding)
    grad_w = np.zeros((kh, kw, cin_g, c_out))
    for i in range(kh):
        for j in range(kw):
            taps = _tap_views(xp, i, j, (oh, ow), stride, dilation)
            for g in range(groups):
                grad_w[i, j, :, g * cout_g:(g + 1) * cout_g] = np.einsum(
                    "nhwc,nhwo->co", taps[..., g * cin_g:(g + 1) * cin_g],
                    go[..., g * cout_g:(g + 1) * cout_g])
    return _from_hwio(grad_w, layout)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class ConvCase:
    """One convolution: sizes in NHWC terms, ``padding`` in any form the
    functions take, arrays drawn in ``layout`` and ``dtype``."""

    def __init__(self, n, h, w, c_in, c_out, kernel, stride=1, padding=0,
                 dilation=1, groups=1, layout="NHWC", dtype=np.float64, bias=True):
        self.n, self.h, self.w, self.c_in, self.c_out = n, h, w, c_in, c_out
        self.kernel, self.groups, self.layout, self.bias = kernel, groups, layout, bias
        self.stride, self.dilation, self.padding = _pair(stride), _pair(dilation), padding
        self.dtype = np.dtype(dtype)

    def replace(self, **changes):
        """A copy with some arguments changed (``layout=``, ``dtype=``, ...)."""
        arguments = dict(n=self.n, h=self.h, w=self.w, c_in=self.c_in, c_out=self.c_out,
                         kernel=self.kernel, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, groups=self.groups, layout=self.layout,
                         dtype=self.dtype, bias=self.bias)
        return ConvCase(**{**arguments, **changes})

    @property
    def explicit_padding(self):
        return conv_padding(self.padding, self.kernel, self.stride, self.dilation,
                            (self.h, self.w))

    @property
    def x_shape(self):
        if self.layout == "NHWC":
            return (self.n, self.h, self.w, self.c_in)
        return (self.n, self.c_in, self.h, self.w)

    @property
    def w_shape(self):
        (kh, kw), cin_g = self.kernel, self.c_in // self.groups
        if self.layout == "NHWC":
            return (kh, kw, cin_g, self.c_out)
        return (self.c_out, cin_g, kh, kw)

    @property
    def out_hw(self):
        return _conv_sizes(self.x_shape, self.w_shape, self.stride, self.explicit_padding,
                           self.dilation, self.layout)[-2:]

    @property
    def y_shape(self):
        oh, ow = self.out_hw
        if self.layout == "NHWC":
            return (self.n, oh, ow, self.c_out)
        return (self.n, self.c_out, oh, ow)

    def params(self):
        """The references' trailing arguments (explicit padding)."""
        return self.stride, self.explicit_padding, self.dilation, self.groups, self.layout

    def kwargs(self):
        """The public functions' keyword arguments (padding as given)."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, layout=self.layout)

    @property
    def geom(self):
        """The ConvGeometry cupyconv.convolution hands to its paths."""
        return conv_geometry.conv2d_geometry(self.x_shape, self.w_shape, *self.params())

    def arrays(self, seed=0):
        """x, w, bias (None without one) and grad_out, uniform in [-1, 1)."""
        rng = np.random.default_rng(seed)

        def draw(shape):
            return rng.uniform(-1, 1, shape).astype(self.dtype)

        bias = draw((self.c_out,)) if self.bias else None
        return draw(self.x_shape), draw(self.w_shape), bias, draw(self.y_shape)

    def expected(self, x, w, bias, grad_out):
        """The references' (y, grad_x, grad_w) for the case's arrays."""
        params = self.params()
        return (conv2d(x, w, bias, *params),
                conv2d_input(w, grad_out, x.shape, *params),
                conv2d_weight(x, grad_out, w.shape, *params))

    def __repr__(self):
        return (f"N{self.n}_{self.h}x{self.w}_{self.c_in}to{self.c_out}_k{self.kernel}"
                f"_s{self.stride}_p{self.padding}_d{self.dilation}_g{self.groups}"
                f"_{self.layout}_{self.dtype.name}")


#: Convolutions of every argument form (NHWC float64; ``replace`` changes
#: layout and dtype).
CONV_CASES = [
    ConvCase(2, 9, 7, 3, 4, (5, 3), padding=(2, 1)),                  # seed-like
    ConvCase(2, 8, 9, 2, 3, (3, 5), stride=(1, 2), padding=1),
    ConvCase(1, 5, 12, 3, 2, (1, 9), padding="same"),                 # even total
    ConvCase(2, 11, 4, 1, 3, (7, 1), stride=(2, 1), padding="same"),  # odd total
    ConvCase(1, 7, 8, 4, 6, (2, 4), padding="same", groups=2),        # odd totals
    ConvCase(3, 13, 11, 2, 4, (3, 2), stride=(3, 5), padding="same"),  # same + stride
    ConvCase(2, 10, 9, 3, 3, (3, 3), stride=(4, 3), padding=((2, 0), (1, 3))),
    ConvCase(1, 9, 10, 2, 4, (3, 2), dilation=(2, 3), padding=((0, 1), (3, 2))),
    ConvCase(2, 12, 13, 4, 4, (3, 3), stride=(2, 3), dilation=(3, 2), padding="valid"),
    ConvCase(2, 7, 6, 6, 6, (3, 3), padding=1, groups=6),             # depthwise
    ConvCase(1, 6, 7, 4, 8, (2, 3), stride=2, padding=1, groups=4),   # depth multiplier 2
    ConvCase(2, 8, 7, 6, 9, (3, 2), stride=(1, 5), groups=3, dilation=(1, 2)),
    ConvCase(1, 5, 3, 1, 2, (7, 5), padding=(1, 1)),                  # kernel == padded input
    ConvCase(1, 4, 6, 2, 3, (4, 8), padding=((0, 0), (1, 1)), dilation=(1, 1)),
    ConvCase(3, 1, 1, 5, 7, (1, 1)),                                  # 1x1 on 1x1
    ConvCase(2, 6, 5, 3, 4, (1, 1), stride=(2, 3)),                   # strided 1x1
    ConvCase(1, 13, 11, 1, 1, (2, 2), stride=(5, 4), padding=((3, 1), (0, 2))),
]


# ---- pooling -------------------------------------------------------------------------


def pool_output_size(n, k, s, p, d, ceil_mode):
    """PyTorch's output size along one axis."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def pool_window(kernel_size, stride, padding, dilation):
    """The window's ``(h, w)`` pairs; ``stride=None`` means ``kernel_size``."""
    k = _pair(kernel_size)
    return k, _pair(k if stride is None else stride), _pair(padding), _pair(dilation)


def max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(values, indices) of an NCHW array, window by window, tap by tap: the
    first maximum in row-major order, a later NaN beating everything."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pool_window(kernel_size, stride, padding,
                                                         dilation)
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    out = np.empty((n, c, oh, ow), x.dtype)
    indices = np.empty((n, c, oh, ow), np.int64)
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        best = best_at = None
        for u, v in itertools.product(range(kh), range(kw)):
            r, q = i * sh - ph + u * dh, j * sw - pw + v * dw
            if not (0 <= r < h and 0 <= q < w):
                continue
            value = x[b, ch, r, q]
            if best is None or value > best or value != value:  # NaN: the last
                best, best_at = value, r * w + q
        out[b, ch, i, j], indices[b, ch, i, j] = best, best_at
    return out, indices


def max_pool2d_backward(x, grad_out, indices):
    """float64 sum of each window's gradient into the element it picked (NCHW)."""
    n, c, h, w = x.shape
    grad = np.zeros((n, c, h * w))
    for b, ch, i, j in np.ndindex(*indices.shape):
        grad[b, ch, indices[b, ch, i, j]] += float(grad_out[b, ch, i, j])
    return grad.reshape(x.shape)


#: Pooling cases: (kernel_size, stride, padding, dilation, ceil_mode, (H, W)).
POOL_CONFIGS = [
    ((2, 1), None, 0, 1, False, (6, 3)),          # the 2x1 path
    ((2, 1), None, 0, 1, False, (7, 3)),          # odd H: last row dropped
    ((2, 1), None, 0, 1, True, (7, 3)),           # odd H: last row a window
    ((2, 1), (2, 1), 0, (1, 3), False, (4, 2)),   # 2x1 whatever the w dilation
    (2, None, 0, 1, False, (5, 4)),
    (3, 1, 1, 1, False, (4, 5)),                  # overlapping, padded
    ((3, 2), (1, 2), (1, 1), 1, True, (5, 5)),
    ((2, 3), (2, 1), (1, 0), (2, 1), False, (6, 4)),  # dilation
    (3, 2, 1, 2, True, (7, 6)),
    ((2, 2), 3, 0, 1, True, (8, 7)),              # stride > kernel, ceil
    ((1, 1), 1, 0, 1, False, (2, 3)),
    ((4, 3), (1, 1), (2, 1), 1, False, (4, 3)),   # window as large as allowed
    ((2, 1), (1, 1), 0, 1, False, (4, 2)),        # 2x1 window, overlapping rows
]

#: Kinds of pooling input (see :func:`pool_input`).
POOL_INPUT_KINDS = ["random", "ties", "constant", "nan", "-inf"]


def pool_input(rng, shape, dtype, kind):
    """NCHW test data: "random" normal values (floats) or a wide integer
    range, "ties" a few small integers, "constant", "nan" (ties plus NaNs),
    "-inf" (ties plus -inf, floats)."""
    dtype = np.dtype(dtype)
    if kind == "random":
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if kind == "constant":
        return np.full(shape, 3, dtype)
    x = rng.integers(0, 3, size=shape).astype(dtype)
    if kind in ("nan", "-inf"):
        x.flat[rng.choice(x.size, max(1, x.size // 5), replace=False)] = (
            np.nan if kind == "nan" else -np.inf)
    return x


# ---- dilation ------------------------------------------------------------------------


#: Dtypes of the dilation tests: every kind and item size.
DILATION_DTYPES = [np.bool_, np.int8, np.int32, np.int64, np.float16, np.float32,
                   np.float64, np.complex64, np.complex128]


def _steps(ndim, axes, dilation):
    steps = [1] * ndim
    for axis, d in zip(axes, dilation):
        steps[axis] = d + 1
    return steps


def dilate(a, axes, dilation, shape=None):
    """Place every element by hand: index j along axis k goes to j * (d_k + 1)."""
    a = np.asarray(a)
    steps = _steps(a.ndim, axes, dilation)
    if shape is None:
        shape = tuple(n * s for n, s in zip(a.shape, steps))
    out = np.zeros(shape, a.dtype)
    for index in itertools.product(*map(range, a.shape)):
        out[tuple(i * s for i, s in zip(index, steps))] = a[index]
    return out


def undilate(a, axes, dilation):
    """Take every element by hand: index j along axis k from j * (d_k + 1)."""
    a = np.asarray(a)
    steps = _steps(a.ndim, axes, dilation)
    shape = tuple(-(-n // s) for n, s in zip(a.shape, steps))
    out = np.empty(shape, a.dtype)
    for index in itertools.product(*map(range, shape)):
        out[index] = a[tuple(i * s for i, s in zip(index, steps))]
    return out
