"""The dilation kernel (cuda/dilation.cu through cupyconv/dilation/_cuda.py)
against the NumPy path, bit for bit: on the CPU executor and, where there
is one, on the GPU.
"""

import numpy as np
import pytest

import cupyconv as cc
from cupyconv import _kernels
from cupyconv.dilation import _cuda as dilation_cuda
from reference import (DILATION_DTYPES, assert_same_bits, random_bits as random_array,
                       small_integers)

# Each test on the CPU executor and, where there is one, the GPU.
pytestmark = pytest.mark.paths("cpu_kernels", "gpu")

# One dtype per copy instantiation (item size 1, 2, 4, 8, 16) and a few more.
COPY_DTYPES = [np.bool_, np.int8, np.float16, np.int16, np.float32, np.int32,
               np.float64, np.int64, np.complex64, np.complex128]


# (input view, axes, dilation, shape or None): sizes not multiples of the
# 256-thread block, length-1 and length-0 axes, views of every layout.
def _cases():
    base = np.arange(6 * 7 * 5).reshape(6, 7, 5)
    return {
        "1d-odd": (lambda a: a[:, 0, 0], 0, 2, None),
        "2d-both-axes": (lambda a: a[:5, :7, 0], (0, 1), (1, 3), None),
        "3d-last-axis": (lambda a: a, -1, 4, None),
        "single-element-dims": (lambda a: a[:1, :1, :3], (0, 1, 2), (2, 0, 1), None),
        "zero-dilation": (lambda a: a[:3, :4, 1], (0, 1), 0, None),
        "transposed": (lambda a: a[:, :, 2].T, (0, 1), (2, 1), None),
        "reversed": (lambda a: a[::-1, ::-1, 0], 1, 3, None),
        "strided": (lambda a: a[::2, 1::3, ::2], (0, 2), (1, 2), None),
        "negative-strided-3d": (lambda a: a[::-2, :, ::-1].transpose(2, 0, 1), (1, 2), (3, 1), None),
        "large-dilation": (lambda a: a[:3, 0, 0], 0, 1000, None),
        "explicit-shape": (lambda a: a[:4, :3, 0], (0, 1), (1, 2), (9, 10)),
        "minimal-shape": (lambda a: a[:4, :3, 0], (0, 1), (1, 2), (7, 7)),
        "zero-length-axis": (lambda a: a[:0, :4, 0], (0, 1), (1, 1), None),
        "zero-length-other-axis": (lambda a: a[:3, :0, 0], 0, 2, None),
        # Trailing runs not dilated move as wider words (5 and 4 elements).
        "contiguous-tail": (lambda a: a, (0, 1), (1, 2), None),
        "tail-of-4": (lambda a: a[:, 1:, :4], (0, 1), (2, 1), None),
        "length-1-axes-between": (lambda a: a[:, :1, :4, None], (0, 2), 1, None),
        "four-axes": (lambda a: a.reshape(2, 3, 7, 5), (0, 1, 2), (1, 2, 1), None),
    }, base


CASES, BASE_SHAPE = _cases()


@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dilate_matches_numpy_path(path, case, dtype):
    select, axes, dilation, shape = CASES[case]
    a = select(random_array(BASE_SHAPE.shape, dtype, seed=len(case)))
    expected = path.on_numpy(cc.dilate, a, axes, dilation, shape=shape)
    assert_same_bits(path.run(cc.dilate, a, axes, dilation, shape=shape), expected)


@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", sorted(CASES))
def test_undilate_matches_numpy_path(path, case, dtype):
    select, axes, dilation, _ = CASES[case]
    a = select(random_array(BASE_SHAPE.shape, dtype, seed=len(case)))
    expected = path.on_numpy(cc.undilate, a, axes, dilation)
    assert_same_bits(path.run(cc.undilate, a, axes, dilation), expected)


@pytest.mark.parametrize("dtype", [np.int8, np.complex128], ids=lambda d: np.dtype(d).name)
def test_dilate_zero_dimensional(path, dtype):
    a = random_array((), dtype)
    assert_same_bits(path.run(cc.dilate, a, (), ()), path.on_numpy(cc.dilate, a, (), ()))


