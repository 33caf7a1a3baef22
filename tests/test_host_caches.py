"""The per-geometry caches that keep a small call's host time down
(docs/kernels.rst, "Host time of a small call") change nothing a user sees:
a repeated geometry gives the result of a fresh one, and a bad argument
after a good one raises the same error as it does alone."""

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _args
from cupyconv.convolution import _geometry as conv_geometry
from cupyconv.dilation import _geometry as dilation_geometry
from cupyconv.pooling import _geometry as pool_geometry

RNG = np.random.default_rng(5)
X = RNG.standard_normal((2, 7, 6, 4)).astype(np.float32)   # NHWC
W = RNG.standard_normal((3, 2, 2, 6)).astype(np.float32)   # HWIO, groups=2

BUILDERS = [conv_geometry.conv2d_geometry, pool_geometry.pool_geometry,
            dilation_geometry.dilate_geometry, dilation_geometry.undilate_geometry,
            _args.shape_arg]


def _clear_caches():
    for builder in BUILDERS:
        builder.cache_clear()


def _error(call):
    """``(type, message)`` of the error ``call`` raises."""
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return info.type, str(info.value)


def test_every_cache_is_bounded():
    for builder in BUILDERS:
        assert builder.cache_info().maxsize is not None, builder.__name__


def test_a_repeated_geometry_is_the_one_built_fresh():
    cases = [
        (conv_geometry.conv2d_geometry, ((2, 7, 6, 4), (3, 2, 2, 6), 2, "same", 1, 2, "NHWC")),
        (conv_geometry.conv2d_geometry, ((2, 4, 7, 6), (6, 2, 3, 2), (1, 2), ((1, 0), (2, 1)),
                                         (2, 1), 2, "NCHW")),
        (pool_geometry.pool_geometry, ((2, 7, 6, 4), (3, 2), None, (1, 0), 1, True, "NHWC")),
        (dilation_geometry.dilate_geometry, ((2, 3, 4), (0, -1), (1, 2), (4, 3, 12))),
        (dilation_geometry.undilate_geometry, ((2, 3, 4), -1, 2)),
    ]
    _clear_caches()
    for builder, args in cases:
        fresh = builder.__wrapped__(*args)
        assert builder(*args) == fresh
        assert builder(*args) == fresh  # from the cache now
    assert all(builder.cache_info().hits for builder, _ in cases)


def test_repeated_calls_give_the_results_of_uncached_ones():
    # Lists and NumPy integers are not cache keys: those calls build afresh.
    y = cc.conv2d(X, W, stride=(2, 1), padding=1, groups=2)
    g = RNG.standard_normal(y.shape).astype(np.float32)
    for stride, groups in (((2, 1), 2), ([2, 1], np.int64(2))):
        for _ in range(2):
            np.testing.assert_array_equal(
                cc.conv2d(X, W, stride=stride, padding=1, groups=groups), y)
            np.testing.assert_array_equal(
                cc.conv2d_input(X.shape, W, g, stride=stride, padding=1, groups=groups),
                cc.conv2d_input(list(X.shape), W, g, stride=[2, 1], padding=1, groups=2))
    out, at = cc.max_pool2d(X, 3, 1, 1, return_indices=True)
    for _ in range(2):
        again, at_again = cc.max_pool2d(X, 3, 1, 1, return_indices=True)
        np.testing.assert_array_equal(again, out)
        np.testing.assert_array_equal(at_again, at)
    np.testing.assert_array_equal(cc.dilate(X, (1, 2), 1), cc.dilate(X, [1, 2], [1, 1]))


