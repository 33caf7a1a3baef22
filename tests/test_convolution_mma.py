"""conv2d and both gradients on tensor cores (cuda/convolution_mma.cu
through cupyconv/convolution/_cuda_mma.py) on the CPU executor, against PyTorch in
float64.

Each precision must stay within a bound derived from the reduction length
K and the format's unit roundoff (TF32 rounding 2**-11 per operand, float32
sums K * 2**-24, the output's own rounding: float16 2**-11, bfloat16 2**-8),
relative to sum |x| |w| over each output's window.  A wrong fragment index
or pipeline wait count gives errors of order one (or poison): far outside.
"""

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _kernels
from cupyconv.convolution import _cuda_mma

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

U32 = 2.0**-24
#: mode -> (dtype, precision, relative error per product, output rounding).
MODES = {
    "tf32": (np.float32, "tf32", 2 * 2.0**-11, U32),
    "3xtf32": (np.float32, "3xtf32", 4 * 2.0**-22, U32),
    "float16": (np.float16, "highest", 0.0, 2.0**-11),
    "bfloat16": (ml_dtypes.bfloat16, "highest", 0.0, 2.0**-8),
}


def reference(x, w, bias, grad_out, stride, padding, dilation, groups, layout):
    """conv2d and both gradients in float64 through PyTorch (NCHW): {op:
    (exact, sum of |products|)} in ``layout``."""
    def nchw(a, weight=False):
        a = np.asarray(a, np.float64)
        if layout == "NHWC":
            a = a.transpose(3, 2, 0, 1) if weight else a.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(a))

    def back(a, weight=False):
        a = a.numpy()
        if layout == "NHWC":
            a = a.transpose(2, 3, 1, 0) if weight else a.transpose(0, 2, 3, 1)
        return a
    (top, bottom), (left, right) = padding
    kwargs = dict(stride=stride, dilation=dilation, groups=groups)

    def run(x, w, g):
        xt = torch.nn.functional.pad(x, (left, right, top, bottom))
        y = torch.nn.functional.conv2d(xt, w, **kwargs)
        gx = torch.nn.grad.conv2d_input(xt.shape, w, g, **kwargs)[
            :, :, top:top + x.shape[2], left:left + x.shape[3]]
        gw = torch.nn.grad.conv2d_weight(xt, w.shape, g, **kwargs)
        return back(y), back(gx), back(gw, weight=True)
    xt, wt, gt = nchw(x), nchw(w, weight=True), nchw(grad_out)
    exact, size = run(xt, wt, gt), run(xt.abs(), wt.abs(), gt.abs())
    if bias is not None:
        b = np.asarray(bias, np.float64)
        shift = b if layout == "NHWC" else b[:, None, None]
        exact = (exact[0] + shift,) + exact[1:]
        size = (size[0] + np.abs(shift),) + size[1:]
    return dict(zip(("forward", "input", "weight"), zip(exact, size)))


CASES = {
    # NHWC, 8 channels per group: 16-byte cp.async chunks of x.
    "nhwc_vector": dict(x=(2, 6, 7, 8), w=(3, 3, 8, 12), stride=(1, 1),
                        padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1, layout="NHWC"),
    # NCHW, odd channels, groups, stride, dilation, uneven padding: the
    # element-by-element loader.
    "nchw_general": dict(x=(2, 10, 9, 7), w=(10, 5, 2, 3), stride=(2, 1),
                         padding=((1, 0), (2, 1)), dilation=(1, 2), groups=2, layout="NCHW"),
}


def arrays(case, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["x"]).astype(dtype)
    w = rng.standard_normal(case["w"]).astype(dtype)
    c_out = case["w"][3] if case["layout"] == "NHWC" else case["w"][0]
    bias = rng.standard_normal(c_out).astype(dtype)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    from cpu_cuda import numpy_path
    with numpy_path():
        shape = cc.conv2d(x.astype(np.float32), w.astype(np.float32), **kwargs).shape
    grad_out = rng.standard_normal(shape).astype(dtype)
    return x, w, bias, grad_out


