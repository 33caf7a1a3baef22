"""The conv2d kernels (cuda/convolution.cu through cupyconv/convolution/_cuda.py)
against a float64 reference that loops over kernel taps.

On this machine the kernels run on NumPy buffers through the CPU executor
(fixture ``cpu_kernels``); shapes stay small because every CUDA thread is a
fiber there.  The ``gpu`` tests run the same launch code on CuPy arrays at
realistic sizes.
"""

import numpy as np
import pytest

import cupyconv
import cpu_cuda
from cupyconv import _kernels
from cupyconv.convolution import _cuda as conv_cuda, _geometry as conv_geometry

# ---- float64 reference --------------------------------------------------------


def _to_nhwc(x, w, layout):
    if layout == "NCHW":
        return x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0)
    return x, w


def _tap_views(x_padded, i, j, out_hw, stride, dilation):
    """The input pixels tap (i, j) meets, one per output pixel: (N, OH, OW, C)."""
    (oh, ow), (sh, sw), (dh, dw) = out_hw, stride, dilation
    return x_padded[:, i * dh:i * dh + sh * (oh - 1) + 1:sh,
                    j * dw:j * dw + sw * (ow - 1) + 1:sw, :]


def _geometry(x_shape, w_shape, stride, padding, dilation, layout):
    """NHWC-ordered sizes and the output size, from the conv2d formula."""
    if layout == "NHWC":
        n, h, w, c_in = x_shape
        kh, kw, cin_g, c_out = w_shape
    else:
        n, c_in, h, w = x_shape
        c_out, cin_g, kh, kw = w_shape
    (top, bottom), (left, right) = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, h, w, c_in, kh, kw, cin_g, c_out, oh, ow


def _from_nhwc(a, layout):
    return a if layout == "NHWC" else a.transpose(0, 3, 1, 2)


def _weight_from_nhwc(w, layout):
    return w if layout == "NHWC" else w.transpose(3, 2, 0, 1)


