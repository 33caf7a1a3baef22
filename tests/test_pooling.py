"""max_pool2d / max_pool2d_backward on the NumPy path (with and without
numba) against the float64 loop reference and PyTorch.

The pick rule under test everywhere: a window picks its first maximum in
row-major window order; a NaN beats every number, and of several NaNs the
last wins, as in PyTorch; padding is never picked.
"""

import itertools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import cupyconv as cc
import reference
from cupyconv.pooling import _cpu as pool_cpu, _fused, _geometry as pool_geometry
from reference import nchw_to as to_layout, to_nchw as from_layout

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES

CONFIGS, KINDS = reference.POOL_CONFIGS, reference.POOL_INPUT_KINDS

# The NumPy path, without and with numba's loops (the kernels' paths are
# in test_pooling_kernels.py).
pytestmark = pytest.mark.paths("numpy", "numba")


def pool_fn(x_nchw, layout, config, **kw):
    """max_pool2d of NCHW data run in ``layout``; results back in NCHW."""
    kernel_size, stride, padding, dilation, ceil_mode, _ = config
    result = cc.max_pool2d(to_layout(x_nchw, layout), kernel_size, stride, padding,
                           dilation, ceil_mode=ceil_mode, layout=layout, **kw)
    if kw.get("return_indices"):
        return tuple(from_layout(r, layout) for r in result)
    return from_layout(result, layout)


def pool_grad(grad_nchw, x_nchw, layout, config, indices=None):
    kernel_size, stride, padding, dilation, ceil_mode, _ = config
    if indices is not None:
        indices = to_layout(indices, layout)
    grad = cc.max_pool2d_backward(
        to_layout(grad_nchw, layout), to_layout(x_nchw, layout), kernel_size, stride,
        padding, dilation, ceil_mode=ceil_mode, layout=layout, indices=indices)
    return from_layout(grad, layout)


# ---- NumPy path against the reference -------------------------------------------

@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config, kind, layout, path):
    rng = np.random.default_rng([CONFIGS.index(config), KINDS.index(kind)])
    x = reference.pool_input(rng, (2, 3) + config[-1], np.float64, kind)
    want, want_at = reference.max_pool2d(x, *config[:5])
    out, at = pool_fn(x, layout, config, return_indices=True)
    assert out.dtype == x.dtype and at.dtype == np.int64
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(at, want_at)
    # The values are the picked elements themselves.
    np.testing.assert_array_equal(
        np.take_along_axis(x.reshape(2, 3, -1), at.reshape(2, 3, -1), axis=2),
        out.reshape(2, 3, -1))
    grad_out = rng.standard_normal(out.shape)
    grad = pool_grad(grad_out, x, layout, config)
    np.testing.assert_allclose(grad, reference.max_pool2d_backward(x, grad_out, want_at), rtol=1e-12)
    np.testing.assert_array_equal(pool_grad(grad_out, x, layout, config, indices=at), grad)
    np.testing.assert_array_equal(pool_fn(x, layout, config), out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[6], CONFIGS[7]])
def test_dtypes_match_reference(config, dtype, path):
    rng = np.random.default_rng(7)
    for kind in ("random", "ties"):
        x = reference.pool_input(rng, (2, 2) + config[-1], dtype, kind)
        want, want_at = reference.max_pool2d(x, *config[:5])
        for layout in ("NHWC", "NCHW"):
            out, at = pool_fn(x, layout, config, return_indices=True)
            assert out.dtype == dtype
            np.testing.assert_array_equal(out, want)
            np.testing.assert_array_equal(at, want_at)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[5], CONFIGS[8]])
