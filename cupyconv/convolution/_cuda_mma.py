"""Launch code of conv2d on tensor cores (``cuda/convolution_mma.cu``).

:mod:`._cuda` hands a convolution here when the products run
on tensor cores (:func:`applies`): float16 and bfloat16 always, float32 for
``precision="tf32"`` or ``"3xtf32"``, on GPUs of compute capability 8.0 or
later (and on the CPU executor).  Arrays are as in :mod:`._cuda`.

For the forward and the input gradient the weights are packed once per call
into ``[group][columns][Kp]`` with the reduction index contiguous and padded
with zeros to a whole number of pipeline stages: a copy the size of ``w``,
small next to the activations, that lets every weight load be one aligned
16-byte ``cp.async`` whatever ``w``'s layout or strides.
"""

import functools
import math
from typing import NamedTuple

import numpy

from .. import _backend, _kernels
from . import _cuda

#: C++ type of each dtype the tensor-core kernels take.
MMA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}

# Must match convolution_mma.cu.
_CHUNK_BYTES = 16
_STAGE_CHUNKS = 4
_STAGES = 3
#: config -> (block rows, block columns, threads).
_TILES = {0: (128, 128, 256), 1: (64, 64, 128)}
_MAX_BLOCKS = 2**31 - 1

#: Blocks worth having in flight: about two per SM of the largest current
#: GPUs (132 SMs on an H100 SXM).  Fewer 128 x 128 tiles than this take the
#: 64 x 64 tile, and fewer 64 x 64 tiles a split reduction.  Unmeasured:
#: chosen, not tuned (no GPU in the sessions that wrote this).
_TARGET_BLOCKS = 264
#: Least pipeline stages per reduction split, most splits of a forward or
#: input gradient, and of a weight gradient (whose reduction over every
#: output pixel is usually far longer than its output is large).
_MIN_SPLIT_TILES = 4
_MAX_SPLITS = 16
_MAX_WEIGHT_GRAD_SPLITS = 256


def applies(dtype, precision, xp):
    """Whether conv2d products of ``dtype`` in ``precision`` run here."""
    name = _dtype_name(dtype)
    if name not in MMA_TYPES or (name == "float32" and precision == "highest"):
        return False
    return _tensor_cores(_kernels.device_id(xp))


@functools.lru_cache(maxsize=None)
def _tensor_cores(device):
    """mma.sync with TF32 and bfloat16, ldmatrix and cp.async need sm_80."""
    if device is None:  # the CPU executor
        return True
    import cupy

    return int(cupy.cuda.Device(device).compute_capability) >= 80


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype):
    return numpy.dtype(dtype).name


def forward(x, w, bias, geom, precision):
    """``conv2d(x, w) + bias`` on tensor cores (see the module doc)."""
    xp = _backend.array_module_of(x)
    y = xp.empty(geom.out_shape, dtype=x.dtype)
    if y.size == 0:
        return y
    x = _kernels.kernel_operand(x)
    gemm = _forward_plan(geom, x.dtype, precision, _tuning())
    w_packed = _packed(xp, w, geom, gemm.k_padded, transpose=False)
    xs = _cuda._strides(x, _cuda._ACTIVATION_AXES[geom.layout])
    has_bias = bias is not None
    if has_bias:
        bias = _kernels.kernel_operand(bias)
        bias_stride = bias.strides[0] // bias.itemsize
    else:
        bias, bias_stride = y, 0  # never read
    bias_args = (numpy.int64(bias_stride), numpy.int32(has_bias))
    partial = gemm.partial(xp)
    gemm.launch((x, w_packed, bias, y, partial), xs + gemm.out_strides + bias_args
                + gemm.k_padded_arg, (_kernels.chunks_fit(x, xs, gemm.cin_g),))
    gemm.sum_splits(partial, bias, y, bias_args)
    return y