def _padded(x, padding):
    (top, bottom), (left, right) = padding
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def reference_forward(x, w, bias, stride, padding, dilation, groups, layout):
    x, w = _to_nhwc(np.asarray(x, np.float64), np.asarray(w, np.float64), layout)
    n, h, wd, c_in, kh, kw, cin_g, c_out, oh, ow = _geometry(
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


def reference_input_grad(w, grad_out, input_shape, stride, padding, dilation,
                         groups, layout):
    go, w = _to_nhwc(np.asarray(grad_out, np.float64),
                     np.asarray(w, np.float64), layout)
    n, h, wd, c_in, kh, kw, cin_g, c_out, oh, ow = _geometry(
        input_shape, _weight_from_nhwc(w, layout).shape, stride, padding,
        dilation, layout)
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


def reference_weight_grad(x, grad_out, weight_shape, stride, padding, dilation,
                          groups, layout):
    x, _ = _to_nhwc(np.asarray(x, np.float64), np.empty((0,) * 4), layout)
    go = np.asarray(grad_out, np.float64)
    go = go if layout == "NHWC" else go.transpose(0, 2, 3, 1)
    n, h, wd, c_in, kh, kw, cin_g, c_out, oh, ow = _geometry(
        _from_nhwc(x, layout).shape, weight_shape, stride, padding, dilation,
        layout)
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
    return _weight_from_nhwc(grad_w, layout)


# ---- cases -------------------------------------------------------------------


class Case:
    """One convolution: shapes in NHWC terms, parameters normalised as
    cupyconv.convolution hands them to the launch code."""

    def __init__(self, n, h, w, c_in, c_out, kernel, stride=(1, 1),
                 padding=((0, 0), (0, 0)), dilation=(1, 1), groups=1,
                 layout="NHWC", dtype=np.float32, bias=True):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.dtype = np.dtype(dtype)

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
        return _geometry(self.x_shape, self.w_shape, self.stride, self.padding,
                         self.dilation, self.layout)[-2:]

    @property
    def y_shape(self):
        oh, ow = self.out_hw
        if self.layout == "NHWC":
            return (self.n, oh, ow, self.c_out)
        return (self.n, self.c_out, oh, ow)

    def params(self):
        return self.stride, self.padding, self.dilation, self.groups, self.layout

    @property
    def geom(self):
        """The ConvGeometry cupyconv.convolution hands to the launch code."""
        return conv_geometry.conv2d_geometry(self.x_shape, self.w_shape, *self.params())

    def arrays(self, seed=0):
        rng = np.random.default_rng(seed)

        def draw(shape):
            return rng.uniform(-1, 1, shape).astype(self.dtype)

        bias = draw((self.c_out,)) if self.bias else None
        return draw(self.x_shape), draw(self.w_shape), bias, draw(self.y_shape)

    def __repr__(self):
        return (f"{self.layout} {self.dtype.name} x{self.x_shape} w{self.w_shape} "
                f"s{self.stride} p{self.padding} d{self.dilation} g{self.groups}")


# Sizes avoid multiples of the 64 x 64 x 16 tiles; between them the cases
# cover every dtype in every kernel, both layouts, rectangular kernels,
# strides up to 5, dilation, asymmetric padding, groups and depthwise.
KERNEL_CASES = [
    # 67 output pixels and 65 output channels: two tiles each way, ragged.
    Case(1, 9, 8, 3, 65, (5, 3), stride=(1, 1), padding=((2, 1), (1, 0)),
         dtype=np.float32),
    Case(2, 5, 21, 4, 3, (1, 9), stride=(1, 3), padding=((0, 3), (4, 4)),
         dilation=(1, 2), layout="NCHW", dtype=np.float64),
    Case(2, 13, 7, 4, 6, (7, 1), stride=(3, 2), padding=((3, 0), (0, 2)),
         dilation=(2, 1), groups=2, dtype=np.float16),
    # Depthwise with channel multiplier 2.
    Case(2, 6, 5, 5, 10, (3, 3), padding=((1, 1), (1, 1)), groups=5,
         layout="NCHW", dtype=np.float32),
    # The kernel covers the whole padded input: one output pixel.
    Case(1, 4, 3, 2, 1, (6, 5), padding=((1, 1), (1, 1)), dtype=np.float64,
         bias=False),
    # Stride 5 over a 2x2 kernel: input rows 2-4, 7-9, 12 and columns 2-4,
    # 7-10 are never read.
    Case(2, 13, 11, 3, 2, (2, 2), stride=(5, 5), layout="NCHW",
         dtype=np.float16),
    # 1x1 kernel at stride 2 is not a matrix product.
    Case(1, 7, 7, 3, 4, (1, 1), stride=(2, 2), dtype=np.float32, bias=False),
]


def _tolerance(dtype):
    return {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype.type]


def assert_close(actual, expected, dtype):
    """Relative to the largest reference magnitude: float16 results are
    rounded once from a float32 sum."""
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    np.testing.assert_allclose(actual.astype(np.float64), expected,
                               rtol=0, atol=_tolerance(dtype) * scale)


def run_case(case, x, w, bias, grad_out):
    """The three launch functions on one case, each against the reference."""
    params = case.params()
    y = conv_cuda.forward(x, w, bias, case.geom)
    assert_close(y, reference_forward(x, w, bias, *params), case.dtype)
    grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
    assert_close(grad_x, reference_input_grad(w, grad_out, x.shape, *params),
                 case.dtype)
    grad_w = conv_cuda.weight_grad(x, grad_out, case.geom)
    assert_close(grad_w, reference_weight_grad(x, grad_out, w.shape, *params),
                 case.dtype)
    return y, grad_x, grad_w


# ---- the reference itself ------------------------------------------------------


@pytest.mark.parametrize("case", [
    Case(2, 9, 8, 4, 6, (5, 3), stride=(2, 1), padding=((2, 2), (1, 1)),
         dilation=(1, 2), groups=2, layout="NCHW", dtype=np.float64),
    Case(1, 7, 6, 3, 3, (2, 3), stride=(3, 2), padding=((1, 1), (0, 0)),
         groups=3, layout="NCHW", dtype=np.float64),
], ids=repr)
def test_reference_matches_torch(case):
    """The loops above agree with PyTorch (symmetric padding, NCHW)."""
    torch = pytest.importorskip("torch")
    x, w, bias, grad_out = case.arrays()
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    y = torch.nn.functional.conv2d(
        xt, wt, torch.tensor(bias), stride=case.stride,
        padding=(case.padding[0][0], case.padding[1][0]),
        dilation=case.dilation, groups=case.groups)
    y.backward(torch.tensor(grad_out))
    params = case.params()
    np.testing.assert_allclose(reference_forward(x, w, bias, *params),
                               y.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(
        reference_input_grad(w, grad_out, x.shape, *params),
        xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(
        reference_weight_grad(x, grad_out, w.shape, *params),
        wt.grad.numpy(), atol=1e-12)


# ---- kernels on the CPU executor -----------------------------------------------


#: The two input-gradient routes, chosen by channels per group.
INPUT_GRAD_ROUTES = {"gemm": 0, "taps": 2**62}


@pytest.fixture(params=sorted(INPUT_GRAD_ROUTES))
def input_grad_route(request, monkeypatch):
    """Every case through the implicit GEMM and through the taps (a matrix
    product and the gather kernel)."""
    monkeypatch.setattr(conv_cuda, "_BY_TAPS_CHANNELS", INPUT_GRAD_ROUTES[request.param])
    return request.param


@pytest.mark.parametrize("case", KERNEL_CASES, ids=repr)
def test_kernels_match_reference(cpu_kernels, input_grad_route, case):
    run_case(case, *case.arrays())


def test_input_grad_by_taps_is_chosen_for_few_channels(cpu_kernels, monkeypatch):
    launched = []
    real = _kernels.get_function
    monkeypatch.setattr(_kernels, "get_function",
                        lambda family, name: launched.append(name) or real(family, name))
    for c_in, kernel in ((4, "cupyconv::convolution::convolution_input_grad_gather<float>"),
                         (5, "cupyconv::convolution::convolution_input_grad_igemm<float>")):
        case = Case(1, 6, 5, c_in, 3, (3, 3), padding=((1, 1), (1, 1)), dtype=np.float32)
        _, w, _, grad_out = case.arrays()
        launched.clear()
        grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
        assert launched == [kernel]
        assert_close(grad_x, reference_input_grad(w, grad_out, case.x_shape, *case.params()),
                     case.dtype)


@pytest.mark.parametrize("images_per_part", [1, 2])
def test_input_grad_by_taps_in_parts(cpu_kernels, monkeypatch, images_per_part):
    """A batch whose tap contributions exceed the workspace goes through in
    parts, one gather launch each (five images in parts of two leave a last
    part of one)."""
    launches = []
    real = _kernels.get_function

    def counting(family, name):
        function = real(family, name)
        return lambda *args, **kwargs: launches.append(name) or function(*args, **kwargs)

    monkeypatch.setattr(_kernels, "get_function", counting)
    for case in (Case(5, 7, 6, 2, 3, (2, 2), stride=(2, 1), padding=((1, 0), (0, 1)),
                      dtype=np.float32),
                 Case(5, 6, 5, 4, 6, (3, 1), padding=((1, 1), (0, 0)), groups=2,
                      layout="NCHW", dtype=np.float16)):
        (oh, ow), (kh, kw) = case.out_hw, case.kernel
        per_image = oh * ow * kh * kw * case.c_in * 4  # float32 contributions
        monkeypatch.setattr(conv_cuda, "_BY_TAPS_WORKSPACE_BYTES",
                            images_per_part * per_image)
        _, w, _, grad_out = case.arrays()
        launches.clear()
        grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
        assert len(launches) == -(-case.n // images_per_part)
        assert_close(grad_x, reference_input_grad(w, grad_out, case.x_shape, *case.params()),
                     case.dtype)


def test_unread_input_pixels_get_zero_gradient(cpu_kernels, input_grad_route):
    case = KERNEL_CASES[5]
    x, w, bias, grad_out = case.arrays()
    grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
    for unread in (np.s_[:, :, 2:5], np.s_[:, :, 7:10], np.s_[:, :, 12:],
                   np.s_[:, :, :, 2:5], np.s_[:, :, :, 7:]):
        assert np.all(grad_x[unread] == 0)
    assert np.all(grad_x[:, :, :2, :2] != 0)


def test_weight_grad_split_reduction(cpu_kernels):
    """A reduction long enough to be cut into several partial sums."""
    case = Case(3, 9, 8, 2, 3, (3, 3), padding=((1, 0), (0, 1)),
                dtype=np.float32)
    oh, ow = case.out_hw
    splits, _ = conv_cuda._weight_grad_splits(
        9 * case.c_in, case.c_out, 1, case.n * oh * ow)
    assert splits > 1
    x, _, _, grad_out = case.arrays()
    grad_w = conv_cuda.weight_grad(x, grad_out, case.geom)
    assert_close(grad_w, reference_weight_grad(x, grad_out, case.w_shape,
                                               *case.params()), case.dtype)


def test_non_contiguous_inputs(cpu_kernels, input_grad_route):
    """Strided and reversed views are read in place, in either layout."""
    for case in (
        Case(2, 5, 6, 3, 4, (3, 2), stride=(2, 1), padding=((1, 2), (0, 1)),
             dtype=np.float32),
        Case(1, 6, 5, 4, 2, (2, 3), dilation=(2, 1), groups=2, layout="NCHW",
             dtype=np.float64),
    ):
        x, w, bias, grad_out = case.arrays()
        # Every second channel of a wider array, batch reversed.
        channel = 3 if case.layout == "NHWC" else 1
        wide = np.zeros(x.shape[:channel] + (2 * case.c_in,) + x.shape[channel + 1:],
                        x.dtype)
        x_view = wide[(slice(None, None, -1),) + (slice(None),) * (channel - 1)
                      + (slice(None, None, 2),)]
        x_view[...] = x
        w_view = np.asfortranarray(w)
        bias_view = np.repeat(bias, 3)[::3]
        go_view = np.swapaxes(np.swapaxes(grad_out, 1, 2).copy(), 1, 2)
        assert not any(a.flags.c_contiguous
                       for a in (x_view, w_view, bias_view, go_view))
        outputs = run_case(case, x_view, w_view, bias_view, go_view)
        for a in outputs:
            assert a.flags.c_contiguous


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pointwise_matrix_product(layout, dtype):
    """1x1, stride 1, no padding, one group: the xp.matmul path."""
    case = Case(2, 3, 5, 4, 3, (1, 1), dilation=(3, 2), layout=layout,
                dtype=dtype)
    run_case(case, *case.arrays())


def test_empty_sizes(cpu_kernels):
    """No batch, no input channels or no output channels: empty results, or
    an empty reduction (bias alone, zero gradients)."""
    for n, c_in, c_out in ((0, 2, 3), (2, 0, 3), (2, 2, 0)):
        case = Case(n, 4, 5, c_in, c_out, (3, 2), padding=((1, 0), (0, 1)),
                    layout="NCHW", dtype=np.float32)
        run_case(case, *case.arrays())


# ---- the public functions route NumPy arrays to the kernels ---------------------


def _conv2d_launches():
    return sum(count for (source, _), count in cpu_cuda.LAUNCHED.items()
               if source == "convolution.cu")


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_public_functions_use_kernels(cpu_kernels, layout):
    """Inside ``cpu_kernels`` the public functions launch the kernels; they
    agree with the NumPy path and with the reference."""
    case = Case(2, 7, 6, 4, 6, (3, 2), stride=(2, 1), padding=((1, 1), (0, 1)),
                dilation=(1, 2), groups=2, layout=layout, dtype=np.float32)
    x, w, bias, grad_out = case.arrays()
    options = dict(stride=case.stride, padding=case.padding,
                   dilation=case.dilation, groups=case.groups, layout=layout)

    def public():
        return (cupyconv.conv2d(x, w, bias, **options),
                cupyconv.conv2d_input(x.shape, w, grad_out, **options),
                cupyconv.conv2d_weight(x, w.shape, grad_out, **options))

    launched = _conv2d_launches()
    on_kernels = public()
    assert _conv2d_launches() == launched + 4
    with cpu_cuda.numpy_path():
        on_numpy = public()
    params = case.params()
    expected = (reference_forward(x, w, bias, *params),
                reference_input_grad(w, grad_out, x.shape, *params),
                reference_weight_grad(x, grad_out, w.shape, *params))
    for actual, numpy_result, reference in zip(on_kernels, on_numpy, expected):
        assert_close(actual, reference, case.dtype)
        assert_close(numpy_result, reference, case.dtype)


@pytest.mark.parametrize("stride", [(2**61, 1), (1, 2**61)])
def test_a_stride_longer_than_the_input(cpu_kernels, stride):
    """A stride far beyond the input (one output along that axis) runs in
    the kernels' 64-bit index math and matches a stride of the padded size."""
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 3)).astype(np.float32)
    w = np.random.default_rng(2).standard_normal((3, 2, 3, 4)).astype(np.float32)
    short = tuple(min(s, size) for s, size in zip(stride, (8, 7)))  # padded 8 x 7

    def all_three(step):
        y = cupyconv.conv2d(x, w, stride=step, padding=1)
        g = np.ones_like(y)
        return (y, cupyconv.conv2d_input(x.shape, w, g, stride=step, padding=1),
                cupyconv.conv2d_weight(x, w.shape, g, stride=step, padding=1))

    for huge, fits in zip(all_three(stride), all_three(short)):
        np.testing.assert_array_equal(huge, fits)


def test_grid_too_large_is_a_value_error():
    with pytest.raises(ValueError, match="thread blocks"):
        conv_cuda._launch_gemm("convolution_forward_igemm", np.dtype(np.float32),
                               2**40, 64, 1, 1, ())


# ---- GPU: CuPy against the NumPy path at realistic sizes ------------------------

GPU_CASES = [
    # The seed network's two convolution layers.
    Case(128, 32, 15, 1, 64, (5, 3), padding=((2, 2), (1, 1)), dtype=np.float32),
    Case(128, 16, 15, 64, 128, (5, 3), padding=((2, 2), (1, 1)),
         dtype=np.float32),
    Case(128, 16, 15, 64, 128, (5, 3), padding=((2, 2), (1, 1)),
         layout="NCHW", dtype=np.float16),
    # A ResNet-style 3x3 layer.
    Case(32, 56, 56, 64, 64, (3, 3), padding=((1, 1), (1, 1)), layout="NCHW",
         dtype=np.float32),
    Case(8, 28, 28, 64, 128, (3, 3), stride=(2, 2), padding=((1, 0), (1, 0)),
         dilation=(1, 2), groups=4, dtype=np.float32),
    Case(32, 28, 28, 96, 96, (3, 3), padding=((1, 1), (1, 1)), groups=96,
         dtype=np.float32),
    # 1x1: cuBLAS.
    Case(32, 28, 28, 64, 128, (1, 1), layout="NCHW", dtype=np.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=repr)
def test_gpu_matches_numpy_path(gpu, case):
    cupy = gpu
    x, w, bias, grad_out = case.arrays()
    options = dict(stride=case.stride, padding=case.padding,
                   dilation=case.dilation, groups=case.groups,
                   layout=case.layout)
    xg, wg, bg, gog = (cupy.asarray(a) for a in (x, w, bias, grad_out))
    on_gpu = (cupyconv.conv2d(xg, wg, bg, **options),
              cupyconv.conv2d_input(x.shape, wg, gog, **options),
              cupyconv.conv2d_weight(xg, w.shape, gog, **options))
    on_numpy = (cupyconv.conv2d(x, w, bias, **options),
                cupyconv.conv2d_input(x.shape, w, grad_out, **options),
                cupyconv.conv2d_weight(x, w.shape, grad_out, **options))
    tolerance = 2e-3 if case.dtype == np.float16 else 1e-4
    for actual, expected in zip(on_gpu, on_numpy):
        assert isinstance(actual, cupy.ndarray)
        expected = expected.astype(np.float64)
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(actual.get().astype(np.float64), expected,
                                   rtol=0, atol=tolerance * scale)
    # Split-K sums in a fixed order: the same bits every time.
    again = cupyconv.conv2d_weight(xg, w.shape, gog, **options)
    assert bool(cupy.array_equal(again, on_gpu[2]))