@pytest.mark.parametrize("dtype", [np.int8, np.complex128], ids=lambda d: np.dtype(d).name)
def test_undilate_zero_dimensional(path, dtype):
    a = random_array((), dtype)
    expected = path.on_numpy(cc.undilate, a, (), ())
    assert isinstance(expected, np.ndarray)
    assert_same_bits(path.run(cc.undilate, a, (), ()), expected)


@pytest.mark.parametrize("case", ["2d-both-axes", "contiguous-tail", "negative-strided-3d",
                                  "explicit-shape", "length-1-axes-between"])
def test_64_bit_index_path(path, monkeypatch, case):
    """Outputs of 2**31 elements and more decode positions with 64-bit
    divisions; shown here on small inputs by lowering the threshold."""
    monkeypatch.setattr(_kernels, "FAST_INDEX_LIMIT", 0)
    select, axes, d, shape = CASES[case]
    a = select(random_array(BASE_SHAPE.shape, np.float32, seed=4))
    assert_same_bits(path.run(cc.dilate, a, axes, d, shape=shape),
                     path.on_numpy(cc.dilate, a, axes, d, shape=shape))
    assert_same_bits(path.run(cc.undilate, a, axes, d), path.on_numpy(cc.undilate, a, axes, d))


@pytest.mark.parametrize("limit", [2**31, 0], ids=["32-bit", "64-bit"])
def test_many_axes(path, monkeypatch, limit):
    """More axes than the kernel's unrolled cases (4) after merging."""
    monkeypatch.setattr(_kernels, "FAST_INDEX_LIMIT", limit)
    a = random_array((2, 3, 2, 3, 2, 3), np.int16, seed=6)[..., ::-1]
    axes, d = (0, 1, 2, 3, 4), (1, 0, 2, 1, 3)
    assert len(dilation_cuda._merged_axes(
        a.shape, a.shape, (2, 1, 3, 2, 4, 1), a.strides)) == 6
    assert_same_bits(path.run(cc.dilate, a, axes, d), path.on_numpy(cc.dilate, a, axes, d))
    assert_same_bits(path.run(cc.undilate, a, axes, d), path.on_numpy(cc.undilate, a, axes, d))


def test_gather_merges_axes_and_moves_wide_words():
    # NHWC float32, 16 channels, dilated along H and W: the channels move as
    # four 16-byte words and the batch axis stays, the length-1 axis goes.
    axes = dilation_cuda._merged_axes((8, 1, 31, 31, 16), (8, 1, 16, 16, 16), (1, 1, 2, 2, 1),
                                 (16384, 16384, 1024, 64, 4))
    assert axes == [(8, 8, 1, 16384), (31, 16, 2, 1024), (31, 16, 2, 64), (16, 16, 1, 4)]
    assert dilation_cuda._in_units(axes, 4, 4096) == (16, axes[:3] + [(4, 4, 1, 16)])
    # Contiguous axes not dilated merge into one; a misaligned address
    # narrows the words, down to parts of one element.
    assert dilation_cuda._merged_axes((4, 5, 6), (4, 5, 6), (1, 1, 1), (240, 48, 8)) == [(120, 120, 1, 8)]
    assert dilation_cuda._in_units([(120, 120, 1, 8)], 8, 4100) == (4, [(240, 240, 1, 4)])
    assert dilation_cuda._in_units([(9, 5, 2, 16)], 8, 4098) == (2, [(9, 5, 2, 16), (4, 4, 1, 2)])


def test_axis_table_is_made_once_per_geometry(cpu_kernels):
    """Repeated calls reuse the kernel's table of axes: on a GPU a fresh one
    would be a host-to-device copy that waits for the queue to drain."""
    a = random_array((4, 6, 8), np.float32, seed=8)
    cc.dilate(a, (0, 1), 1)
    before = dilation_cuda._axis_table.cache_info()
    for _ in range(3):
        cc.dilate(a, (0, 1), 1)
    after = dilation_cuda._axis_table.cache_info()
    assert after.hits == before.hits + 3 and after.misses == before.misses