def input_grad(w, grad_out, geom, precision):
    """Gradient of ``conv2d`` with respect to its input on tensor cores."""
    xp = _backend.array_module_of(grad_out)
    grad_x = xp.empty(geom.in_shape, dtype=grad_out.dtype)
    if grad_x.size == 0:
        return grad_x
    grad_out = _kernels.kernel_operand(grad_out)
    gemm = _input_grad_plan(geom, grad_out.dtype, precision, _tuning())
    w_packed = _packed(xp, w, geom, gemm.k_padded, transpose=True)
    gos = _cuda._strides(grad_out, _cuda._ACTIVATION_AXES[geom.layout])
    partial = gemm.partial(xp)
    gemm.launch((grad_out, w_packed, grad_x, partial), gos + gemm.out_strides
                + gemm.k_padded_arg, (_kernels.chunks_fit(grad_out, gos, gemm.cout_g),))
    gemm.sum_splits(partial, grad_x, grad_x, _NO_BIAS)
    return grad_x


def weight_grad(x, grad_out, geom, precision):
    """Gradient of ``conv2d`` with respect to its weight on tensor cores: a
    product reduced over the ``N*OH*OW`` output pixels, split into fixed
    ranges added in order."""
    xp = _backend.array_module_of(x)
    grad_w = xp.empty(geom.weight_shape, dtype=x.dtype)
    if grad_w.size == 0:
        return grad_w
    x, grad_out = _kernels.kernel_operand(x), _kernels.kernel_operand(grad_out)
    gemm = _weight_grad_plan(geom, x.dtype, precision, _tuning())
    axes = _cuda._ACTIVATION_AXES[geom.layout]
    xs, gos = _cuda._strides(x, axes), _cuda._strides(grad_out, axes)
    partial = gemm.partial(xp)
    gemm.launch((x, grad_out, grad_w, partial), xs + gos + gemm.out_strides,
                (_kernels.chunks_fit(x, xs, gemm.cin_g),
                 _kernels.chunks_fit(grad_out, gos, gemm.cout_g)))
    gemm.sum_splits(partial, grad_w, grad_w, _NO_BIAS)
    return grad_w


#: The ``(bias_stride, has_bias)`` arguments of a sum without a bias.
_NO_BIAS = (numpy.int64(0), numpy.int32(0))


# ---- launch plans ---------------------------------------------------------------
# As in :mod:`._cuda`: what a launch needs that the geometry, dtype and
# precision fix is worked out once per those and the tunables.

def _tuning():
    """The module's tunables that a plan depends on (part of its cache key)."""
    return _TARGET_BLOCKS, _MIN_SPLIT_TILES, _MAX_SPLITS, _MAX_WEIGHT_GRAD_SPLITS