def test_gradient_dtypes(config, dtype, path):
    rng = np.random.default_rng(3)
    x = reference.pool_input(rng, (2, 2) + config[-1], dtype, "ties")
    _, at = reference.max_pool2d(x, *config[:5])
    grad_out = rng.integers(-8, 8, size=at.shape).astype(dtype) / 4
    for layout in ("NHWC", "NCHW"):
        grad = pool_grad(grad_out, x, layout, config)
        assert grad.dtype == dtype
        # Small dyadic gradients sum exactly in every float dtype.
        np.testing.assert_array_equal(grad, reference.max_pool2d_backward(x, grad_out, at))


@pytest.mark.paths("numpy")  # the blocks are NumPy's
@pytest.mark.parametrize("in_place_row_bytes", [None, 0])
@pytest.mark.parametrize("block_bytes", [48, 480, 1500])
def test_2x1_in_blocks(monkeypatch, block_bytes, in_place_row_bytes, path):
    """The 2x1 path split into blocks (runs of row pairs of one image, or a
    few whole images) shared among threads gives the same results; at 480
    bytes NHWC runs of 3 pairs leave a last run of 1 (of 4), which with
    ceil_mode must not take in the odd last row.  The backward runs on these
    short rows both through buffers and in place (threshold 0; NCHW rows
    shorter than NumPy's smallest buffer)."""
    monkeypatch.setattr(pool_cpu, "_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(pool_cpu, "_IN_PLACE_BLOCK_BYTES", block_bytes)
    if in_place_row_bytes is not None:
        monkeypatch.setattr(pool_cpu, "_IN_PLACE_ROW_BYTES", in_place_row_bytes)
    rng = np.random.default_rng(block_bytes)
    x = reference.pool_input(rng, (5, 4, 9, 5), np.float32, "nan")
    pool = pool_geometry.pool_geometry(to_layout(x, "NHWC").shape, (2, 1), None, 0, 1, False,
                                      "NHWC")
    assert len(pool_cpu._pair_blocks(pool, 4)) > 2
    assert len(pool_cpu._pair_blocks(pool, 4, pool_cpu._in_place_block_bytes(pool, 4))) > 2
    for ceil_mode in (False, True):
        config = ((2, 1), None, 0, 1, ceil_mode, None)
        want, want_at = reference.max_pool2d(x, *config[:5])
        grad_out = rng.standard_normal(want.shape).astype(np.float32)
        want_grad = reference.max_pool2d_backward(x, grad_out, want_at)
        for layout in ("NHWC", "NCHW"):
            out, at = pool_fn(x, layout, config, return_indices=True)
            np.testing.assert_array_equal(out, want)
            np.testing.assert_array_equal(at, want_at)
            np.testing.assert_array_equal(pool_fn(x, layout, config), want)
            for indices in (None, at):
                np.testing.assert_array_equal(
                    pool_grad(grad_out, x, layout, config, indices), want_grad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout, shape", [("NHWC", (2, 128, 5, 4)),
                                           ("NCHW", (1, 3, 5, 512))])
