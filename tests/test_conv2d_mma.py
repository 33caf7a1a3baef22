"""conv2d on tensor cores (cuda/convolution_mma.cu through
cupyconv/_conv2d_mma.py) on the CPU executor, against PyTorch in float64.

Each precision must stay within a bound derived from the reduction length
K and the format's unit roundoff (TF32 rounding 2**-11 per operand, float32
sums K * 2**-24, the output's own rounding: float16 2**-11, bfloat16 2**-8),
relative to sum |x| |w| over each output's window.  A wrong fragment index
or pipeline wait count gives errors of order one (or poison): far outside.
"""

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _conv2d_mma

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


def reference(x, w, bias, stride, padding, dilation, groups, layout):
    """conv2d in float64 through PyTorch (NCHW), with sum |x| |w| per output."""
    def nchw(a, weight=False):
        a = np.asarray(a, np.float64)
        if layout == "NHWC":
            a = a.transpose(3, 2, 0, 1) if weight else a.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(a))
    (top, bottom), (left, right) = padding
    xt = torch.nn.functional.pad(nchw(x), (left, right, top, bottom))
    wt = nchw(w, weight=True)

    def run(a, b):
        return torch.nn.functional.conv2d(a, b, stride=stride, dilation=dilation,
                                          groups=groups).numpy()
    y, size = run(xt, wt), run(xt.abs(), wt.abs())
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[:, None, None]
    if layout == "NHWC":
        y, size = y.transpose(0, 2, 3, 1), size.transpose(0, 2, 3, 1)
    return y, size


CASES = {
    # NHWC, 8 channels per group: 16-byte cp.async chunks of x.
    "nhwc_vector": dict(x=(2, 6, 7, 8), w=(3, 3, 8, 12), stride=(1, 1),
                        padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1, layout="NHWC"),
    # NCHW, odd channels, groups, stride, dilation, uneven padding: the
    # element-by-element loader.
    "nchw_general": dict(x=(2, 6, 9, 7), w=(10, 3, 2, 3), stride=(2, 1),
                         padding=((1, 0), (2, 1)), dilation=(1, 2), groups=2, layout="NCHW"),
}


def arrays(case, dtype, seed):
    rng = np.random.default_rng(seed)
    kh_kw_first = case["layout"] == "NHWC"
    x = rng.standard_normal(case["x"]).astype(dtype)
    w = rng.standard_normal(case["w"]).astype(dtype)
    c_out = case["w"][3] if kh_kw_first else case["w"][0]
    bias = rng.standard_normal(c_out).astype(dtype)
    return x, w, bias


def check(y, x, w, bias, case, mode):
    dtype, precision, per_product, out_rounding = MODES[mode]
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    exact, size = reference(x, w, bias, **kwargs)
    kh, kw = (case["w"][:2] if case["layout"] == "NHWC" else case["w"][2:])
    cin_g = case["w"][2] if case["layout"] == "NHWC" else case["w"][1]
    depth = kh * kw * cin_g
    sums = 3 * depth if mode == "3xtf32" else depth
    bound = ((per_product + (sums + 1) * U32) * (size + np.abs(np.asarray(bias, np.float64))
                                                  [(slice(None),) + ((None, None) if case["layout"] == "NCHW" else ())])
             + out_rounding * np.abs(exact))
    assert y.dtype == np.dtype(dtype)
    error = np.abs(y.astype(np.float64) - exact)
    assert np.isfinite(y.astype(np.float64)).all()
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert (error <= bound).all(), (f"{mode}: error {error[worst]:.3g} > bound {bound[worst]:.3g} "
                                    f"at {worst}")


def run(case, mode, seed=0, view=None):
    dtype, precision, _, _ = MODES[mode]
    x, w, bias = arrays(case, dtype, seed)
    if view is not None:
        x = view(x)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    y = cc.conv2d(x, w, bias, precision=precision, **kwargs)
    check(y, x, w, bias, case, mode)
    return y


@pytest.mark.parametrize("mode", sorted(MODES))
def test_small_tile_with_split_reduction(cpu_kernels, monkeypatch, mode):
    """64 x 64 tiles, the reduction cut into one pipeline stage per split
    and added in order by convolution_forward_mma_reduce."""
    monkeypatch.setattr(_conv2d_mma, "_MIN_SPLIT_TILES", 1)
    case = CASES["nhwc_vector"]
    assert _conv2d_mma.plan(2 * 6 * 7, 12, 1, 5)[:2] == (1, 5)
    run(case, mode)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_large_tile_general_loader(cpu_kernels, monkeypatch, mode):
    """128 x 128 tiles (forced), NCHW gathered element by element."""
    monkeypatch.setattr(_conv2d_mma, "_TARGET_BLOCKS", 1)
    run(CASES["nchw_general"], mode, seed=1)


@pytest.mark.parametrize("mode", ["tf32", "bfloat16"])
def test_strided_view_input(cpu_kernels, mode):
    """A view with odd strides: no 16-byte chunks, any stride works."""
    case = dict(CASES["nhwc_vector"], x=(2, 6, 7, 8))
    dtype = MODES[mode][0]
    rng = np.random.default_rng(2)
    big = rng.standard_normal((2, 12, 7, 9)).astype(dtype)
    run(case, mode, view=lambda x: big[:, ::2, :, 1:])


def test_tf32_matches_the_numpy_path(cpu_kernels):
    """The kernels and the NumPy path round the same operands the same way:
    they agree to float32 summation error, far below TF32's."""
    case = CASES["nhwc_vector"]
    x, w, bias = arrays(case, np.float32, 3)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "layout")}
    got = cc.conv2d(x, w, bias, precision="tf32", **kwargs)
    from cpu_cuda import numpy_path
    with numpy_path():
        expected = cc.conv2d(x, w, bias, precision="tf32", **kwargs)
        highest = cc.conv2d(x, w, bias, precision="highest", **kwargs)
    _, size = reference(x, w, bias, **kwargs)
    np.testing.assert_array_less(np.abs(got - expected), 80 * U32 * size)
    assert np.abs(expected - highest).max() > 100 * np.abs(got - expected).max()
