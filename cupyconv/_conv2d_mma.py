"""Launch code of conv2d on tensor cores (``cuda/convolution_mma.cu``).

:mod:`cupyconv._conv2d_cuda` hands a convolution here when the products run
on tensor cores (:func:`applies`): float16 and bfloat16 always, float32 for
``precision="tf32"`` or ``"3xtf32"``, on GPUs of compute capability 8.0 or
later (and on the CPU executor).  Arrays are as in :mod:`_conv2d_cuda`.

The weights are packed once per call into ``[group][C_out/groups][Kp]``
with the reduction index ``(i, j, c_in)`` contiguous and padded with zeros
to a whole number of pipeline stages: a copy the size of ``w``, small next
to the activations, that lets every weight load be one aligned 16-byte
``cp.async`` whatever ``w``'s layout or strides.
"""

import functools
import math

import numpy

from . import _backend, _conv2d_cuda, _kernels

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
#: Least pipeline stages per reduction split, and most splits.
_MIN_SPLIT_TILES = 4
_MAX_SPLITS = 16


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
    layout, groups, (kh, kw) = geom.layout, geom.groups, geom.kernel
    cin_g, cout_g = geom.in_channels // groups, geom.out_channels // groups
    taps = kh * kw * cin_g
    per_chunk = _CHUNK_BYTES // x.dtype.itemsize
    depth = _STAGE_CHUNKS * per_chunk
    k_padded = -(-taps // depth) * depth
    if groups * cout_g * k_padded >= 2**31 or taps >= 2**31:
        raise ValueError(f"conv2d: kernel_h*kernel_w*C_in/groups = {taps} is too large for "
                         "the tensor-core kernels")
    w_packed = packed_weights(xp, w, geom, k_padded)
    axes = _conv2d_cuda._ACTIVATION_AXES[layout]
    xs, ys = _conv2d_cuda._strides(x, axes), _conv2d_cuda._strides(y, axes)
    vector_a = (xs[3] == 1 and cin_g % per_chunk == 0
                and all(s % per_chunk == 0 for s in xs[:3])
                and _kernels.data_pointer(x) % _CHUNK_BYTES == 0)
    pixels = geom.batch * math.prod(geom.out_hw)
    config, splits, split_tiles = plan(pixels, cout_g, groups, k_padded // depth)
    rows, cols, threads = _TILES[config]
    blocks = -(-pixels // rows) * -(-cout_g // cols) * groups * splits
    if blocks > _MAX_BLOCKS:
        raise ValueError(f"conv2d: this problem needs {blocks} thread blocks, more than the "
                         f"{_MAX_BLOCKS} one CUDA launch allows; split the batch into parts")
    has_bias = bias is not None
    if has_bias:
        bias = _kernels.kernel_operand(bias)
        bias_stride = bias.strides[0] // bias.itemsize
    else:
        bias, bias_stride = y, 0  # never read
    partial = xp.empty((splits, groups, pixels, cout_g) if splits > 1 else (1,), numpy.float32)
    c_type = MMA_TYPES[_dtype_name(x.dtype)]
    split3 = "true" if precision == "3xtf32" and c_type == "float" else "false"
    kernel = _kernels.get_function(
        "convolution_mma", f"convolution_forward_mma<{c_type}, {split3}, {config}>")
    i32 = numpy.int32
    (top, _), (left, _) = geom.padding
    kernel(
        (blocks,), (threads,),
        (x, w_packed, bias, y, partial)
        + _kernels.int64s(geom.batch, *geom.in_hw, *geom.out_hw)
        + tuple(i32(v) for v in (kh, kw, cin_g, cout_g, groups, *geom.stride, top, left,
                                 *geom.dilation))
        + xs + ys + (numpy.int64(bias_stride),)
        + tuple(i32(v) for v in (has_bias, k_padded, splits, split_tiles, vector_a)),
        shared_mem=shared_bytes(config))
    if splits > 1:
        reduce = _kernels.get_function("convolution_mma",
                                       f"convolution_forward_mma_reduce<{c_type}>")
        reduce(_kernels.grid_for(groups * pixels * cout_g), (256,),
               (partial, bias, y) + _kernels.int64s(*geom.out_hw, pixels)
               + (i32(cout_g), i32(groups), i32(splits)) + ys
               + (numpy.int64(bias_stride), i32(has_bias)))
    return y


def shared_bytes(config):
    """Dynamic shared memory of one block of ``config``: kStages stages of
    the A and B tiles, 64 bytes of reduction per row."""
    rows, cols, _ = _TILES[config]
    return _STAGES * (rows + cols) * _STAGE_CHUNKS * _CHUNK_BYTES


def plan(pixels, cout_g, groups, k_tiles):
    """``(config, splits, split_tiles)``: the block tile, and how the
    reduction's ``k_tiles`` pipeline stages are cut so that about
    :data:`_TARGET_BLOCKS` blocks run, each split at least
    :data:`_MIN_SPLIT_TILES` stages deep."""
    def tiles(config):
        rows, cols, _ = _TILES[config]
        return -(-pixels // rows) * -(-cout_g // cols) * groups

    config = 0 if tiles(0) >= _TARGET_BLOCKS else 1
    splits = max(1, min(_MAX_SPLITS, -(-_TARGET_BLOCKS // tiles(config)),
                        k_tiles // _MIN_SPLIT_TILES))
    split_tiles = -(-k_tiles // splits)
    return config, -(-k_tiles // split_tiles), split_tiles


def packed_weights(xp, w, geom, k_padded):
    """``w`` as ``[groups, C_out/groups, k_padded]``, reduction index
    ``(i, j, c_in)`` (c_in fastest) contiguous, zero past ``kh*kw*C_in/groups``."""
    if geom.layout == "NCHW":
        w = w.transpose(2, 3, 1, 0)  # to (kh, kw, C_in/groups, C_out)
    kh, kw, cin_g, c_out = w.shape
    groups = geom.groups
    taps = kh * kw * cin_g
    packed = xp.zeros((groups, c_out // groups, k_padded), dtype=w.dtype)
    packed[:, :, :taps] = w.reshape(taps, groups, c_out // groups).transpose(1, 2, 0)
    return packed