def test_2x1_backward_in_place_rows(monkeypatch, layout, shape, dtype, path):
    """Rows long enough (as the seed model's 15x64 NHWC ones) for the 2x1
    forward to read them and the backward to write them in place (the
    forward's values checked too): ties, NaNs, odd H with and without
    ceil_mode, one block or runs of one window row, picks recomputed or
    given (some outside their window).  Each window's gradient (NaN, inf,
    -0.0 included) lands bit for bit on its pick, everything else is +0."""
    shape_in = to_layout(np.empty(shape), layout).shape
    pool = pool_geometry.pool_geometry(shape_in, (2, 1), None, 0, 1, False, layout)
    itemsize = np.dtype(dtype).itemsize
    assert pool.rows()[1] * itemsize >= pool_cpu._IN_PLACE_ROW_BYTES
    rng = np.random.default_rng(list(shape) + [itemsize])
    x = reference.pool_input(rng, shape, dtype, "nan")
    n, c, h, w = shape
    for ceil_mode, block_bytes in itertools.product(
            (False, True), (None, 3 * pool.rows()[1] * itemsize)):
        if block_bytes:  # runs of one window row
            monkeypatch.setattr(pool_cpu, "_BLOCK_BYTES", block_bytes)
            monkeypatch.setattr(pool_cpu, "_IN_PLACE_BLOCK_BYTES", block_bytes)
        config = ((2, 1), None, 0, 1, ceil_mode, None)
        want_out, at = reference.max_pool2d(x, *config[:5])
        np.testing.assert_array_equal(pool_fn(x, layout, config), want_out)
        grad_out = rng.standard_normal(at.shape).astype(dtype)
        grad_out.flat[rng.choice(grad_out.size, 12, replace=False)] = (
            [np.nan, np.inf, -np.inf, -0.0] * 3)
        # Every other window's index moved to the next column: outside it.
        bogus = at.copy()
        bogus[..., ::2, 0] += 1
        for indices in (None, at, bogus):
            kept = (at if indices is None else indices) == at
            want = np.zeros((n, c, h * w), dtype)
            want[(*np.nonzero(kept)[:2], at[kept])] = grad_out[kept]
            grad = pool_grad(grad_out, x, layout, config, indices)
            bits = np.dtype(f"u{itemsize}")
            np.testing.assert_array_equal(grad.view(bits), want.reshape(shape).view(bits))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_2x1_backward_fused_in_window_ranges(monkeypatch, layout, dtype):
    """The fused loops, their windows split into uneven ranges among three
    threads (inputs of 1 MiB or more), give NumPy's result bit for bit:
    ties, NaNs, an odd H with and without ceil_mode, picks recomputed or
    given (some outside their window)."""
    pytest.importorskip("numba")
    monkeypatch.setattr(pool_cpu._parallel, "CPUS", 3)
    rng = np.random.default_rng(list(layout.encode()) + [np.dtype(dtype).itemsize])
    shape = (3, 8, 45, 257)  # NCHW, 1.1 MB in float32
    x = reference.pool_input(rng, shape, dtype, "nan")
    pool = pool_geometry.pool_geometry(x.shape, (2, 1), None, 0, 1, False, "NCHW")
    assert len(pool_cpu._parallel.ranges(pool.n * pool.c * (pool.h // 2), x.nbytes)) == 3
    for ceil_mode in (False, True):
        config = ((2, 1), None, 0, 1, ceil_mode, None)
        _, at = pool_fn(x, layout, config, return_indices=True)
        grad_out = rng.standard_normal(at.shape).astype(dtype)
        grad_out.flat[::97] = np.inf
        bogus = at.copy()
        bogus[..., ::3, 1::2] -= 1
        for indices in (None, at, bogus):
            assert _fused.pool_loops(np.dtype(dtype)) is not None
            fused = pool_grad(grad_out, x, layout, config, indices)
            with _fused.numpy_only():
                plain = pool_grad(grad_out, x, layout, config, indices)
            bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
            np.testing.assert_array_equal(fused.view(bits), plain.view(bits))


@pytest.mark.parametrize("by", ["pixels", "elements"])
def test_fused_loops_of_any_window_match_numpy(monkeypatch, by):
    """Each loop of the general window, a pixel at a time (vectorised along
    C) or an element at a time, forced whatever C is, gives NumPy's result
    bit for bit: every config and kind of input, both layouts, float32,
    float64 and int32, picks recomputed or given (some outside their
    window, some outside the image)."""
    pytest.importorskip("numba")
    threshold = 1 if by == "pixels" else 2**62
    monkeypatch.setattr(pool_cpu, "_FUSED_FORWARD_PIXELS", threshold)
    monkeypatch.setattr(pool_cpu, "_FUSED_BACKWARD_PIXELS", threshold)
    rng = np.random.default_rng(len(by))
    for config, kind, layout, dtype in itertools.product(
            CONFIGS, KINDS, ("NHWC", "NCHW"), (np.float32, np.float64, np.int32)):
        if dtype == np.int32 and kind in ("nan", "-inf"):
            continue
        x = reference.pool_input(rng, (2, 5) + config[-1], dtype, kind)
        out, at = pool_fn(x, layout, config, return_indices=True)
        with _fused.numpy_only():
            want_out, want_at = pool_fn(x, layout, config, return_indices=True)
        bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
        np.testing.assert_array_equal(out.view(bits), want_out.view(bits))
        np.testing.assert_array_equal(at, want_at)
        if dtype == np.int32:
            continue
        grad_out = rng.standard_normal(at.shape).astype(dtype)
        grad_out.flat[::7] = np.inf
        bogus = at.copy()
        bogus.flat[::3] += 1
        bogus.flat[1::5] = -1
        bogus.flat[2::11] = math.prod(config[-1])  # one past the image
        for indices in (None, at, bogus):
            grad = pool_grad(grad_out, x, layout, config, indices)
            with _fused.numpy_only():
                want = pool_grad(grad_out, x, layout, config, indices)
            np.testing.assert_array_equal(grad.view(bits), want.view(bits))


@pytest.mark.skipif(os.environ.get("NUMBA_BOUNDSCHECK") == "1",
                    reason="this is the bounds-checked run")
def test_fused_loops_stay_in_bounds(tmp_path):
    """The tests of the fused loops pass again with numba checking every
    index (an IndexError where a loop would read or write out of bounds),
    the loops compiled afresh into an empty cache."""
    pytest.importorskip("numba")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cc.__file__)))
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-k", "fused or numba", __file__]
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(__file__), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-8000:]}"
    assert re.search(r"\d+ passed", result.stdout), output[-8000:]