def reduction_lengths(case, out_shape):
    """K of each product: taps of the forward and the input gradient, output
    pixels of the weight gradient."""
    nhwc = case["layout"] == "NHWC"
    kh, kw = case["w"][:2] if nhwc else case["w"][2:]
    cin_g = case["w"][2] if nhwc else case["w"][1]
    cout_g = (case["w"][3] if nhwc else case["w"][0]) // case["groups"]
    pixels = out_shape[0] * (out_shape[1] * out_shape[2] if nhwc else out_shape[2] * out_shape[3])
    return {"forward": kh * kw * cin_g, "input": kh * kw * cout_g, "weight": pixels}


def check(results, x, w, bias, grad_out, case, mode):
    dtype, precision, per_product, out_rounding = MODES[mode]
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    expected = reference(x, w, bias, grad_out, **kwargs)
    lengths = reduction_lengths(case, grad_out.shape)
    for op, y in results.items():
        exact, size = expected[op]
        # float32 sums: K terms (3K for 3xTF32) plus the bias and the splits.
        sums = (3 if mode == "3xtf32" else 1) * lengths[op] + 1 + 16
        bound = (per_product + sums * U32) * size + out_rounding * np.abs(exact)
        assert y.dtype == np.dtype(dtype) and y.shape == exact.shape
        y = y.astype(np.float64)
        assert np.isfinite(y).all(), f"{mode} {op}: non-finite results"
        error = np.abs(y - exact)
        worst = np.unravel_index(np.argmax(error - bound), error.shape)
        assert (error <= bound).all(), (f"{mode} {op}: error {error[worst]:.3g} > bound "
                                        f"{bound[worst]:.3g} at {worst}")


def run(case, mode, seed=0, x_view=None, grad_view=None, ops=("forward", "input", "weight")):
    """Check ``ops`` of ``case`` in ``mode``, x and grad_out passed through
    the views given."""
    dtype, precision, _, _ = MODES[mode]
    x, w, bias, grad_out = arrays(case, dtype, seed)
    if x_view is not None:
        x = x_view(x)
    if grad_view is not None:
        grad_out = grad_view(grad_out)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    kwargs["precision"] = precision
    calls = {
        "forward": lambda: cc.conv2d(x, w, bias, **kwargs),
        "input": lambda: cc.conv2d_input(x.shape, w, grad_out, **kwargs),
        "weight": lambda: cc.conv2d_weight(x, w.shape, grad_out, **kwargs),
    }
    check({op: calls[op]() for op in ops}, x, w, bias, grad_out, case, mode)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_small_tile_with_split_reduction(cpu_kernels, monkeypatch, mode):
    """64 x 64 tiles, the reduction cut into one pipeline stage per split
    and added in order by convolution_split_sum_mma."""
    monkeypatch.setattr(_cuda_mma, "_MIN_SPLIT_TILES", 1)
    case = CASES["nhwc_vector"]
    assert _cuda_mma.plan(2 * 6 * 7, 12, 1, 5)[:2] == (1, 5)
    run(case, mode)
    assert _launched("convolution_split_sum_mma") > 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_large_tile_general_loader(cpu_kernels, monkeypatch, mode):
    """128 x 128 tiles (forced), NCHW gathered element by element."""
    monkeypatch.setattr(_cuda_mma, "_TARGET_BLOCKS", 1)
    run(CASES["nchw_general"], mode, seed=1)


@pytest.mark.parametrize("mode", ["tf32", "bfloat16"])
def test_strided_views(cpu_kernels, weight_grad_loaders, mode):
    """x and grad_out as views with odd strides and offsets: no 16-byte
    chunks, the element loaders read them in place."""
    def view(a):
        n, h, w, c = a.shape
        big = np.zeros((n, 2 * h, w, c + 1), a.dtype)
        big[:, ::2, :, 1:] = a
        return big[:, ::2, :, 1:]
    run(CASES["nhwc_vector"], mode, x_view=view, grad_view=view)
    assert weight_grad_loaders == [(0, 0)]


