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
    cin_g, cout_g = _per_group(geom)
    taps = geom.kernel[0] * geom.kernel[1] * cin_g
    k_padded = _padded_depth(taps, x.dtype, geom, cout_g)
    w_packed = _packed(xp, w, geom, k_padded, transpose=False)
    axes = _cuda._ACTIVATION_AXES[geom.layout]
    xs, ys = _cuda._strides(x, axes), _cuda._strides(y, axes)
    pixels = geom.batch * math.prod(geom.out_hw)
    has_bias = bias is not None
    if has_bias:
        bias = _kernels.kernel_operand(bias)
        bias_stride = bias.strides[0] // bias.itemsize
    else:
        bias, bias_stride = y, 0  # never read
    _gemm(xp, "convolution_forward_mma", precision, x.dtype, pixels, cout_g, geom.groups,
          k_padded // _depth(x.dtype), _MAX_SPLITS,
          lambda partial: (x, w_packed, bias, y, partial) + _geometry(geom) + xs + ys
          + (numpy.int64(bias_stride), numpy.int32(has_bias), numpy.int32(k_padded)),
          lambda: (numpy.int32(_chunks_fit(x, xs, cin_g)),),
          (bias, y, geom.out_hw, ys, bias_stride, has_bias))
    return y


def input_grad(w, grad_out, geom, precision):
    """Gradient of ``conv2d`` with respect to its input on tensor cores."""
    xp = _backend.array_module_of(grad_out)
    grad_x = xp.empty(geom.in_shape, dtype=grad_out.dtype)
    if grad_x.size == 0:
        return grad_x
    grad_out = _kernels.kernel_operand(grad_out)
    cin_g, cout_g = _per_group(geom)
    taps = geom.kernel[0] * geom.kernel[1] * cout_g
    k_padded = _padded_depth(taps, grad_out.dtype, geom, cin_g)
    w_packed = _packed(xp, w, geom, k_padded, transpose=True)
    axes = _cuda._ACTIVATION_AXES[geom.layout]
    gos, gxs = _cuda._strides(grad_out, axes), _cuda._strides(grad_x, axes)
    pixels = geom.batch * math.prod(geom.in_hw)
    _gemm(xp, "convolution_input_grad_mma", precision, grad_out.dtype, pixels, cin_g,
          geom.groups, k_padded // _depth(grad_out.dtype), _MAX_SPLITS,
          lambda partial: (grad_out, w_packed, grad_x, partial) + _geometry(geom) + gos + gxs
          + (numpy.int32(k_padded),),
          lambda: (numpy.int32(_chunks_fit(grad_out, gos, cout_g)),),
          (grad_x, grad_x, geom.in_hw, gxs, 0, False))
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
    cin_g, cout_g = _per_group(geom)
    kh, kw = geom.kernel
    taps = kh * kw * cin_g
    axes = _cuda._ACTIVATION_AXES[geom.layout]
    xs, gos = _cuda._strides(x, axes), _cuda._strides(grad_out, axes)
    ws = _cuda._strides(grad_w, _cuda._WEIGHT_AXES[geom.layout])
    pixels = geom.batch * math.prod(geom.out_hw)
    depth = _depth(x.dtype)
    _gemm(xp, "convolution_weight_grad_mma", precision, x.dtype, taps, cout_g, geom.groups,
          _kernels.ceil_div(pixels, depth), _MAX_WEIGHT_GRAD_SPLITS,
          lambda partial: (x, grad_out, grad_w, partial) + _geometry(geom) + xs + gos + ws,
          lambda: (numpy.int32(_chunks_fit(x, xs, cin_g)),
                   numpy.int32(_chunks_fit(grad_out, gos, cout_g))),
          (grad_w, grad_w, (kw, cin_g), ws, 0, False))
    return grad_w


def _gemm(xp, kernel, precision, dtype, rows, cols, groups, k_tiles, max_splits, leading,
          trailing, output):
    """Launch ``kernel`` over a ``rows x cols`` product per group with
    ``k_tiles`` reduction stages: ``leading(partial)`` gives the arguments
    before ``(splits, split_tiles)``, ``trailing()`` those after.  With
    several splits, convolution_split_sum_mma then adds their partial products
    into the output, ``output = (bias, out, (mid, inner), out strides,
    bias_stride, has_bias)``, rows placed by the first three strides."""
    config, splits, split_tiles = plan(rows, cols, groups, k_tiles, max_splits)
    tile_rows, tile_cols, threads = _TILES[config]
    blocks = (_kernels.ceil_div(rows, tile_rows) * _kernels.ceil_div(cols, tile_cols)
              * groups * splits)
    if blocks > _MAX_BLOCKS or split_tiles >= 2**31:
        raise ValueError(f"conv2d: this problem needs {blocks} thread blocks, more than the "
                         f"{_MAX_BLOCKS} one CUDA launch allows; split the batch into parts")
    partial = (xp.empty((splits, groups, rows, cols), numpy.float32) if splits > 1
               else _unused_partial(xp, _kernels.device_id(xp)))
    c_type = MMA_TYPES[_dtype_name(dtype)]
    split3 = "true" if precision == "3xtf32" and c_type == "float" else "false"
    _kernels.launch(
        "convolution_mma", kernel, f"{c_type}, {split3}, {config}", (blocks,),
        leading(partial) + (numpy.int32(splits), numpy.int32(split_tiles)) + trailing(),
        threads=threads, shared_mem=shared_bytes(config))
    if splits > 1:
        bias, out, (mid, inner), strides, bias_stride, has_bias = output
        _kernels.launch(
            "convolution_mma", "convolution_split_sum_mma", c_type,
            _kernels.grid_for(groups * rows * cols),
            (partial, bias, out, numpy.int64(rows), numpy.int32(cols), numpy.int32(groups),
             numpy.int32(splits)) + _kernels.int64s(mid, inner, *strides)
            + (numpy.int64(bias_stride), numpy.int32(has_bias)))


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


def _chunks_fit(a, strides, channels):
    """Whether the 16-byte loaders may read activation ``a`` (``channels``
    per group): every chunk of ``16 // itemsize`` consecutive channels of
    one pixel, starting at a multiple of ``16 // itemsize``, contiguous and
    16-byte aligned."""
    per_chunk = _CHUNK_BYTES // a.itemsize
    return (strides[3] == 1 and channels % per_chunk == 0
            and all(int(s) % per_chunk == 0 for s in strides[:3])
            and _kernels.data_pointer(a) % _CHUNK_BYTES == 0)


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
                        _kernels.ceil_div(_TARGET_BLOCKS, tiles(config)), k_tiles // _MIN_SPLIT_TILES))
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