def test_fused_loops_are_optional(monkeypatch):
    """Without numba (an optional dependency) the NumPy code runs, and
    backend_info says so; float16 never takes the loops."""
    assert _fused.pool_loops(np.dtype(np.float16)) is None
    x = reference.pool_input(np.random.default_rng(4), (2, 3, 6, 5), np.float32, "nan")
    g = np.arange(2 * 3 * 3 * 5, dtype=np.float32).reshape(2, 3, 3, 5)
    want = cc.max_pool2d_backward(g, x, (2, 1), layout="NCHW")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba fails
    _fused._numba.cache_clear()
    _fused._compiled.cache_clear()
    try:
        assert _fused.pool_loops(np.dtype(np.float32)) is None
        assert cc.backend_info()["numba"] == "not installed"
        np.testing.assert_array_equal(
            cc.max_pool2d_backward(g, x, (2, 1), layout="NCHW"), want)
    finally:  # the next call imports numba again, if it is installed
        _fused._numba.cache_clear()
        _fused._compiled.cache_clear()


def test_fused_loops_without_a_cache_directory(monkeypatch):
    """numba refuses ``cache=True`` where it finds no directory to write
    to; the loops are then compiled without a cache, and still run."""
    numba = pytest.importorskip("numba")
    njit, asked = numba.njit, []

    def njit_without_cache_dir(**options):
        asked.append(options.get("cache", False))
        if options.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return njit(**options)

    monkeypatch.setattr(numba, "njit", njit_without_cache_dir)
    _fused._compiled.cache_clear()
    try:
        loops = _fused.pool_loops(np.dtype(np.float64))
        assert loops is not None and asked == [True, False]
        x = np.array([1.0, 3.0, np.nan, 2.0]).reshape(1, 2, 2, 1)
        grad = cc.max_pool2d_backward(np.array([5.0, 7.0]).reshape(1, 1, 2, 1), x, (2, 1))
        np.testing.assert_array_equal(grad.ravel(), [0, 7, 5, 0])
    finally:
        _fused._compiled.cache_clear()