def test_divisor32_is_exact():
    rng = np.random.default_rng(0)
    divisors = np.concatenate([np.arange(1, 300), 2 ** np.arange(31), 2 ** np.arange(2, 31) - 1,
                               rng.integers(1, 2**31, 500)])
    for d in divisors.tolist():
        magic, shift = _kernels.divisor32(d)
        assert 0 < magic < 2**32
        n = np.concatenate([rng.integers(0, 2**31, 200), [0, d - 1, d, 2**31 - 1],
                            np.minimum(np.arange(1, 40) * d, 2**31 - 1) - 1]).astype(np.uint64)
        got = (((n * np.uint64(magic)) >> np.uint64(32)) + n) >> np.uint64(shift)
        np.testing.assert_array_equal(got, n // np.uint64(d), err_msg=f"divisor {d}")


def test_roundtrip_through_kernels(path):
    a = random_array((17, 3, 9), np.float32, seed=3)
    d = path.run(cc.dilate, a[:, ::-1], (0, 2), (2, 5))
    assert_same_bits(path.run(cc.undilate, d, (0, 2), (2, 5)), np.ascontiguousarray(a[:, ::-1]))


def test_grid_stride_loop(path):
    # More elements than grid_for's 8192 blocks x 256 threads: each thread
    # handles two or more elements through the kernel's grid-stride loop.
    a = random_array((1100, 1000), np.uint8, seed=5)
    assert a.size * 2 > 8192 * 256
    got = path.run(cc.dilate, a, 1, 1)
    assert_same_bits(got, path.on_numpy(cc.dilate, a, 1, 1))


@pytest.mark.paths("cpu_kernels")  # views of a NumPy buffer
@pytest.mark.parametrize("dtype", [np.complex64, np.int64, np.complex128, np.float32],
                         ids=lambda d: np.dtype(d).name)
def test_views_not_aligned_to_their_itemsize(path, dtype):
    """A view reinterpreted at an odd byte offset (legal in NumPy and CuPy) is
    moved in narrower units instead of being read misaligned."""
    itemsize = np.dtype(dtype).itemsize
    raw = random_array((6 * 7 * itemsize + 2,), np.uint8)
    a = raw[2:].view(dtype).reshape(6, 7)[:, ::-2]  # 2-byte aligned only
    for case in [((0, 1), (1, 2), None), ((1,), 3, (6, 13))]:
        axes, dilation, shape = case
        assert_same_bits(path.run(cc.dilate, a, axes, dilation, shape=shape),
                         path.on_numpy(cc.dilate, a, axes, dilation, shape=shape))
        assert_same_bits(path.run(cc.undilate, a, axes, dilation),
                         path.on_numpy(cc.undilate, a, axes, dilation))


# ---- GPU: the CuPy path against the NumPy path, exactly ----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DILATION_DTYPES)
@pytest.mark.parametrize(
    "make_view",
    [lambda a: a, lambda a: a.T, lambda a: a[::-1, 1:, ::2]],
    ids=["contiguous", "transposed", "reversed-strided"],
)
def test_gpu_matches_numpy(gpu, dtype, make_view):
    host = make_view(small_integers(np.random.default_rng(1), (37, 20, 9), dtype))
    device = make_view(gpu.asarray(small_integers(np.random.default_rng(1), (37, 20, 9),
                                                dtype)))
    n0, n1, n2 = host.shape
    minimal = ((n0 - 1) * 2 + 1, n1, n2)  # no trailing zeros along axis 0
    for axes, dilation, shape in [((0, 2), (2, 1), None), ((-1,), 3, None),
                                  ((0, 1), (1, 0), minimal)]:
        out = cc.dilate(device, axes, dilation, shape=shape)
        assert isinstance(out, gpu.ndarray)
        np.testing.assert_array_equal(out.get(), cc.dilate(host, axes, dilation, shape=shape))
        back = cc.undilate(device, axes, dilation)
        assert isinstance(back, gpu.ndarray) and back.flags.c_contiguous
        np.testing.assert_array_equal(back.get(), cc.undilate(host, axes, dilation))


@pytest.mark.gpu
def test_gpu_large_grid_stride(gpu):
    """More elements than one grid covers: the grid-stride loop finishes the rest."""
    a = gpu.arange(3 * 1024 * 1024, dtype=gpu.float32).reshape(1024, 3072)
    out = cc.dilate(a, (0, 1), 1)
    np.testing.assert_array_equal(out.get(), cc.dilate(a.get(), (0, 1), 1))