class MmaPlan(NamedTuple):
    """One tensor-core GEMM: ``kernel<template>`` on ``grid`` blocks of
    ``threads`` with ``shared_mem`` bytes, over a ``rows x cols`` product per
    group whose reduction is cut into ``splits``; then, with several splits,
    ``convolution_split_sum_mma`` on ``sum_grid``.  ``geometry`` and
    ``split_args`` are kernel arguments; ``out_strides`` those of the new
    output (placed by ``sum_args`` in the split sum); ``k_padded`` the packed
    weights' row length (forward and input gradient)."""

    kernel: str
    template: str
    c_type: str
    grid: tuple
    threads: int
    shared_mem: int
    partial_shape: tuple
    geometry: tuple
    split_args: tuple
    out_strides: tuple
    sum_grid: tuple
    sum_args: tuple
    cin_g: int
    cout_g: int
    k_padded: int = 0
    k_padded_arg: tuple = ()

    @classmethod
    def of(cls, kernel, geom, dtype, precision, rows, cols, k_tiles, max_splits, out,
           row_map):
        """The plan of a product whose output ``out = (shape, axes)`` has its
        rows at ``row_map = (mid, inner)`` (see convolution_split_sum_mma)."""
        groups = geom.groups
        config, splits, split_tiles = plan(rows, cols, groups, k_tiles, max_splits)
        tile_rows, tile_cols, threads = _TILES[config]
        blocks = (_kernels.ceil_div(rows, tile_rows) * _kernels.ceil_div(cols, tile_cols)
                  * groups * splits)
        if blocks > _MAX_BLOCKS or split_tiles >= 2**31:
            raise ValueError(f"conv2d: this problem needs {blocks} thread blocks, more than "
                             f"the {_MAX_BLOCKS} one CUDA launch allows; split the batch "
                             "into parts")
        c_type = MMA_TYPES[_dtype_name(dtype)]
        split3 = "true" if precision == "3xtf32" and c_type == "float" else "false"
        out_strides = _cuda._contiguous_strides(*out)
        return cls(
            kernel, f"{c_type}, {split3}, {config}", c_type, (blocks,), threads,
            shared_bytes(config), (splits, groups, rows, cols) if splits > 1 else None,
            _geometry(geom), _kernels.int32s(splits, split_tiles), out_strides,
            _kernels.grid_for(groups * rows * cols),
            (numpy.int64(rows), numpy.int32(cols), numpy.int32(groups), numpy.int32(splits))
            + _kernels.int64s(*row_map) + out_strides,
            *_per_group(geom))

    def partial(self, xp):
        """The float32 partial products of the splits (a placeholder without)."""
        if self.partial_shape is None:
            return _unused_partial(xp, _kernels.device_id(xp))
        return xp.empty(self.partial_shape, numpy.float32)

    def launch(self, arrays, leading, vector_flags):
        """The GEMM on ``arrays``, the geometry, ``leading``, the split
        arguments and the 16-byte loaders' ``vector_flags``."""
        _kernels.launch("convolution_mma", self.kernel, self.template, self.grid,
                        arrays + self.geometry + leading + self.split_args
                        + _kernels.int32s(*vector_flags),
                        threads=self.threads, shared_mem=self.shared_mem)

    def sum_splits(self, partial, bias, out, bias_args):
        """With several splits, add their partial products (and the bias)
        into ``out``."""
        if self.partial_shape is not None:
            _kernels.launch("convolution_mma", "convolution_split_sum_mma", self.c_type,
                            self.sum_grid, (partial, bias, out) + self.sum_args + bias_args)


@functools.lru_cache(maxsize=256)
def _forward_plan(geom, dtype, precision, tuning):
    cin_g, cout_g = _per_group(geom)
    k_padded = _padded_depth(geom.kernel[0] * geom.kernel[1] * cin_g, dtype, geom, cout_g)
    return MmaPlan.of(
        "convolution_forward_mma", geom, dtype, precision, geom.batch * math.prod(geom.out_hw),
        cout_g, k_padded // _depth(dtype), _MAX_SPLITS,
        (geom.out_shape, geom.layout, _cuda._ACTIVATION_AXES), geom.out_hw,
    )._replace(k_padded=k_padded, k_padded_arg=(numpy.int32(k_padded),))


@functools.lru_cache(maxsize=256)
def _input_grad_plan(geom, dtype, precision, tuning):
    cin_g, cout_g = _per_group(geom)
    k_padded = _padded_depth(geom.kernel[0] * geom.kernel[1] * cout_g, dtype, geom, cin_g)
    return MmaPlan.of(
        "convolution_input_grad_mma", geom, dtype, precision,
        geom.batch * math.prod(geom.in_hw), cin_g, k_padded // _depth(dtype), _MAX_SPLITS,
        (geom.in_shape, geom.layout, _cuda._ACTIVATION_AXES), geom.in_hw,
    )._replace(k_padded=k_padded, k_padded_arg=(numpy.int32(k_padded),))


@functools.lru_cache(maxsize=256)
def _weight_grad_plan(geom, dtype, precision, tuning):
    cin_g, cout_g = _per_group(geom)
    kh, kw = geom.kernel
    pixels = geom.batch * math.prod(geom.out_hw)
    return MmaPlan.of(
        "convolution_weight_grad_mma", geom, dtype, precision, kh * kw * cin_g, cout_g,
        _kernels.ceil_div(pixels, _depth(dtype)), _MAX_WEIGHT_GRAD_SPLITS,
        (geom.weight_shape, geom.layout, _cuda._WEIGHT_AXES), (kw, cin_g))


@functools.lru_cache(maxsize=None)
def _unused_partial(xp, device):
    """The ``partial`` argument of a launch without splits (never read or
    written): one float32 per module and device, made once."""
    return xp.empty(1, numpy.float32)


