"""GPU launch code of conv2d and its two gradients (``cuda/convolution.cu``).

:mod:`cupyconv.convolution` calls these with validated arrays of one float
dtype and the convolution's :class:`._geometry.ConvGeometry` (sizes,
``(h, w)`` pairs, explicit padding ``((top, bottom), (left, right))`` and
layout: ``"NHWC"`` with x ``(N, H, W, C_in)`` and w ``(kh, kw, C_in/groups,
C_out)``, or ``"NCHW"`` with x ``(N, C_in, H, W)`` and w ``(C_out,
C_in/groups, kh, kw)``).  Arrays are CuPy arrays, or NumPy arrays under the test suite's CPU
executor; every function returns a new array of that dtype in ``layout``.

The kernels address every tensor through element strides in semantic order,
(n, h, w, c) for activations and (i, j, c_in, c_out) for weights, so both
layouts and any strided view are read in place, without a transposed copy.
A 1x1, stride-1, unpadded, ungrouped convolution is a plain matrix product
and goes to ``xp.matmul`` (cuBLAS on the GPU; it accumulates float16 in
float32, as NumPy does).
"""

import functools
import math
from typing import NamedTuple

import numpy

from .. import _args, _backend, _kernels
from . import _cuda_mma, _precision

# Must match convolution.cu: a block of _kernels.THREADS threads computes a
# _TILE x _TILE tile of the GEMM, reducing _SLICE at a time (Tiling64), or a
# _LARGE_TILE x _LARGE_TILE one (the *_igemm128 kernels, float32 only).
_TILE = 64
_SLICE = 16
_LARGE_TILE = 128
_MAX_BLOCKS = 2**31 - 1  # gridDim.x

# Input gradients with at most this many input channels per group (a first
# layer's) go through the taps (_input_grad_by_taps): the GEMM's 64-column
# tiles would be mostly empty.
_BY_TAPS_CHANNELS = 4

#: Bytes of tap contributions computed at once by _input_grad_by_taps; a
#: larger batch goes through in parts.
_BY_TAPS_WORKSPACE_BYTES = 1 << 28

# Split-K of the weight gradient: enough blocks to keep a large GPU busy,
# but each split at least _MIN_SPLIT_SLICES slices deep so that the partial
# sums cost little next to the products, and a bounded workspace (about
# _TARGET_BLOCKS 64 x 64 tiles of partial sums at most).  A first layer's
# gradient is one tile, so it needs many splits (figures: docs/kernels.rst).
_TARGET_BLOCKS = 1024
_MIN_SPLIT_SLICES = 8
_MAX_SPLITS = 256

# The 128 x 128 pipelined kernels take a float32 product whose output fills
# at least _LARGE_TILE_BLOCKS such tiles (counting groups and reduction
# splits): one per SM of a 132-SM GPU, where their ~200 registers a thread
# let one block reside per SM.  The product must also have at least
# _LARGE_TILE_MIN_SIDE rows and columns per group (narrower, a 128 x 128
# tile would be mostly empty).  Unmeasured: chosen, not tuned (no GPU in
# the session that wrote this).
_LARGE_TILE_BLOCKS = 132
_LARGE_TILE_MIN_SIDE = 96

# Axes of (n, h, w, c) for activations and of (i, j, c_in, c_out) for weights.
_ACTIVATION_AXES = {"NHWC": (0, 1, 2, 3), "NCHW": (0, 2, 3, 1)}
_WEIGHT_AXES = {"NHWC": (0, 1, 2, 3), "NCHW": (2, 3, 1, 0)}