def test_ties_pick_the_first_and_nans_the_last(path):
    x = np.array([[1.0, 5.0, 5.0, 2.0],
                  [5.0, 0.0, np.nan, np.nan],
                  [-np.inf, -np.inf, 7.0, np.nan]]).reshape(1, 1, 3, 4)
    out, at = cc.max_pool2d(x, (1, 4), layout="NCHW", return_indices=True)
    np.testing.assert_array_equal(out.ravel(), [5.0, np.nan, np.nan])
    np.testing.assert_array_equal(at.ravel(), [1, 7, 11])
    grad = cc.max_pool2d_backward(np.ones((1, 1, 3, 1)), x, (1, 4), layout="NCHW")
    np.testing.assert_array_equal(grad.reshape(3, 4), [[0, 1, 0, 0],
                                                        [0, 0, 0, 1],
                                                        [0, 0, 0, 1]])
    # 2x1: equal rows -> the top row; a NaN in either row wins, the bottom
    # one if both are NaN.
    x = np.array([[4.0, 1.0, np.nan, 2.0, -np.inf, np.nan],
                  [4.0, 3.0, 1.0, np.nan, -np.inf, np.nan]]).reshape(1, 2, 6, 1)
    out, at = cc.max_pool2d(x, (2, 1), return_indices=True)
    np.testing.assert_array_equal(out.ravel(), [4.0, 3.0, np.nan, np.nan, -np.inf, np.nan])
    np.testing.assert_array_equal(at.ravel(), [0, 7, 2, 9, 4, 11])
    for indices in (None, at):
        grad = cc.max_pool2d_backward(np.full((1, 1, 6, 1), 2.0), x, (2, 1),
                                      indices=indices)
        np.testing.assert_array_equal(grad.reshape(2, 6), [[2, 0, 2, 0, 2, 0],
                                                            [0, 2, 0, 2, 0, 2]])


def test_padding_is_never_picked(path):
    """-inf and integer minima inside the image beat the implicit padding."""
    x = np.full((1, 1, 3, 3), -np.inf)
    _, at = cc.max_pool2d(x, 3, stride=1, padding=1, layout="NCHW", return_indices=True)
    np.testing.assert_array_equal(at[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])
    x = np.full((1, 2, 2, 1), np.iinfo(np.int32).min, np.int32)
    out, at = cc.max_pool2d(x, 3, stride=1, padding=1, return_indices=True)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(at.ravel(), [0, 0, 0, 0])


def test_gradient_reaches_nan_and_inf_exactly(path):
    """Picked gradients are copied bit for bit, unpicked elements get +0."""
    x = np.array([1.0, 2.0, 3.0, 0.0, 5.0, 5.0]).reshape(1, 6, 1, 1)
    g = np.array([np.inf, np.nan, -0.0]).reshape(1, 3, 1, 1)
    for indices in (None, cc.max_pool2d(x, (2, 1), return_indices=True)[1]):
        grad = cc.max_pool2d_backward(g, x, (2, 1), indices=indices).ravel()
        # Picks: rows 1 (2 > 1), 2 (3 > 0) and 4 (5 == 5, the first).
        assert grad[1] == np.inf and np.isnan(grad[2]) and np.signbit(grad[4])
        assert all(v == 0 and not np.signbit(v) for v in grad[[0, 3, 5]])


def test_indices_outside_their_window_contribute_nothing(path):
    x = np.arange(8.0).reshape(1, 4, 2, 1)
    g = np.ones((1, 2, 2, 1))
    bogus = np.array([0, 1, 2, 3]).reshape(1, 2, 2, 1)  # second row of windows points up
    grad = cc.max_pool2d_backward(g, x, (2, 1), indices=bogus)
    np.testing.assert_array_equal(grad.ravel(), [1, 1, 0, 0, 0, 0, 0, 0])
    # Only the window of rows 3-4 (padding), column 1 holds element 7.
    grad = cc.max_pool2d_backward(np.ones((1, 3, 2, 1)), x, (2, 1), padding=(1, 0),
                                  indices=np.full((1, 3, 2, 1), 7))
    np.testing.assert_array_equal(grad.ravel(), [0] * 7 + [1])