def _per_group(geom):
    return geom.in_channels // geom.groups, geom.out_channels // geom.groups


def _depth(dtype):
    """Reduction depth of one pipeline stage: 64 bytes of elements."""
    return _STAGE_CHUNKS * _CHUNK_BYTES // dtype.itemsize


def _padded_depth(taps, dtype, geom, cols):
    """The reduction length rounded up to whole stages (the packed weights'
    row length), checked against the kernels' 32-bit tap arithmetic."""
    depth = _depth(dtype)
    k_padded = _kernels.ceil_div(taps, depth) * depth
    if geom.groups * cols * k_padded >= 2**31:
        raise ValueError(f"conv2d: kernel_h*kernel_w*channels = {taps} taps per group are "
                         "too many for the tensor-core kernels")
    return k_padded


@functools.lru_cache(maxsize=256)
def _geometry(geom):
    """The leading geometry arguments (CONVOLUTION_MMA_GEOMETRY_PARAMS)."""
    (top, _), (left, _) = geom.padding
    cin_g, cout_g = _per_group(geom)
    return _kernels.int64s(geom.batch, *geom.in_hw, *geom.out_hw) + tuple(
        numpy.int32(v) for v in (*geom.kernel, cin_g, cout_g, geom.groups, *geom.stride,
                                 top, left, *geom.dilation))


def shared_bytes(config):
    """Dynamic shared memory of one block of ``config``: kStages stages of
    the A and B tiles, 64 bytes of reduction per row."""
    rows, cols, _ = _TILES[config]
    return _STAGES * (rows + cols) * _STAGE_CHUNKS * _CHUNK_BYTES


def plan(rows, cols, groups, k_tiles, max_splits=None):
    """``(config, splits, split_tiles)``: the block tile of a ``rows x cols``
    product per group, and how its ``k_tiles`` reduction stages are cut so
    that about :data:`_TARGET_BLOCKS` blocks run, each split at least
    :data:`_MIN_SPLIT_TILES` stages deep and at most ``max_splits``
    (default :data:`_MAX_SPLITS`) splits."""
    def tiles(config):
        tile_rows, tile_cols, _ = _TILES[config]
        return _kernels.ceil_div(rows, tile_rows) * _kernels.ceil_div(cols, tile_cols) * groups

    config = 0 if tiles(0) >= _TARGET_BLOCKS else 1
    if k_tiles == 0:  # no channels or no pixels to sum over: the blocks write zeros
        return config, 1, 1
    splits = max(1, min(_MAX_SPLITS if max_splits is None else max_splits,
                        _kernels.ceil_div(_TARGET_BLOCKS, tiles(config)),
                        k_tiles // _MIN_SPLIT_TILES))
    split_tiles = _kernels.ceil_div(k_tiles, splits)
    return config, _kernels.ceil_div(k_tiles, split_tiles), split_tiles


def _packed(xp, w, geom, k_padded, transpose):
    """The weights as ``[groups, cols, k_padded]``, reduction index
    contiguous and zero past its end: ``cols`` = C_out/groups and k = (i, j,
    c_in) for the forward, ``cols`` = C_in/groups and k = (i, j, c_out) with
    ``transpose`` (the input gradient)."""
    if geom.layout == "NCHW":
        w = w.transpose(2, 3, 1, 0)  # to (kh, kw, C_in/groups, C_out)
    kh, kw, cin_g, c_out = w.shape
    groups, cout_g = geom.groups, c_out // geom.groups
    w = w.reshape(kh, kw, cin_g, groups, cout_g)
    if transpose:
        w = w.transpose(3, 2, 0, 1, 4).reshape(groups, cin_g, kh * kw * cout_g)
    else:
        w = w.transpose(3, 4, 0, 1, 2).reshape(groups, cout_g, kh * kw * cin_g)
    if w.shape[2] == k_padded:  # whole stages already (most layers): one copy
        return xp.ascontiguousarray(w)
    packed = xp.zeros(w.shape[:2] + (k_padded,), dtype=w.dtype)
    packed[:, :, :w.shape[2]] = w
    return packed