def forward(x, w, bias, geom, precision="highest"):
    """``y = conv2d(x, w) + bias`` as an array of shape ``(N, OH, OW, C_out)``
    (NHWC) or ``(N, C_out, OH, OW)`` (NCHW), products in ``precision``."""
    xp = _backend.array_module_of(x)
    if _cuda_mma.applies(x.dtype, precision, xp) and not _is_matrix_product(geom):
        return _cuda_mma.forward(x, w, bias, geom, precision)
    if _args.is_bfloat16(x.dtype):
        return _in_float32(forward, x, w, bias, geom)
    x, w = _precision.rounded_operands(precision, x, w, xp=xp)
    if _is_matrix_product(geom):
        return _matmul_forward(xp, x, w, bias, geom)
    y = xp.empty(geom.out_shape, dtype=x.dtype)
    if y.size == 0:
        return y
    x, w = _kernels.kernel_operand(x), _kernels.kernel_operand(w)
    gemm = _forward_plan(geom, x.dtype, _tuning())
    axes = _ACTIVATION_AXES[geom.layout]
    xs, ws = _strides(x, axes), _strides(w, _WEIGHT_AXES[geom.layout])
    has_bias = bias is not None
    if has_bias:
        bias = _kernels.kernel_operand(bias)
        bias_stride = bias.strides[0] // bias.itemsize
    else:
        bias, bias_stride = y, 0  # never read; any array of the dtype will do
    flags = _kernels.int32s(
        has_bias,
        # A: rows are output pixels, k is (i, j, c_in) with c_in fastest.
        _load_order(xs[2] * geom.stride[1], xs[3]),
        # B: rows are output channels, k runs along c_in.
        _load_order(ws[3], ws[2],
                    gemm.tile == _LARGE_TILE and _kernels.chunks_fit(w, ws, gemm.cols)),
        gemm.out_order,
    )
    gemm.launch((x, w, bias, y), xs + ws + gemm.out_strides
                + (numpy.int64(bias_stride),) + flags)
    return y


def input_grad(w, grad_out, geom, precision="highest"):
    """Gradient of ``conv2d`` with respect to its input, of ``geom.in_shape``."""
    xp = _backend.array_module_of(grad_out)
    # Few input channels per group (a first layer) go through the taps
    # whatever the precision: the GEMM's column tiles would be mostly empty.
    by_taps = _per_group(geom.in_channels, geom) <= _BY_TAPS_CHANNELS
    if (not by_taps and not _is_matrix_product(geom)
            and _cuda_mma.applies(grad_out.dtype, precision, xp)):
        return _cuda_mma.input_grad(w, grad_out, geom, precision)
    if _args.is_bfloat16(grad_out.dtype):
        return _in_float32(input_grad, w, grad_out, geom)
    w, grad_out = _precision.rounded_operands(precision, w, grad_out, xp=xp)
    if _is_matrix_product(geom):
        return _matmul_input_grad(xp, w, grad_out, geom)
    grad_x = xp.empty(geom.in_shape, dtype=grad_out.dtype)
    if grad_x.size == 0:
        return grad_x
    if by_taps:
        return _input_grad_by_taps(xp, w, grad_out, grad_x, geom)
    w, grad_out = _kernels.kernel_operand(w), _kernels.kernel_operand(grad_out)
    gemm = _input_grad_plan(geom, w.dtype, _tuning())
    axes = _ACTIVATION_AXES[geom.layout]
    gos, ws = _strides(grad_out, axes), _strides(w, _WEIGHT_AXES[geom.layout])
    flags = _kernels.int32s(
        # A: rows are input pixels, k is (i, j, c_out) with c_out fastest.
        _load_order(gos[2], gos[3]),
        # B: rows are input channels, k runs along c_out.
        _load_order(ws[2], ws[3]),
        gemm.out_order,
    )
    gemm.launch((grad_out, w, grad_x), gos + ws + gemm.out_strides + flags)
    return grad_x