BAD_AFTER_GOOD = [
    # (a good call, the same call with one argument bad)
    (lambda: cc.conv2d(X, W, stride=1, groups=2), lambda: cc.conv2d(X, W, stride=True, groups=2)),
    (lambda: cc.conv2d(X, W, stride=(1, 1), groups=2),
     lambda: cc.conv2d(X, W, stride=(1, True), groups=2)),
    (lambda: cc.conv2d(X, W, groups=2), lambda: cc.conv2d(X, W, groups=2.0)),
    (lambda: cc.conv2d(X, W, groups=2), lambda: cc.conv2d(X, W, groups=3)),
    (lambda: cc.conv2d(X, W, padding=1, groups=2), lambda: cc.conv2d(X, W, padding=-1, groups=2)),
    (lambda: cc.conv2d(X, W, groups=2), lambda: cc.conv2d(X, W, groups=2, layout="NWHC")),
    (lambda: cc.conv2d_input(X.shape, W, np.ones((2, 5, 5, 6), np.float32), groups=2),
     lambda: cc.conv2d_input((2, 7, 6, True), W, np.ones((2, 5, 5, 6), np.float32), groups=2)),
    (lambda: cc.conv2d_input(X.shape, W, np.ones((2, 5, 5, 6), np.float32), groups=2),
     lambda: cc.conv2d_input(X.shape, W, np.ones((2, 5, 4, 6), np.float32), groups=2)),
    (lambda: cc.max_pool2d(X, 2, ceil_mode=True), lambda: cc.max_pool2d(X, 2, ceil_mode=1)),
    (lambda: cc.max_pool2d(X, 3, 1, 1), lambda: cc.max_pool2d(X, 3, 1, 2)),
    (lambda: cc.max_pool2d(X, (2, 1)), lambda: cc.max_pool2d(X, (2, False))),
    (lambda: cc.dilate(X, 1, 1), lambda: cc.dilate(X, 1, -1)),
    (lambda: cc.dilate(X, 1, 1, shape=(2, 14, 6, 4)),
     lambda: cc.dilate(X, 1, 1, shape=(2, 12, 6, 4))),
    (lambda: cc.undilate(X, 1, 1), lambda: cc.undilate(X, 4, 1)),
]


@pytest.mark.parametrize("good, bad", BAD_AFTER_GOOD)
def test_a_bad_argument_after_a_good_one_raises_as_alone(good, bad):
    _clear_caches()
    alone = _error(bad)
    good()
    assert _error(bad) == alone
    good()
    assert _error(bad) == alone


def test_cache_keys_keep_bools_apart_from_ints():
    assert _args._is_key((1, (2, 3)))
    assert not _args._is_key((1, True))
    assert not _args._is_key([1, 1])
    assert not _args._is_key(np.int64(1))


# ---- launch plans (convolution/_cuda.py and _cuda_mma.py) ----------------------

def test_launch_plans_are_cached_and_follow_the_tunables(cpu_kernels, monkeypatch):
    """A repeated geometry reuses its launch plan; a changed tunable makes a
    new one (the tunables are part of the key), so patching one in a test
    or docs/tuning.py never meets a stale plan."""
    from cupyconv.convolution import _cuda

    x = RNG.standard_normal((2, 12, 12, 128)).astype(np.float32)
    w = RNG.standard_normal((3, 3, 128, 128)).astype(np.float32)
    _cuda._forward_plan.cache_clear()
    first = cc.conv2d(x, w, padding=1)
    np.testing.assert_array_equal(cc.conv2d(x, w, padding=1), first)
    info = _cuda._forward_plan.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    geom = conv_geometry.conv2d_geometry(x.shape, w.shape, 1, 1, 1, 1, "NHWC")
    assert _cuda._forward_plan(geom, x.dtype, _cuda._tuning()).tile == _cuda._TILE
    monkeypatch.setattr(_cuda, "_LARGE_TILE_BLOCKS", 1)
    assert _cuda._forward_plan(geom, x.dtype, _cuda._tuning()).tile == _cuda._LARGE_TILE
    np.testing.assert_allclose(cc.conv2d(x, w, padding=1), first, rtol=1e-5, atol=1e-4)


def test_tensor_core_plans_follow_the_tunables(monkeypatch):
    from cupyconv.convolution import _cuda_mma

    geom = conv_geometry.conv2d_geometry((16, 16, 16, 16), (3, 3, 16, 32), 1, 1, 1, 1, "NHWC")
    dtype = np.dtype(np.float16)
    before = _cuda_mma._weight_grad_plan(geom, dtype, "highest", _cuda_mma._tuning())
    monkeypatch.setattr(_cuda_mma, "_MAX_WEIGHT_GRAD_SPLITS", 1)
    after = _cuda_mma._weight_grad_plan(geom, dtype, "highest", _cuda_mma._tuning())
    assert before.partial_shape is not None and before.partial_shape[0] > 1
    assert after.partial_shape is None  # one split: no partial sums
    tf32 = _cuda_mma._forward_plan(geom, np.dtype(np.float32), "tf32", _cuda_mma._tuning())
    split3 = _cuda_mma._forward_plan(geom, np.dtype(np.float32), "3xtf32", _cuda_mma._tuning())
    assert tf32.template.startswith("float, false") and split3.template.startswith("float, true")