#: The weight gradient with 16-byte chunks of channels in both operands:
#: NHWC, 8 input and 72 output channels per group (so that a thread's
#: second chunk of rows holds data in either block tile), stride, dilation
#: and padding (whole chunks of taps fall in the padding), and N*OH*OW = 70
#: output pixels: a partial last stage of the reduction.
WEIGHT_GRAD_CASE = dict(x=(2, 9, 8, 16), w=(3, 3, 8, 144), stride=(2, 1),
                        padding=((2, 1), (1, 2)), dilation=(1, 2), groups=2, layout="NHWC")


@pytest.fixture
def weight_grad_loaders(monkeypatch):
    """The (vector_a, vector_b) arguments of each weight-gradient launch:
    which operands the kernel reads as 16-byte chunks."""
    flags = []
    launch = _kernels.launch

    def recording(family, kernel, template_args, grid, args, **kwargs):
        if kernel == "convolution_weight_grad_mma":
            flags.append(tuple(int(a) for a in args[-2:]))
        return launch(family, kernel, template_args, grid, args, **kwargs)
    monkeypatch.setattr(_kernels, "launch", recording)
    return flags


def misaligned(a):
    """``a`` as a view one element into a wider array: channels still
    contiguous, but neither the data nor the pixels 16-byte aligned."""
    big = np.zeros(a.shape[:3] + (a.shape[3] + 1,), a.dtype)
    big[..., 1:] = a
    return big[..., 1:]


@pytest.mark.parametrize("config", [0, 1])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_weight_grad_reads_chunks_of_channels(cpu_kernels, monkeypatch, weight_grad_loaders,
                                              mode, config):
    """Both operands of the weight gradient as 16-byte chunks of channels
    (RowChunkLoader), in the 128 x 128 (forced) and 64 x 64 tiles."""
    if config == 0:
        monkeypatch.setattr(_cuda_mma, "_TARGET_BLOCKS", 1)
    assert _cuda_mma.plan(3 * 3 * 8, 72, 2, 3)[0] == config
    run(WEIGHT_GRAD_CASE, mode, ops=("weight",))
    assert weight_grad_loaders == [(1, 1)]


@pytest.mark.parametrize("mode", ["tf32", "bfloat16"])
@pytest.mark.parametrize("aligned", ["x", "grad_out"])
def test_weight_grad_mixes_loaders(cpu_kernels, weight_grad_loaders, mode, aligned):
    """One operand a misaligned view: it is read element by element, the
    other still as 16-byte chunks."""
    run(WEIGHT_GRAD_CASE, mode, ops=("weight",),
        x_view=None if aligned == "x" else misaligned,
        grad_view=None if aligned == "grad_out" else misaligned)
    assert weight_grad_loaders == [(int(aligned == "x"), int(aligned == "grad_out"))]


@pytest.mark.parametrize("mode", ["3xtf32", "float16"])
def test_weight_grad_chunks_need_16_bytes_of_channels(cpu_kernels, weight_grad_loaders, mode):
    """12 input and 20 output channels: chunks of 4 float32 fit, chunks of
    8 float16 do not."""
    case = dict(CASES["nhwc_vector"], x=(2, 6, 5, 12), w=(3, 3, 12, 20))
    run(case, mode, ops=("weight",))
    chunks = int(mode == "3xtf32")
    assert weight_grad_loaders == [(chunks, chunks)]


