"""Launch code of max_pool2d and its gradient on the GPU (``cuda/pooling.cu``):
CuPy arrays, or NumPy arrays under the test suite's CPU executor.
"""

import functools

import numpy

from .. import _backend, _kernels


def _pack_grid(pool, count, itemsize):
    """Grid of the 2x1 kernels: one thread per 16-byte pack of a row when the
    row length allows it (the kernel falls back to single elements if a
    pointer is not 16-byte aligned; its grid-stride loop covers the rest)."""
    row = pool.rows()[1]
    wide = 16 // itemsize
    return _kernels.grid_for(count // wide if row % wide == 0 else count)


@functools.lru_cache(maxsize=256)
def _rows_args(pool):
    """The 2x1 kernels' trailing geometry arguments."""
    planes, row, inner = pool.rows()
    return _kernels.int64s(planes, pool.h, pool.oh, row, inner, pool.w)


@functools.lru_cache(maxsize=256)
def _window_args(pool):
    """The general-window kernels' trailing geometry arguments."""
    return (numpy.int32(pool.layout == "NHWC"),) + _kernels.int64s(
        pool.c, pool.h, pool.w, pool.oh, pool.ow, *pool.kernel, *pool.stride,
        *pool.padding, *pool.dilation)


def forward(x, pool, want_indices):
    """``(out, indices or None)`` of max_pool2d of ``x`` (validated, of
    geometry ``pool``)."""
    xp = _backend.array_module_of(x)
    x = _kernels.kernel_operand(x, contiguous=True)
    out = xp.empty(pool.out_shape, x.dtype)
    # Without indices the kernels get a stand-in they never write.
    indices = xp.empty(pool.out_shape if want_indices else (1,), numpy.int64)
    if out.size:
        type_name = _kernels.c_type(x.dtype)
        flag = numpy.int32(want_indices)
        if pool.is_2x1:
            _kernels.launch("pooling", "pooling_forward_2x1", type_name,
                            _pack_grid(pool, out.size, x.dtype.itemsize),
                            (x, out, indices, flag)
                            + _rows_args(pool)
                            + (_kernels.fast_index(out.size),))
        else:
            _kernels.launch("pooling", "pooling_forward_window", type_name,
                            _kernels.grid_for(out.size),
                            (x, out, indices, flag, numpy.int64(out.size))
                            + _window_args(pool))
    return out, (indices if want_indices else None)


def backward(grad_out, x, indices, pool):
    """The gradient of max_pool2d with respect to ``x``, from ``indices``
    where given, else from picks recomputed from ``x``."""
    xp = _backend.array_module_of(grad_out)
    grad_out = _kernels.kernel_operand(grad_out, contiguous=True)
    grad_in = xp.empty(pool.in_shape, grad_out.dtype)
    if grad_in.size == 0:
        return grad_in
    type_name = _kernels.c_type(grad_out.dtype)
    if pool.is_2x1:
        with_indices = indices is not None
        # The kernel reads the picks from one of the two; the other is unread.
        values = grad_out if with_indices else _kernels.kernel_operand(x, contiguous=True)
        picks = (_kernels.kernel_operand(indices, contiguous=True) if with_indices
                 else xp.empty((1,), numpy.int64))
        planes, row, _ = pool.rows()
        count = planes * _kernels.ceil_div(pool.h, 2) * row
        _kernels.launch("pooling", "pooling_backward_2x1", type_name,
                        _pack_grid(pool, count, grad_out.dtype.itemsize),
                        (grad_out, values, picks, numpy.int32(with_indices), grad_in)
                        + _rows_args(pool)
                        + (_kernels.fast_index(count),))
        return grad_in
    if indices is None:
        indices = forward(x, pool, True)[1]
    _kernels.launch("pooling", "pooling_backward_window", type_name,
                    _kernels.grid_for(grad_in.size),
                    (grad_out, _kernels.kernel_operand(indices, contiguous=True), grad_in,
                     numpy.int64(grad_in.size)) + _window_args(pool))
    return grad_in
