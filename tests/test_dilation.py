"""dilate / undilate on the NumPy path against an element-by-element reference
(the kernel's path is in test_dilation_kernels.py)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import cupyconv as cc
import reference
from reference import small_integers as random_array

DTYPES = reference.DILATION_DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, axes, dilation",
    [
        ((2, 2), (1,), 1),
        ((3, 4, 5), (0, 2), (2, 1)),
        ((3, 4, 5), (-1, 0), (0, 3)),
        ((1, 7), (0, 1), 4),
        ((5,), 0, 0),
        ((2, 0, 3), (1, 2), (2, 2)),
        ((2, 1, 3, 2), (1, 2, 3), (1, 0, 2)),
    ],
)
def test_dilate_and_undilate_match_reference(dtype, shape, axes, dilation):
    rng = np.random.default_rng(0)
    a = random_array(rng, shape, dtype)
    norm_axes = tuple(ax % len(shape) for ax in np.atleast_1d(axes))
    norm_dil = (dilation,) * len(norm_axes) if np.isscalar(dilation) else dilation
    out = cc.dilate(a, axes, dilation)
    expected = reference.dilate(a, norm_axes, norm_dil)
    assert out.dtype == a.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    back = cc.undilate(out, axes, dilation)
    np.testing.assert_array_equal(back, a)
    np.testing.assert_array_equal(back, reference.undilate(out, norm_axes, norm_dil))


def test_issue_example():
    out = cc.dilate([[1, 2], [3, 4]], axes=(1,), dilation=1)
    np.testing.assert_array_equal(out, [[1, 0, 2, 0], [3, 0, 4, 0]])


@pytest.mark.parametrize(
    "make_view",
    [
        lambda a: a.T,
        lambda a: a[::-1, :, ::-2],
        lambda a: a[1:, ::2],
        lambda a: np.asfortranarray(a),
        lambda a: np.moveaxis(a, 0, 2)[:, ::-1],
    ],
    ids=["transposed", "reversed", "strided", "fortran", "moved-reversed"],
)
def test_non_contiguous_inputs(make_view):
    a = make_view(np.arange(4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6))
    before = a.copy()
    out = cc.dilate(a, (0, -1), (1, 2))
    np.testing.assert_array_equal(out, reference.dilate(a, (0, a.ndim - 1), (1, 2)))
    np.testing.assert_array_equal(a, before)  # the input is never modified
    und = cc.undilate(a, (0, 1), (2, 1))
    np.testing.assert_array_equal(und, reference.undilate(a, (0, 1), (2, 1)))
    assert und.flags.c_contiguous


@pytest.mark.parametrize("cpus", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.bool_, np.float16, np.int32, ">f8", np.complex128, object])
@pytest.mark.parametrize(
    "make_view",
    [lambda a: a, lambda a: a[..., ::2], lambda a: a[:, ::-1, :, ::-1],
     lambda a: np.moveaxis(a, 3, 1)],
    ids=["contiguous", "strided-last", "reversed", "moved"],
)
@pytest.mark.parametrize("axes, dilation", [((1, 2), (1, 2)), (0, 3), (2, 1), ((0, 3), 1)])
def test_runs_and_threads(monkeypatch, cpus, dtype, make_view, axes, dilation):
    """The NumPy path moves trailing undilated axes as one item and splits
    copies among the cores (forced here for small arrays): same results for
    every layout, dtype and core count."""
    from cupyconv import _parallel

    monkeypatch.setattr(_parallel, "CPUS", cpus)
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_BYTES", 0)
    rng = np.random.default_rng(3)
    a = make_view(random_array(rng, (5, 4, 3, 6), np.int64).astype(dtype))
    norm_axes = tuple(np.atleast_1d(axes) % a.ndim)
    norm_dil = (dilation,) * len(norm_axes) if np.isscalar(dilation) else dilation
    out = cc.dilate(a, axes, dilation)
    np.testing.assert_array_equal(out, reference.dilate(a, norm_axes, norm_dil))
    assert out.dtype == a.dtype and out.flags.c_contiguous
    back = cc.undilate(out, axes, dilation)
    np.testing.assert_array_equal(back, a)
    und = cc.undilate(a, axes, dilation)
    np.testing.assert_array_equal(und, reference.undilate(a, norm_axes, norm_dil))
    assert und.dtype == a.dtype and und.flags.c_contiguous


def test_undilate_returns_new_array_even_when_nothing_is_removed():
    a = np.arange(6).reshape(2, 3)
    out = cc.undilate(a, (0, 1), 0)
    assert not np.shares_memory(out, a)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("length", [7, 8, 9, 12])
def test_dilate_with_shape(length):
    a = np.array([1.0, 2.0, 3.0])
    out = cc.dilate(a, 0, 2, shape=(length,))
    expected = np.zeros(length)
    expected[[0, 3, 6]] = a
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(cc.undilate(out, 0, 2)[:3], a)


def test_dilate_shape_zero_length_axis():
    a = np.zeros((0, 3))
    assert cc.dilate(a, (0, 1), 1, shape=(0, 5)).shape == (0, 5)
    assert cc.dilate(a, (0, 1), 1, shape=(4, 5)).shape == (4, 5)


def test_zero_dimensional_and_empty_axes():
    a = np.array(5.0)
    assert cc.dilate(a, (), ()) == 5.0
    assert cc.dilate(a, (), (), shape=()) == 5.0
    assert isinstance(cc.undilate(a, (), ()), np.ndarray)
    assert cc.undilate(a, (), 3) == 5.0
    b = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(cc.dilate(b, (), 2), b)


def test_object_and_string_dtypes_work_on_the_cpu():
    a = np.array(["ab", "cd"])
    np.testing.assert_array_equal(cc.dilate(a, 0, 1), ["ab", "", "cd", ""])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(axes=2, dilation=1), ValueError, r"axes\[0\] = 2 is out of range"),
        (dict(axes=(-3,), dilation=1), ValueError, "out of range"),
        (dict(axes=(1, -1), dilation=1), ValueError, "axes repeats axis 1"),
        (dict(axes=(0, 1), dilation=(1, 2, 3)), ValueError, "dilation has 3 entries"),
        (dict(axes=(0,), dilation=-1), ValueError, "dilation must be >= 0"),
        (dict(axes=(0,), dilation=1.5), TypeError, "dilation must be an integer"),
        (dict(axes=(0,), dilation=(True,)), TypeError, r"dilation\[0\] must be an integer"),
        (dict(axes=(0.0,), dilation=1), TypeError, r"axes\[0\] must be an integer"),
        (dict(axes=0, dilation=2, shape=(6, 3)), ValueError, r"shape\[0\] = 6 is too small"),
        (dict(axes=0, dilation=2, shape=(7,)), ValueError, "shape must have 2 entries"),
        (dict(axes=0, dilation=2, shape=(7, 4)), ValueError, r"shape\[1\] = 4 differs"),
        (dict(axes=0, dilation=2, shape=7), TypeError, "shape must be a sequence"),
        (dict(axes=0, dilation=2, shape=(7, -3)), ValueError, "shape entries must be >= 0"),
        (dict(axes=0, dilation=2, shape=(2**60, 3)), ValueError, "shape: the result would have"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        cc.dilate(np.ones((3, 3)), **kwargs)
    if "shape" not in kwargs:
        with pytest.raises(error, match=match):
            cc.undilate(np.ones((3, 3)), **kwargs)


def test_a_result_too_large_for_any_array_names_dilation():
    with pytest.raises(ValueError, match=r"dilation: the result would have shape "
                                         r"\(6442450947, 6442450947\): more elements"):
        cc.dilate(np.ones((3, 3)), (0, 1), 2**31)
    assert cc.undilate(np.ones((3, 3)), (0, 1), 2**31).shape == (1, 1)


arrays = hnp.arrays(
    dtype=st.sampled_from([np.int16, np.float32, np.complex128]),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    elements=dict(min_value=-100, max_value=100, max_magnitude=100, allow_nan=False,
                  allow_infinity=False),
)


@st.composite
def dilation_case(draw):
    a = draw(arrays)
    axes = draw(st.lists(st.integers(-a.ndim, a.ndim - 1), unique_by=lambda v: v % a.ndim,
                         max_size=a.ndim))
    dilation = draw(st.lists(st.integers(0, 4), min_size=len(axes), max_size=len(axes)))
    return a, tuple(axes), tuple(dilation)


@settings(max_examples=60, deadline=None)
@given(dilation_case())
def test_round_trip(case):
    a, axes, dilation = case
    np.testing.assert_array_equal(cc.undilate(cc.dilate(a, axes, dilation), axes, dilation), a)


@settings(max_examples=60, deadline=None)
@given(dilation_case(), st.integers(0, 3), st.randoms(use_true_random=False))
def test_adjointness(case, extra, rnd):
    """sum(dilate(a) * b) == sum(a * undilate(b)); with a larger ``shape`` the
    adjoint is undilate cropped to a's shape."""
    a, axes, dilation = case
    a = a.astype(np.result_type(a.dtype, np.float64))
    shape = list(cc.dilate(a, axes, dilation).shape)
    for axis in axes:
        shape[axis % a.ndim] += extra
    b = np.random.default_rng(rnd.randint(0, 2**32 - 1)).standard_normal(shape)
    left = np.sum(cc.dilate(a, axes, dilation, shape=tuple(shape)) * b)
    crop = tuple(slice(0, n) for n in a.shape)
    right = np.sum(a * cc.undilate(b, axes, dilation)[crop])
    assert np.isclose(left, right, rtol=1e-12, atol=1e-9)