def test_weight_grad_kernel_follows_the_flags(cpu_kernels, monkeypatch):
    """Told that misaligned operands fit, the kernel reads them with 16-byte
    loads (which the executor, like a GPU, refuses): the flags pick the
    loader."""
    from cpu_cuda import KernelLaunchError
    monkeypatch.setattr(_kernels, "chunks_fit", lambda a, strides, channels: True)
    case = WEIGHT_GRAD_CASE
    x, w, _, grad_out = arrays(case, np.float32, 0)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    with pytest.raises(KernelLaunchError, match="not aligned to 16 bytes"):
        cc.conv2d_weight(misaligned(x), w.shape, grad_out, precision="tf32", **kwargs)


def _launched(kernel):
    import cpu_cuda
    return sum(count for (source, name), count in cpu_cuda.LAUNCHED.items()
               if source == "convolution_mma.cu"
               and name.split("<", 1)[0].split("::")[-1].startswith(kernel))


def test_tf32_matches_the_numpy_path(cpu_kernels):
    """The kernels and the NumPy path round the same operands the same way:
    they agree to float32 summation error, far below TF32's."""
    case = CASES["nhwc_vector"]
    x, w, bias, grad_out = arrays(case, np.float32, 3)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    got = cc.conv2d(x, w, bias, precision="tf32", **kwargs)
    from cpu_cuda import numpy_path
    with numpy_path():
        expected = cc.conv2d(x, w, bias, precision="tf32", **kwargs)
        highest = cc.conv2d(x, w, bias, precision="highest", **kwargs)
    size = reference(x, w, bias, grad_out, **kwargs)["forward"][1]
    np.testing.assert_array_less(np.abs(got - expected), 80 * U32 * size)
    assert np.abs(expected - highest).max() > 100 * np.abs(got - expected).max()


@pytest.mark.parametrize("mode", ["tf32", "float16"])
def test_gpus_before_sm80_use_the_fma_kernels(cpu_kernels, monkeypatch, mode):
    """Without tensor cores (compute capability below 8.0) float16 and TF32
    run on the float32 FMA kernels, TF32 with its operands rounded first:
    the same results within the same bounds."""
    monkeypatch.setattr(_cuda_mma, "_tensor_cores", lambda device: False)
    before = _launched("convolution")
    run(CASES["nhwc_vector"], mode)
    run(CASES["nchw_general"], mode, seed=1)
    assert _launched("convolution") == before  # no tensor-core kernel ran


@pytest.mark.parametrize("mode", ["3xtf32", "float16"])
def test_first_layer_input_grad_goes_through_the_taps(cpu_kernels, mode):
    """With at most 4 input channels per group the input gradient is a
    matrix product and a gather (conv2d_input_grad_gather), in every mode."""
    case = dict(CASES["nhwc_vector"], x=(2, 9, 7, 3), w=(3, 3, 3, 8))
    before = _launched("convolution_input_grad")
    run(case, mode, ops=("input",))
    assert _launched("convolution_input_grad") == before


@pytest.mark.parametrize("mode", ["tf32", "float16"])
def test_empty_reductions_give_zeros_and_bias(cpu_kernels, mode):
    """No input channels, no images or no output channels: the reduction is
    empty and every output element is still written (bias or zero)."""
    dtype, precision = MODES[mode][:2]
    kwargs = dict(padding=1, precision=precision)
    x, w, b = np.ones((2, 5, 5, 0), dtype), np.ones((3, 3, 0, 4), dtype), np.arange(4, dtype=dtype)
    np.testing.assert_array_equal(cc.conv2d(x, w, b, **kwargs), np.broadcast_to(b, (2, 5, 5, 4)))
    x, g = np.ones((0, 5, 5, 8), dtype), np.ones((0, 5, 5, 4), dtype)
    np.testing.assert_array_equal(cc.conv2d_weight(x, (3, 3, 8, 4), g, **kwargs), 0)
    w, g = np.ones((3, 3, 8, 0), dtype), np.ones((2, 5, 5, 0), dtype)
    np.testing.assert_array_equal(cc.conv2d_input((2, 5, 5, 8), w, g, **kwargs), 0)