def test_odd_layouts_of_the_input(path):
    """Non-contiguous views and non-native byte order give the same result."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 9, 6, 8))
    x = base[:, ::2, :, 1::2]  # (2, 5, 6, 4), strided
    want = cc.max_pool2d(np.ascontiguousarray(x), (2, 1), ceil_mode=True, return_indices=True)
    for view in (x, x.astype(">f8")):
        got = cc.max_pool2d(view, (2, 1), ceil_mode=True, return_indices=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert cc.max_pool2d(x, 3, 1, 1).flags.c_contiguous


def test_2x1_backward_of_read_only_and_broadcast_inputs(path):
    """Read-only arrays (numba compiles other variants for them) and
    broadcast views give the gradient of their contiguous copies."""
    rng = np.random.default_rng(8)
    x = np.broadcast_to(reference.pool_input(rng, (2, 6, 1, 3), np.float32, "nan"), (2, 6, 5, 3))
    g = rng.standard_normal((2, 3, 5, 3)).astype(np.float32)
    _, at = cc.max_pool2d(x, (2, 1), return_indices=True)
    want = cc.max_pool2d_backward(g, np.ascontiguousarray(x), (2, 1))
    for a in (g, at):
        a.setflags(write=False)
    for indices in (None, at):
        np.testing.assert_array_equal(cc.max_pool2d_backward(g, x, (2, 1), indices=indices), want)


def test_empty_batch_and_channels(path):
    out, at = cc.max_pool2d(np.zeros((0, 4, 4, 3)), 2, return_indices=True)
    assert out.shape == at.shape == (0, 2, 2, 3)
    out = cc.max_pool2d(np.zeros((2, 0, 5, 4), np.int8), (2, 1), layout="NCHW")
    assert out.shape == (2, 0, 2, 4)
    grad = cc.max_pool2d_backward(np.zeros((0, 2, 2, 3)), np.zeros((0, 4, 4, 3)), 2)
    assert grad.shape == (0, 4, 4, 3)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: cc.max_pool2d(x[0], 2), ValueError, "x must be 4-D"),
    (lambda x: cc.max_pool2d(x, 2, layout="HWC"), ValueError, "layout"),
    (lambda x: cc.max_pool2d(x, 0), ValueError, "kernel_size"),
    (lambda x: cc.max_pool2d(x, (2, -1)), ValueError, "kernel_size"),
    (lambda x: cc.max_pool2d(x, (2, 2, 2)), ValueError, "kernel_size"),
    (lambda x: cc.max_pool2d(x, 2.0), TypeError, "kernel_size"),
    (lambda x: cc.max_pool2d(x, 2, stride=0), ValueError, "stride"),
    (lambda x: cc.max_pool2d(x, 2, stride=(1, 1.5)), TypeError, r"stride\[1\]"),
    (lambda x: cc.max_pool2d(x, 2, padding=-1), ValueError, "padding"),
    (lambda x: cc.max_pool2d(x, 3, padding=2), ValueError, "padding must be at most"),
    (lambda x: cc.max_pool2d(x, (3, 1), padding=(1, 1)), ValueError, "padding must be at most"),
    (lambda x: cc.max_pool2d(x, 2, dilation=0), ValueError, "dilation"),
    (lambda x: cc.max_pool2d(x, (6, 1)), ValueError,
     r"kernel_size \(6, 1\) with dilation \(1, 1\) spans 6 rows, more than the 5 rows"),
    (lambda x: cc.max_pool2d(x, (1, 2), dilation=(1, 4)), ValueError,
     r"kernel_size \(1, 2\) with dilation \(1, 4\) spans 5 columns, more than the 4 columns"),
    (lambda x: cc.max_pool2d(x[:, :, :2], 2, stride=1, padding=1, dilation=3),
     ValueError, "dilation 3 along w leaves a window with no input"),
    (lambda x: cc.max_pool2d(x, 2, ceil_mode=1), TypeError, "ceil_mode"),
    (lambda x: cc.max_pool2d(x, 2, return_indices="yes"), TypeError, "return_indices"),
    (lambda x: cc.max_pool2d(x.astype(bool), 2), TypeError, "x must have a float or integer"),
    (lambda x: cc.max_pool2d(x.astype(complex), 2), TypeError, "x must have a float or integer"),
    (lambda x: cc.max_pool2d_backward(np.ones((2, 2, 1, 3)), x, 2), ValueError,
     r"grad_out must have the output's shape \(2, 2, 2, 3\)"),
    (lambda x: cc.max_pool2d_backward(np.ones(3), x, 2), ValueError, "grad_out must be 4-D"),
    (lambda x: cc.max_pool2d_backward(np.ones((2, 2, 2, 3), np.float32), x, 2), TypeError,
     "share one dtype"),
    (lambda x: cc.max_pool2d_backward(np.ones((2, 2, 2, 3), int), x.astype(int), 2),
     TypeError, "grad_out must be float16"),
    (lambda x: cc.max_pool2d_backward(np.ones((2, 2, 2, 3)), x, 2,
                                      indices=np.zeros((2, 2, 2, 3), np.int32)),
     TypeError, "indices must be int64"),
    (lambda x: cc.max_pool2d_backward(np.ones((2, 2, 2, 3)), x, 2,
                                      indices=np.zeros((2, 2, 3, 2), np.int64)),
     ValueError, "indices must have the output's shape"),
    (lambda x: cc.max_pool2d_backward(np.ones((2, 2, 2, 3)), x, 2, layout="NCWH"),
     ValueError, "layout"),
])
def test_bad_arguments(call, error, match):
    x = np.zeros((2, 5, 4, 3))  # NHWC
    with pytest.raises(error, match=match):
        call(x)


# ---- PyTorch ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_torch(config, layout, path):
    torch = pytest.importorskip("torch")
    kernel_size, stride, padding, dilation, ceil_mode, hw = config
    rng = np.random.default_rng(11)
    for kind, dtype in (("random", np.float32), ("ties", np.float64),
                        ("-inf", np.float32), ("ties", np.float16),
                        ("nan", np.float32), ("nan", np.float64)):
        x = reference.pool_input(rng, (2, 3) + hw, dtype, kind)
        t = torch.from_numpy(x).requires_grad_()
        want, want_at = torch.nn.functional.max_pool2d(
            t, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
            return_indices=True)
        out, at = pool_fn(x, layout, config, return_indices=True)
        np.testing.assert_array_equal(out, want.detach().numpy())
        np.testing.assert_array_equal(at, want_at.numpy())
        grad_out = rng.integers(-4, 5, size=out.shape).astype(dtype)
        want.backward(torch.from_numpy(grad_out))
        np.testing.assert_array_equal(pool_grad(grad_out, x, layout, config),
                                      t.grad.numpy())


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64])
def test_integers_match_torch(dtype, path):
    torch = pytest.importorskip("torch")
    x = reference.pool_input(np.random.default_rng(2), (2, 3, 7, 6), dtype, "random")
    for config in (CONFIGS[2], CONFIGS[5], CONFIGS[8]):
        kernel_size, stride, padding, dilation, ceil_mode, _ = config
        want, want_at = torch.nn.functional.max_pool2d(
            torch.from_numpy(x), kernel_size, stride, padding, dilation,
            ceil_mode=ceil_mode, return_indices=True)
        out, at = pool_fn(x, "NHWC", config, return_indices=True)
        np.testing.assert_array_equal(out, want.numpy())
        np.testing.assert_array_equal(at, want_at.numpy())