def _input_grad_by_taps(xp, w, grad_out, grad_x, geom):
    """The input gradient of a layer with few input channels per group, in
    two steps.  One matrix product per group (cuBLAS on the GPU) gives each
    output pixel's contribution to every tap of its window::

        z[g, (n, oy, ox), (i, j, c)] = sum over co of
            grad_out[n, oy, ox, g*Cog + co] * w[i, j, c, g*Cog + co]

    and ``convolution_input_grad_gather`` adds, for each input element, the
    contributions of the taps that land on it.  ``z`` is the size of an
    im2col matrix, so large batches go through in parts of at most
    ``_BY_TAPS_WORKSPACE_BYTES`` (or one image).  float16 is multiplied in
    float32."""
    (kh, kw), groups = geom.kernel, geom.groups
    cin_g, cout_g = _per_group(geom.in_channels, geom), _per_group(geom.out_channels, geom)
    taps = kh * kw * cin_g
    acc = _kernels.accumulator_dtype(grad_out.dtype)
    if geom.layout == "NCHW":  # to (n, oy, ox, c_out) and (i, j, c_in, c_out)
        grad_out, w = grad_out.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0)
    w_taps = w.reshape(taps, groups, cout_g).transpose(1, 2, 0).astype(acc, copy=False)
    pixels = math.prod(geom.out_hw)
    per_image = groups * pixels * taps * acc.itemsize
    chunk = max(1, _BY_TAPS_WORKSPACE_BYTES // max(1, per_image))
    type_name = _kernels.c_type(grad_x.dtype)
    for n0 in range(0, geom.batch, chunk):
        part = geom._replace(batch=min(chunk, geom.batch - n0))
        go = grad_out[n0:n0 + part.batch].reshape(part.batch * pixels, groups, cout_g)
        z = xp.matmul(go.transpose(1, 0, 2).astype(acc, copy=False), w_taps)
        z = xp.ascontiguousarray(z)  # as the kernel indexes it (matmul's already is)
        part_x = grad_x[n0:n0 + part.batch]
        _kernels.launch("convolution", "convolution_input_grad_gather", type_name,
                        _kernels.grid_for(part_x.size),
                        (z, part_x) + _geometry_args(part)
                        + _strides(part_x, _ACTIVATION_AXES[geom.layout])
                        + _kernels.int64s(part_x.size))
    return grad_x


def weight_grad(x, grad_out, geom, precision="highest"):
    """Gradient of ``conv2d`` with respect to its weight, of ``geom.weight_shape``.

    The reduction over the ``N*OH*OW`` output pixels is split into chunks of
    a size fixed by the shapes alone; ``convolution_weight_grad_reduce`` adds the
    chunks' partial sums in order, so results are reproducible bit for bit.
    """
    xp = _backend.array_module_of(x)
    if _cuda_mma.applies(x.dtype, precision, xp) and not _is_matrix_product(geom):
        return _cuda_mma.weight_grad(x, grad_out, geom, precision)
    if _args.is_bfloat16(x.dtype):
        return _in_float32(weight_grad, x, grad_out, geom)
    x, grad_out = _precision.rounded_operands(precision, x, grad_out, xp=xp)
    if _is_matrix_product(geom):
        return _matmul_weight_grad(xp, x, grad_out, geom)
    grad_w = xp.empty(geom.weight_shape, dtype=x.dtype)
    if grad_w.size == 0:
        return grad_w
    x, grad_out = _kernels.kernel_operand(x), _kernels.kernel_operand(grad_out)
    gemm, reduction = _weight_grad_plan(geom, x.dtype, _tuning())
    partial = xp.empty(reduction.partial_shape, reduction.partial_dtype)
    axes = _ACTIVATION_AXES[geom.layout]
    xs, gos = _strides(x, axes), _strides(grad_out, axes)
    chunks = gemm.tile == _LARGE_TILE  # the 16-byte runs are the 128 kernels' (float32)
    flags = _kernels.int32s(
        # A: rows are (i, j, c_in) with c_in fastest, k is output pixels.
        _load_order(xs[3], xs[2] * geom.stride[1],
                    chunks and _kernels.chunks_fit(x, xs, reduction.cin_g)),
        # B: rows are output channels, k is output pixels.
        _load_order(gos[3], gos[2], chunks and _kernels.chunks_fit(grad_out, gos, gemm.cols)),
    )
    gemm.launch((x, grad_out, partial), xs + gos + reduction.split_len + flags)
    _kernels.launch("convolution", "convolution_weight_grad_reduce", gemm.c_type,
                    reduction.grid, (partial, grad_w) + reduction.args)
    return grad_w


# ---- matrix-product path ------------------------------------------------------

def _is_matrix_product(geom):
    """A 1x1 kernel at stride 1 without padding or groups multiplies every
    pixel's channel vector by one matrix (dilation does not matter)."""
    return (geom.kernel == (1, 1) and geom.stride == (1, 1)
            and geom.padding == ((0, 0), (0, 0)) and geom.groups == 1)


def _matmul_dims(geom):
    """``(N, C_in, C_out, H*W, layout)`` of a matrix-product convolution."""
    return (geom.batch, geom.in_channels, geom.out_channels,
            math.prod(geom.in_hw), geom.layout)


def _matmul_forward(xp, x, w, bias, geom):
    n, c_in, c_out, pixels, layout = _matmul_dims(geom)
    if layout == "NHWC":
        y = xp.matmul(x.reshape(n * pixels, c_in), w.reshape(c_in, c_out))
    else:
        y = xp.matmul(w.reshape(c_out, c_in), x.reshape(n, c_in, pixels))
        bias = None if bias is None else bias.reshape(c_out, 1)
    if bias is not None:
        y += bias
    return y.reshape(geom.out_shape)


def _matmul_input_grad(xp, w, grad_out, geom):
    n, c_in, c_out, pixels, layout = _matmul_dims(geom)
    if layout == "NHWC":
        grad_x = xp.matmul(grad_out.reshape(n * pixels, c_out),
                           w.reshape(c_in, c_out).T)
    else:
        grad_x = xp.matmul(w.reshape(c_out, c_in).T,
                           grad_out.reshape(n, c_out, pixels))
    return grad_x.reshape(geom.in_shape)


def _matmul_weight_grad(xp, x, grad_out, geom):
    n, c_in, c_out, pixels, layout = _matmul_dims(geom)
    if layout == "NHWC":
        grad_w = xp.matmul(x.reshape(n * pixels, c_in).T,
                           grad_out.reshape(n * pixels, c_out))
    else:
        # One product over (n, pixel) pairs, not N products summed afterwards.
        grad_w = xp.tensordot(grad_out.reshape(n, c_out, pixels),
                              x.reshape(n, c_in, pixels), axes=((0, 2), (0, 2)))
    return grad_w.reshape(geom.weight_shape)


# ---- helpers -----------------------------------------------------------------

def _in_float32(function, *operands_and_geom):
    """``function`` of bfloat16 arrays computed by the float32 kernels and
    rounded to bfloat16 once (the products of bfloat16 values are exact in
    float32): the path of the bfloat16 gradients and matrix products."""
    *operands, geom = operands_and_geom
    dtype = next(a.dtype for a in operands if a is not None)
    upcast = [None if a is None else a.astype(numpy.float32) for a in operands]
    return function(*upcast, geom).astype(dtype)


def _strides(a, axes):
    """Element strides of ``a`` along ``axes``, as kernel arguments."""
    return _element_strides(a.strides, a.itemsize, axes)


@functools.lru_cache(maxsize=1024)
def _element_strides(strides, itemsize, axes):
    return _kernels.int64s(*(strides[axis] // itemsize for axis in axes))


def _rows_fastest(row_step, k_step):
    """Whether a GEMM operand's tile loads should walk its rows (memory step
    ``row_step``) rather than its reduction index (step ``k_step``): whichever
    is closer to contiguous coalesces better."""
    return int(abs(int(row_step)) < abs(int(k_step)))


@functools.lru_cache(maxsize=1024)
def _load_order(row_step, k_step, chunks=False):
    """A GEMM operand loader's LoadOrder (convolution.cu): 16-byte runs of 4
    rows where ``chunks`` (see :func:`.._kernels.chunks_fit`), else rows or reduction
    index fastest (:func:`_rows_fastest`)."""
    return 2 if chunks else _rows_fastest(row_step, k_step)


def _per_group(channels, geom):
    return channels // geom.groups


@functools.lru_cache(maxsize=256)
def _geometry_args(geom):
    """The 16 leading kernel arguments (CONVOLUTION_GEOMETRY_PARAMS in
    convolution.cu)."""
    (top, _), (left, _) = geom.padding
    return _kernels.int64s(
        geom.batch, *geom.in_hw, *geom.out_hw, *geom.kernel,
        _per_group(geom.in_channels, geom), _per_group(geom.out_channels, geom),
        geom.groups, *geom.stride, top, left, *geom.dilation)


def _weight_grad_splits(taps, cout_g, groups, pixels):
    """``(splits, split_len)``: how the weight gradient's reduction over
    ``pixels`` output pixels is cut; ``split_len`` is a multiple of the slice."""
    slices = max(1, _kernels.ceil_div(pixels, _SLICE))
    blocks = _kernels.ceil_div(taps, _TILE) * _kernels.ceil_div(cout_g, _TILE) * groups
    splits = max(1, min(_MAX_SPLITS, _kernels.ceil_div(slices, _MIN_SPLIT_SLICES),
                        _kernels.ceil_div(_TARGET_BLOCKS, blocks)))
    split_slices = _kernels.ceil_div(slices, splits)
    return _kernels.ceil_div(slices, split_slices), split_slices * _SLICE


def plan(dtype, rows, cols, groups, splits):
    """The block tile (``_TILE`` or ``_LARGE_TILE``) of an implicit GEMM
    over a ``rows x cols`` product per group and reduction split: the large
    tile for float32 products with enough such tiles to fill a GPU."""
    if (_dtype_name(dtype) != "float32" or rows < _LARGE_TILE_MIN_SIDE
            or cols < _LARGE_TILE_MIN_SIDE):
        return _TILE
    tiles = (_kernels.ceil_div(rows, _LARGE_TILE) * _kernels.ceil_div(cols, _LARGE_TILE)
             * groups * splits)
    return _LARGE_TILE if tiles >= _LARGE_TILE_BLOCKS else _TILE


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype):
    return numpy.dtype(dtype).name


# ---- launch plans ---------------------------------------------------------------
# What a launch needs that the geometry and dtype fix is worked out once per
# geometry, dtype and tunables (:func:`_tuning`, part of the cache key so
# that changing a tunable never meets a stale plan); a call then adds only
# what depends on its arrays: strides, alignment and the outputs.

def _tuning():
    """The module's tunables that a plan depends on."""
    return (_TARGET_BLOCKS, _MIN_SPLIT_SLICES, _MAX_SPLITS, _LARGE_TILE_BLOCKS,
            _LARGE_TILE_MIN_SIDE)


class GemmPlan(NamedTuple):
    """One implicit-GEMM launch: ``kernel`` (with the ``128`` suffix for
    ``tile == _LARGE_TILE``) over a ``rows x cols`` product per group and
    split, as a 1-D grid of ``tile x tile`` block tiles.  ``geometry`` is
    the kernel's leading arguments (:func:`_geometry_args`); ``out_strides``
    and ``out_order`` are the arguments of the new output array (the
    forward's and the input gradient's; the weight gradient writes partial
    sums)."""

    kernel: str
    c_type: str
    grid: tuple
    tile: int
    rows: int
    cols: int
    geometry: tuple
    out_strides: tuple = ()
    out_order: int = 0

    @classmethod
    def of(cls, kernel, geom, dtype, rows, cols, splits=1, out=None):
        """The plan; ``out = (shape, layout)`` of a new output array."""
        groups = geom.groups
        tile = plan(dtype, rows, cols, groups, splits)
        if tile == _LARGE_TILE:
            kernel += "128"
        blocks = (_kernels.ceil_div(rows, tile) * _kernels.ceil_div(cols, tile)
                  * groups * splits)
        if blocks > _MAX_BLOCKS:
            raise ValueError(
                f"conv2d: this problem needs {blocks} thread blocks, more than the "
                f"{_MAX_BLOCKS} one CUDA launch allows; split the batch into parts"
            )
        gemm = cls(kernel, _kernels.c_type(dtype), (blocks,), tile, rows, cols,
                   _geometry_args(geom))
        if out is None:
            return gemm
        strides = _contiguous_strides(*out, _ACTIVATION_AXES)
        # Lanes along the output's pixels, or along its channels?
        return gemm._replace(out_strides=strides, out_order=_rows_fastest(strides[2], strides[3]))

    def launch(self, arrays, trailing):
        """Launch on ``arrays``, then the geometry, then ``trailing``."""
        _kernels.launch("convolution", self.kernel, self.c_type, self.grid,
                        arrays + self.geometry + trailing)


class WeightGradReduction(NamedTuple):
    """The weight gradient's split reduction: partial sums of
    ``partial_shape = (splits, groups, taps, C_out/groups)`` in
    ``partial_dtype``, ``split_len`` output pixels each (a kernel argument);
    ``grid`` and the arguments after ``(partial, grad_w)`` of
    ``convolution_weight_grad_reduce``."""

    partial_shape: tuple
    partial_dtype: numpy.dtype
    split_len: tuple
    grid: tuple
    args: tuple
    cin_g: int


def _contiguous_strides(shape, layout, axes_of_layout):
    """Element strides, as kernel arguments in the semantic order of
    ``axes_of_layout[layout]``, of a new C-contiguous array of ``shape``."""
    strides, step = [0] * len(shape), 1
    for axis in reversed(range(len(shape))):
        strides[axis], step = step, step * shape[axis]
    return _kernels.int64s(*(strides[axis] for axis in axes_of_layout[layout]))


@functools.lru_cache(maxsize=256)
def _forward_plan(geom, dtype, tuning):
    return GemmPlan.of("convolution_forward_igemm", geom, dtype,
                       geom.batch * math.prod(geom.out_hw), _per_group(geom.out_channels, geom),
                       out=(geom.out_shape, geom.layout))


@functools.lru_cache(maxsize=256)
def _input_grad_plan(geom, dtype, tuning):
    return GemmPlan.of("convolution_input_grad_igemm", geom, dtype,
                       geom.batch * math.prod(geom.in_hw), _per_group(geom.in_channels, geom),
                       out=(geom.in_shape, geom.layout))


@functools.lru_cache(maxsize=256)
def _weight_grad_plan(geom, dtype, tuning):
    """``(GemmPlan, WeightGradReduction)`` of a weight gradient."""
    (kh, kw), groups = geom.kernel, geom.groups
    cin_g, cout_g = _per_group(geom.in_channels, geom), _per_group(geom.out_channels, geom)
    taps = kh * kw * cin_g
    splits, split_len = _weight_grad_splits(
        taps, cout_g, groups, geom.batch * math.prod(geom.out_hw))
    gemm = GemmPlan.of("convolution_weight_grad_igemm", geom, dtype, taps, cout_g, splits)
    grad_w_strides = _contiguous_strides(geom.weight_shape, geom.layout, _WEIGHT_AXES)
    return gemm, WeightGradReduction(
        (splits, groups, taps, cout_g), _kernels.accumulator_dtype(dtype),
        _kernels.int64s(split_len), _kernels.grid_for(math.prod(geom.weight_shape)),
        _kernels.int64s(splits, groups, kw, taps, cin_g, cout_g) + grad_w_strides, cin_g)
