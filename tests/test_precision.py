"""``precision=`` of conv2d, conv2d_input and conv2d_weight, its default
(function, context manager, ``python -m cupyconv``) and TF32 rounding, on
the NumPy path and through the kernels on the CPU executor."""

import concurrent.futures
import contextlib
import io

import numpy as np
import pytest

import cupyconv as cc
from cupyconv.convolution import _precision
from formats import tf32_reference

torch = pytest.importorskip("torch")


def special_floats():
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**19, 500, dtype=np.uint64).astype(np.uint32) << 13) | 0x1000
    edges = np.array([0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                      0x00000001, 0x00001000, 0x007FFFFF, 0x3F801000, 0xBF801000], np.uint32)
    return np.concatenate([bits, ties, edges]).view(np.float32)


def test_round_to_tf32_is_bit_exact():
    x = special_floats()
    got = _precision.round_to_tf32(x)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(got[finite].view(np.uint32),
                                  tf32_reference(x[finite]).view(np.uint32))
    assert np.isnan(got[np.isnan(x)]).all()
    np.testing.assert_array_equal(got[np.isinf(x)], x[np.isinf(x)])


CALLS = {
    "conv2d": lambda x, w, g, **kw: cc.conv2d(x, w, **kw),
    "conv2d_input": lambda x, w, g, **kw: cc.conv2d_input(x.shape, w, g, **kw),
    "conv2d_weight": lambda x, w, g, **kw: cc.conv2d_weight(x, w.shape, g, **kw),
}


def arrays(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 7, 6, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 5, 4)).astype(dtype)
    g = rng.standard_normal((2, 4, 4, 4)).astype(dtype)  # stride (2, 2), pad 1
    return x, w, g


KWARGS = dict(stride=2, padding=1)


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("bad", ["TF32", "fp32", "", 3, True])
def test_unknown_precision_is_a_value_error(name, bad):
    for dtype in (np.float32, np.float64):
        with pytest.raises(ValueError, match=r"precision must be one of 'highest', "
                                             r"'tf32', '3xtf32' or None, got"):
            CALLS[name](*arrays(dtype), precision=bad, **KWARGS)


def torch_products(x, w, g):
    """The three products of (x, w, g) in float64 through PyTorch, with the
    sums of absolute products (for error bounds)."""
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, np.float64))

    def run(x, w, g):
        xt, wt, gt = (t(x).permute(0, 3, 1, 2), t(w).permute(3, 2, 0, 1),
                      t(g).permute(0, 3, 1, 2))
        y = torch.nn.functional.conv2d(xt, wt, **KWARGS)
        gx = torch.nn.grad.conv2d_input(xt.shape, wt, gt, **KWARGS)
        gw = torch.nn.grad.conv2d_weight(xt, wt.shape, gt, **KWARGS)
        return (y.permute(0, 2, 3, 1).numpy(), gx.permute(0, 2, 3, 1).numpy(),
                gw.permute(2, 3, 1, 0).numpy())
    exact = dict(zip(sorted(CALLS), (run(x, w, g)[i] for i in (0, 1, 2))))
    size = dict(zip(sorted(CALLS), (run(abs(x), abs(w), abs(g))[i] for i in (0, 1, 2))))
    return exact, size


@pytest.mark.parametrize("name", sorted(CALLS))
def test_tf32_rounds_the_operands_on_the_numpy_path(name):
    x, w, g = arrays()
    got = CALLS[name](x, w, g, precision="tf32", **KWARGS)
    exact, size = torch_products(*(tf32_reference(a) for a in (x, w, g)))
    # Reductions here are at most 2*6*... < 100 long; float32 sums: n * 2**-24.
    np.testing.assert_array_less(np.abs(got - exact[name]), 100 * 2.0**-24 * size[name] + 1e-30)
    highest = CALLS[name](x, w, g, precision="highest", **KWARGS)
    # The rounding shows: TF32 is off by about 2**-11 relative, far above float32's.
    exact64, _ = torch_products(x, w, g)
    assert np.abs(got - exact64[name]).max() > 20 * np.abs(highest - exact64[name]).max()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_3xtf32_is_highest_on_the_numpy_path(name):
    x, w, g = arrays()
    np.testing.assert_array_equal(CALLS[name](x, w, g, precision="3xtf32", **KWARGS),
                                  CALLS[name](x, w, g, **KWARGS))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_precision_changes_float32_only(name, dtype):
    x, w, g = arrays(dtype)
    np.testing.assert_array_equal(CALLS[name](x, w, g, precision="tf32", **KWARGS),
                                  CALLS[name](x, w, g, **KWARGS))


def test_default_precision_function_and_context_manager():
    x, w, g = arrays()
    highest = cc.conv2d(x, w, precision="highest", **KWARGS)
    tf32 = cc.conv2d(x, w, precision="tf32", **KWARGS)
    assert cc.get_default_precision() == "highest"
    np.testing.assert_array_equal(cc.conv2d(x, w, **KWARGS), highest)
    with cc.default_precision("tf32"):
        assert cc.get_default_precision() == "tf32"
        np.testing.assert_array_equal(cc.conv2d(x, w, **KWARGS), tf32)
        # An explicit argument wins over the default.
        np.testing.assert_array_equal(cc.conv2d(x, w, precision="highest", **KWARGS), highest)
        with cc.default_precision("3xtf32"):
            assert cc.get_default_precision() == "3xtf32"
        assert cc.get_default_precision() == "tf32"
    assert cc.get_default_precision() == "highest"
    previous = cc.set_default_precision("tf32")
    try:
        assert previous == "highest"
        np.testing.assert_array_equal(cc.conv2d(x, w, **KWARGS), tf32)
        with cc.default_precision("highest"):
            np.testing.assert_array_equal(cc.conv2d(x, w, **KWARGS), highest)
    finally:
        cc.set_default_precision(previous)
    assert cc.get_default_precision() == "highest"


def test_context_manager_is_per_thread():
    with cc.default_precision("tf32"):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(cc.get_default_precision).result() == "highest"


@pytest.mark.parametrize("bad", ["TF32", None, 1])
def test_bad_default_is_a_value_error(bad):
    with pytest.raises(ValueError, match="default precision must be one of"):
        cc.set_default_precision(bad)
    with pytest.raises(ValueError, match="default precision must be one of"):
        with cc.default_precision(bad):
            pass
    assert cc.get_default_precision() == "highest"


def test_python_m_cupyconv_reports_the_default():
    from cupyconv import _selfcheck

    out = io.StringIO()
    with contextlib.redirect_stdout(out), cc.default_precision("3xtf32"):
        _selfcheck.report()
    assert "conv2d precision default: 3xtf32" in out.getvalue()


@pytest.mark.parametrize("precision", ["tf32", "3xtf32", "highest"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_kernels_follow_precision(cpu_kernels, name, precision):
    """On the CPU executor (the GPU code path): TF32 results agree with the
    float64 product of TF32-rounded operands to float32 summation error;
    3xtf32 and highest with the exact one to float32-level error."""
    x, w, g = arrays(seed=3)
    got = CALLS[name](x, w, g, precision=precision, **KWARGS)
    operands = (x, w, g) if precision != "tf32" else tuple(tf32_reference(a) for a in (x, w, g))
    exact, size = torch_products(*operands)
    # 3xtf32 drops small*small (2**-22 relative) and rounds the small parts.
    bound = (100 * 2.0**-24 + (2.0**-20 if precision == "3xtf32" else 0)) * size[name]
    np.testing.assert_array_less(np.abs(got - exact[name]), bound + 1e-30)
