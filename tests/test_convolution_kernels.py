"""The conv2d kernels (cuda/convolution.cu through cupyconv/convolution/_cuda.py)
against the float64 reference that loops over kernel taps (reference.py).

On this machine the kernels run on NumPy buffers through the CPU executor
(fixture ``cpu_kernels``); shapes stay small because every CUDA thread is a
fiber there.  The ``gpu`` tests run the same launch code on CuPy arrays at
realistic sizes.
"""

import numpy as np
import pytest

import cupyconv
import cpu_cuda
import reference
from cupyconv import _kernels
from cupyconv.convolution import _cuda as conv_cuda
from reference import ConvCase

# Sizes avoid multiples of the 64 x 64 x 16 tiles; between them the cases
# cover every dtype in every kernel, both layouts, rectangular kernels,
# strides up to 5, dilation, asymmetric padding, groups and depthwise.
KERNEL_CASES = [
    # 67 output pixels and 65 output channels: two tiles each way, ragged.
    ConvCase(1, 9, 8, 3, 65, (5, 3), stride=(1, 1), padding=((2, 1), (1, 0)),
             dtype=np.float32),
    ConvCase(2, 5, 21, 4, 3, (1, 9), stride=(1, 3), padding=((0, 3), (4, 4)),
             dilation=(1, 2), layout="NCHW", dtype=np.float64),
    ConvCase(2, 13, 7, 4, 6, (7, 1), stride=(3, 2), padding=((3, 0), (0, 2)),
             dilation=(2, 1), groups=2, dtype=np.float16),
    # Depthwise with channel multiplier 2.
    ConvCase(2, 6, 5, 5, 10, (3, 3), padding=((1, 1), (1, 1)), groups=5,
             layout="NCHW", dtype=np.float32),
    # The kernel covers the whole padded input: one output pixel.
    ConvCase(1, 4, 3, 2, 1, (6, 5), padding=((1, 1), (1, 1)), dtype=np.float64,
             bias=False),
    # Stride 5 over a 2x2 kernel: input rows 2-4, 7-9, 12 and columns 2-4,
    # 7-10 are never read.
    ConvCase(2, 13, 11, 3, 2, (2, 2), stride=(5, 5), layout="NCHW",
             dtype=np.float16),
    # 1x1 kernel at stride 2 is not a matrix product.
    ConvCase(1, 7, 7, 3, 4, (1, 1), stride=(2, 2), dtype=np.float32, bias=False),
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
    assert_close(y, reference.conv2d(x, w, bias, *params), case.dtype)
    grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
    assert_close(grad_x, reference.conv2d_input(w, grad_out, x.shape, *params),
                 case.dtype)
    grad_w = conv_cuda.weight_grad(x, grad_out, case.geom)
    assert_close(grad_w, reference.conv2d_weight(x, grad_out, w.shape, *params),
                 case.dtype)
    return y, grad_x, grad_w


# ---- the reference itself ------------------------------------------------------


@pytest.mark.parametrize("case", [
    ConvCase(2, 9, 8, 4, 6, (5, 3), stride=(2, 1), padding=((2, 2), (1, 1)),
             dilation=(1, 2), groups=2, layout="NCHW", dtype=np.float64),
    ConvCase(1, 7, 6, 3, 3, (2, 3), stride=(3, 2), padding=((1, 1), (0, 0)),
             groups=3, layout="NCHW", dtype=np.float64),
], ids=repr)
def test_reference_matches_torch(case):
    """The reference's loops agree with PyTorch (symmetric padding, NCHW)."""
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
    np.testing.assert_allclose(reference.conv2d(x, w, bias, *params),
                               y.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(
        reference.conv2d_input(w, grad_out, x.shape, *params),
        xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(
        reference.conv2d_weight(x, grad_out, w.shape, *params),
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
        case = ConvCase(1, 6, 5, c_in, 3, (3, 3), padding=((1, 1), (1, 1)), dtype=np.float32)
        _, w, _, grad_out = case.arrays()
        launched.clear()
        grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
        assert launched == [kernel]
        assert_close(grad_x, reference.conv2d_input(w, grad_out, case.x_shape, *case.params()),
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
    for case in (ConvCase(5, 7, 6, 2, 3, (2, 2), stride=(2, 1), padding=((1, 0), (0, 1)),
                          dtype=np.float32),
                 ConvCase(5, 6, 5, 4, 6, (3, 1), padding=((1, 1), (0, 0)), groups=2,
                          layout="NCHW", dtype=np.float16)):
        (oh, ow), (kh, kw) = case.out_hw, case.kernel
        per_image = oh * ow * kh * kw * case.c_in * 4  # float32 contributions
        monkeypatch.setattr(conv_cuda, "_BY_TAPS_WORKSPACE_BYTES",
                            images_per_part * per_image)
        _, w, _, grad_out = case.arrays()
        launches.clear()
        grad_x = conv_cuda.input_grad(w, grad_out, case.geom)
        assert len(launches) == -(-case.n // images_per_part)
        assert_close(grad_x, reference.conv2d_input(w, grad_out, case.x_shape, *case.params()),
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
    case = ConvCase(3, 9, 8, 2, 3, (3, 3), padding=((1, 0), (0, 1)),
                    dtype=np.float32)
    oh, ow = case.out_hw
    splits, _ = conv_cuda._weight_grad_splits(
        9 * case.c_in, case.c_out, 1, case.n * oh * ow)
    assert splits > 1
    x, _, _, grad_out = case.arrays()
    grad_w = conv_cuda.weight_grad(x, grad_out, case.geom)
    assert_close(grad_w, reference.conv2d_weight(x, grad_out, case.w_shape,
                                               *case.params()), case.dtype)


def test_non_contiguous_inputs(cpu_kernels, input_grad_route):
    """Strided and reversed views are read in place, in either layout."""
    for case in (
        ConvCase(2, 5, 6, 3, 4, (3, 2), stride=(2, 1), padding=((1, 2), (0, 1)),
                 dtype=np.float32),
        ConvCase(1, 6, 5, 4, 2, (2, 3), dilation=(2, 1), groups=2, layout="NCHW",
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
    case = ConvCase(2, 3, 5, 4, 3, (1, 1), dilation=(3, 2), layout=layout,
                    dtype=dtype)
    run_case(case, *case.arrays())


def test_empty_sizes(cpu_kernels):
    """No batch, no input channels or no output channels: empty results, or
    an empty reduction (bias alone, zero gradients)."""
    for n, c_in, c_out in ((0, 2, 3), (2, 0, 3), (2, 2, 0)):
        case = ConvCase(n, 4, 5, c_in, c_out, (3, 2), padding=((1, 0), (0, 1)),
                        layout="NCHW", dtype=np.float32)
        run_case(case, *case.arrays())


# ---- the public functions route NumPy arrays to the kernels ---------------------


def _conv2d_launches():
    return sum(count for (source, _), count in cpu_cuda.LAUNCHED.items()
               if source == "convolution.cu")


@pytest.mark.paths("cpu_kernels")
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_public_functions_use_kernels(path, layout):
    """On the kernels' path the public functions launch the kernels; they
    agree with the NumPy path and with the reference."""
    case = ConvCase(2, 7, 6, 4, 6, (3, 2), stride=(2, 1), padding=((1, 1), (0, 1)),
                    dilation=(1, 2), groups=2, layout=layout, dtype=np.float32)
    x, w, bias, grad_out = case.arrays()
    options = case.kwargs()

    def public():
        return (cupyconv.conv2d(x, w, bias, **options),
                cupyconv.conv2d_input(x.shape, w, grad_out, **options),
                cupyconv.conv2d_weight(x, w.shape, grad_out, **options))

    launched = _conv2d_launches()
    on_kernels = public()
    assert _conv2d_launches() == launched + 4
    on_numpy = path.on_numpy(public)
    for actual, numpy_result, expected in zip(on_kernels, on_numpy,
                                              case.expected(x, w, bias, grad_out)):
        assert_close(actual, expected, case.dtype)
        assert_close(numpy_result, expected, case.dtype)


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
        conv_cuda.GemmPlan.of("convolution_forward_igemm", ConvCase(1, 4, 4, 1, 1, (1, 1)).geom,
                              np.dtype(np.float32), 2**40, 64)


# ---- the 128 x 128 pipelined float32 kernels ------------------------------------

#: Forced onto the *_igemm128 kernels (thresholds patched): more than 128
#: rows and columns somewhere so that ragged second tiles occur, reductions
#: longer than the 3-stage ring and not a multiple of its 8-deep slices.
LARGE_TILE_CASES = [
    # 153 output pixels x 131 output channels: 2 x 2 ragged tiles; 5x3 taps
    # over 3 channels, padded unevenly.
    ConvCase(1, 9, 17, 3, 131, (5, 3), padding=((2, 1), (1, 0)), dtype=np.float32),
    # NCHW, groups, stride, dilation: 130 input pixels in the input gradient
    # and 2 x 3 x 9 = 54 taps (a row of the weight gradient) per group.
    ConvCase(2, 13, 5, 18, 10, (2, 3), stride=(2, 1), padding=((1, 0), (2, 2)),
             dilation=(2, 1), groups=2, layout="NCHW", dtype=np.float32),
    # Stride 3 skips input rows; 1x1 kernel with stride: not a matrix product.
    ConvCase(3, 10, 9, 5, 7, (1, 1), stride=(3, 2), dtype=np.float32, bias=False),
    # NHWC with channels per group a multiple of 4: the weights (forward),
    # x and grad_out (weight gradient) are copied in 16-byte runs of 4 rows.
    ConvCase(1, 9, 17, 8, 136, (3, 3), stride=(1, 2), padding=((1, 1), (1, 1)),
             dilation=(2, 1), groups=2, dtype=np.float32),
]


@pytest.fixture
def large_tiles(monkeypatch):
    """Every float32 implicit GEMM on the *_igemm128 kernels; yields
    {GEMM kernel launched: its arguments}."""
    monkeypatch.setattr(conv_cuda, "_LARGE_TILE_BLOCKS", 1)
    monkeypatch.setattr(conv_cuda, "_LARGE_TILE_MIN_SIDE", 1)
    launched = {}
    launch = _kernels.launch

    def recording(family, kernel, template_args, grid, args, **kwargs):
        if "igemm" in kernel:
            launched[kernel] = args
        return launch(family, kernel, template_args, grid, args, **kwargs)
    monkeypatch.setattr(_kernels, "launch", recording)
    return launched


def assert_within_roundoff(actual, x, w, bias, grad_out, case, op, reduction):
    """|actual - exact| <= 2 K u sum |a||b| per element (K the reduction
    length, u = 2**-24): the float32 summation bound, from the float64
    reference on the operands and on their magnitudes."""
    params = case.params()
    if op == "forward":
        exact = reference.conv2d(x, w, bias, *params)
        size = reference.conv2d(np.abs(x), np.abs(w), None if bias is None else np.abs(bias),
                                *params)
    elif op == "input":
        exact = reference.conv2d_input(w, grad_out, x.shape, *params)
        size = reference.conv2d_input(np.abs(w), np.abs(grad_out), x.shape, *params)
    else:
        exact = reference.conv2d_weight(x, grad_out, w.shape, *params)
        size = reference.conv2d_weight(np.abs(x), np.abs(grad_out), w.shape, *params)
    assert actual.dtype == np.float32 and actual.shape == exact.shape
    error = np.abs(actual.astype(np.float64) - exact)
    bound = 2 * reduction * 2.0**-24 * size + 1e-30
    assert np.all(error <= bound), (op, float(np.max(error / bound)))


@pytest.mark.parametrize("case", LARGE_TILE_CASES)
def test_large_tile_kernels_match_reference(cpu_kernels, large_tiles, case):
    x, w, bias, grad_out = case.arrays(seed=7)
    geom, (kh, kw) = case.geom, case.kernel
    cin_g, cout_g = case.c_in // case.groups, case.c_out // case.groups
    y = conv_cuda.forward(x, w, bias, geom)
    assert_within_roundoff(y, x, w, bias, grad_out, case, "forward", kh * kw * cin_g + 1)
    grad_x = conv_cuda.input_grad(w, grad_out, geom)
    assert_within_roundoff(grad_x, x, w, bias, grad_out, case, "input", kh * kw * cout_g)
    grad_w = conv_cuda.weight_grad(x, grad_out, geom)
    pixels = case.n * int(np.prod(case.out_hw))
    assert_within_roundoff(grad_w, x, w, bias, grad_out, case, "weight", pixels)
    expected = {"convolution_forward_igemm128", "convolution_weight_grad_igemm128"}
    if cin_g > conv_cuda._BY_TAPS_CHANNELS:
        expected.add("convolution_input_grad_igemm128")
    assert set(large_tiles) == expected
    # The loaders' LoadOrder arguments: runs of 4 rows (2) exactly where the
    # operand's rows are contiguous channels, a multiple of 4 per group.
    chunks = case.layout == "NHWC" and cout_g % 4 == 0 and cin_g % 4 == 0
    assert (large_tiles["convolution_forward_igemm128"][-2] == 2) == chunks
    orders = list(large_tiles["convolution_weight_grad_igemm128"][-2:])
    assert orders == [2, 2] if chunks else 2 not in orders


def test_large_tile_kernels_read_views(cpu_kernels, large_tiles):
    """Strided views of x, w and grad_out (every other element along an
    axis, a negative channel stride) give the contiguous copies' results
    bit for bit: the loaders address through the strides."""
    case = ConvCase(2, 9, 8, 10, 12, (3, 2), stride=(1, 2), padding=((1, 1), (0, 1)),
                    groups=2, layout="NHWC", dtype=np.float32, bias=False)
    x, w, _, grad_out = case.arrays(seed=3)
    x_view = np.repeat(x, 2, axis=2)[:, :, ::2]
    w_view = np.flip(np.ascontiguousarray(np.flip(w, 3)), 3)
    go_view = np.repeat(grad_out, 2, axis=1)[:, ::2]
    assert not (x_view.flags.c_contiguous or w_view.flags.c_contiguous
                or go_view.flags.c_contiguous)
    geom = case.geom
    np.testing.assert_array_equal(conv_cuda.forward(x_view, w_view, None, geom),
                                  conv_cuda.forward(x, w, None, geom))
    np.testing.assert_array_equal(conv_cuda.input_grad(w_view, go_view, geom),
                                  conv_cuda.input_grad(w, grad_out, geom))
    np.testing.assert_array_equal(conv_cuda.weight_grad(x_view, go_view, geom),
                                  conv_cuda.weight_grad(x, grad_out, geom))
    assert set(large_tiles) == {"convolution_forward_igemm128",
                                "convolution_input_grad_igemm128",
                                "convolution_weight_grad_igemm128"}


def test_large_tile_plan():
    """float32 products with enough 128 x 128 tiles take them; small
    outputs, narrow ones and other dtypes keep the 64 x 64 kernels."""
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    # The seed's second layer forward: 128*16*15 pixels x 128 channels.
    assert conv_cuda.plan(f32, 128 * 16 * 15, 128, 1, 1) == 128
    assert conv_cuda.plan(f64, 128 * 16 * 15, 128, 1, 1) == 64
    assert conv_cuda.plan(np.dtype(np.float16), 128 * 16 * 15, 128, 1, 1) == 64
    assert conv_cuda.plan(f32, 4 * 16 * 15, 128, 1, 1) == 64   # 8 tiles
    assert conv_cuda.plan(f32, 128 * 16 * 15, 64, 1, 1) == 64  # half-empty tiles
    # A weight gradient: one 128 x 128 tile of taps x channels, many splits.
    assert conv_cuda.plan(f32, 3 * 3 * 128, 128, 1, 256) == 128
    assert conv_cuda.plan(f32, 3 * 3 * 128, 128, 1, 8) == 64


# ---- GPU: CuPy against the NumPy path at realistic sizes ------------------------

GPU_CASES = [
    # The seed network's two convolution layers.
    ConvCase(128, 32, 15, 1, 64, (5, 3), padding=((2, 2), (1, 1)), dtype=np.float32),
    ConvCase(128, 16, 15, 64, 128, (5, 3), padding=((2, 2), (1, 1)),
             dtype=np.float32),
    ConvCase(128, 16, 15, 64, 128, (5, 3), padding=((2, 2), (1, 1)),
             layout="NCHW", dtype=np.float16),
    # A ResNet-style 3x3 layer.
    ConvCase(32, 56, 56, 64, 64, (3, 3), padding=((1, 1), (1, 1)), layout="NCHW",
             dtype=np.float32),
    ConvCase(8, 28, 28, 64, 128, (3, 3), stride=(2, 2), padding=((1, 0), (1, 0)),
             dilation=(1, 2), groups=4, dtype=np.float32),
    ConvCase(32, 28, 28, 96, 96, (3, 3), padding=((1, 1), (1, 1)), groups=96,
             dtype=np.float32),
    # 1x1: cuBLAS.
    ConvCase(32, 28, 28, 64, 128, (1, 1), layout="NCHW", dtype=np.float16),
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


@pytest.mark.gpu
@pytest.mark.paths("gpu")
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("case", [reference.CONV_CASES[i] for i in (0, 3, 5, 6, 8, 9, 11, 12, 14)],
                         ids=repr)
def test_gpu_matches_numpy(path, case, layout, dtype):
    cupy = path.xp
    case = case.replace(layout=layout, dtype=dtype)
    xl, wl, bias, gl = case.arrays()
    kwargs = case.kwargs()
    on_gpu = [cupy.asarray(a) for a in (xl, wl, bias, gl)]
    results = (cupyconv.conv2d(*on_gpu[:3], **kwargs),
               cupyconv.conv2d_input(xl.shape, on_gpu[1], on_gpu[3], **kwargs),
               cupyconv.conv2d_weight(on_gpu[0], wl.shape, on_gpu[3], **kwargs))
    expected = (cupyconv.conv2d(xl, wl, bias, **kwargs),
                cupyconv.conv2d_input(xl.shape, wl, gl, **kwargs),
                cupyconv.conv2d_weight(xl, wl.shape, gl, **kwargs))
    tolerance = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for result, exact in zip(results, expected):
        assert isinstance(result, cupy.ndarray) and result.dtype == dtype
        assert result.shape == exact.shape
        scale = max(1.0, float(np.abs(exact.astype(np.float64)).max()))
        np.testing.assert_allclose(cupy.asnumpy(result).astype(np.float64),
                                   exact.astype(np.float64), rtol=0,
                                   atol=tolerance * scale)


@pytest.mark.gpu
@pytest.mark.paths("gpu")
def test_gpu_non_contiguous_and_seed_layer(path):
    cupy = path.xp
    case = ConvCase(8, 16, 15, 64, 128, (5, 3), padding=(2, 1), dtype=np.float32)
    x, w, bias, grad_out = case.arrays()
    kwargs = case.kwargs()
    xs = cupy.asarray(np.asfortranarray(x))
    results = (cupyconv.conv2d(xs, cupy.asarray(w), cupy.asarray(bias), **kwargs),
               cupyconv.conv2d_input(x.shape, cupy.asarray(w), cupy.asarray(grad_out)[..., ::1], **kwargs),
               cupyconv.conv2d_weight(xs, w.shape, cupy.asarray(grad_out), **kwargs))
    expected = (cupyconv.conv2d(x, w, bias, **kwargs),
                cupyconv.conv2d_input(x.shape, w, grad_out, **kwargs),
                cupyconv.conv2d_weight(x, w.shape, grad_out, **kwargs))
    for result, exact in zip(results, expected):
        scale = float(np.abs(exact).max())
        np.testing.assert_allclose(cupy.asnumpy(result), exact, rtol=0, atol=1e-5 * scale)
