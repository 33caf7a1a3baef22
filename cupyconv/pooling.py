"""2-D max-pooling over the H and W axes of NHWC or NCHW images, with its
gradient.

Which element a window picks is defined once and kept everywhere (values,
indices, gradient, NumPy path and CUDA kernels): the first maximum in
row-major window order; a NaN beats every number, and of several NaNs the
last in window order wins, as in PyTorch's kernels.  Padding is never picked
(it acts as -inf, or the dtype's minimum for integers).  The values are the
picked elements, except that the NumPy 2x1 path takes them with
``numpy.maximum`` where it runs NumPy's ufuncs, which may answer a tie of
-0.0 and +0.0 with either zero (equal values; the indices still name the
first).

The 2x1 window with stride (2, 1) -- two rows into one, as in the price-trend
CNNs this package serves -- has its own path on both devices; on the CPU it
runs in cache-sized blocks spread over the cores' threads.  Where numba is
installed, the CPU path runs most of its work in compiled loops instead
(:mod:`cupyconv._fused`).
"""

import contextlib
import functools
import math
from typing import NamedTuple

import numpy

from . import _args, _backend, _fused, _kernels, _parallel

__all__ = ["max_pool2d", "max_pool2d_backward"]

_THREADS = 256


class _Pool(NamedTuple):
    """Geometry of one pooling call: sizes, layout and the (h, w) window."""

    layout: str
    n: int
    c: int
    h: int
    w: int
    oh: int
    ow: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    def shape(self, h, w):
        """Shape of an array of ``h x w`` images in this layout."""
        return _args.activation_shape(self.n, self.c, (h, w), self.layout)

    @property
    def in_shape(self):
        return self.shape(self.h, self.w)

    @property
    def out_shape(self):
        return self.shape(self.oh, self.ow)

    @property
    def is_2x1(self):
        """Two rows into one: window (2, 1), stride (2, 1), no padding."""
        return (self.kernel == (2, 1) and self.stride == (2, 1)
                and self.padding == (0, 0) and self.dilation[0] == 1)

    def rows(self):
        """``(planes, row, inner)`` of the 2x1 kernels' (planes, H, row) view:
        row element ``l`` is image column ``l // inner``."""
        if self.layout == "NHWC":
            return self.n, self.w * self.c, self.c
        return self.n * self.c, self.w, 1


def _normalize(x, kernel_size, stride, padding, dilation, ceil_mode, layout):
    layout = _args.check_layout(layout)
    kernel, stride, padding, dilation = _args.pool_window(
        kernel_size, stride, padding, dilation)
    n, c, h, w = _args.spatial_shape(x.shape, layout)
    oh, ow = _args.pool_output_shape(
        (h, w), kernel, stride, padding, dilation, ceil_mode)
    return _Pool(layout, n, c, h, w, oh, ow, kernel, stride, padding, dilation)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, *,
               ceil_mode=False, layout="NHWC", return_indices=False):
    """Maximum over each ``kernel_size`` window of every image and channel.

    Along each spatial axis (as in :func:`torch.nn.functional.max_pool2d`)::

        out = (size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1

    rounded up instead of down with ``ceil_mode``, where a last window must
    still start inside the input or the leading padding.  Padding never wins:
    it acts as -inf (the dtype's minimum for integers).  A window picks its
    first maximum in row-major order; a window holding a NaN gives NaN (its
    last NaN, as PyTorch picks).  For example ``x`` of shape
    ``(N, 32, 15, C)`` pooled 2x1 (``kernel_size=(2, 1)``, stride defaulting
    to it) gives
    ``(N, (32 - 2) // 2 + 1, (15 - 1) // 1 + 1, C) = (N, 16, 15, C)``.

    Parameters
    ----------
    x : array_like
        Images, 4-D: ``(N, H, W, C)`` for ``layout="NHWC"``, ``(N, C, H, W)``
        for ``"NCHW"``.  float16/32/64, bfloat16 (``ml_dtypes.bfloat16``,
        pooled in float32) or any signed or unsigned integer dtype.  Not
        modified.
    kernel_size : int or (int, int)
        Window height and width, each ``>= 1``.
    stride : int or (int, int), optional
        Step between windows, each ``>= 1``; defaults to ``kernel_size``.
    padding : int or (int, int), optional
        Implicit -inf rows/columns on both sides, ``0 <= padding <=
        kernel_size // 2`` per axis.
    dilation : int or (int, int), optional
        Spacing between window taps, each ``>= 1``.
    ceil_mode : bool, optional
        Round the output size up (PyTorch's rule), keeping a partial last
        window.
    layout : {"NHWC", "NCHW"}, optional
        Axis order of ``x`` and of the results.
    return_indices : bool, optional
        Also return where each maximum came from.

    Returns
    -------
    out : ndarray
        Maxima of ``x``'s dtype, ``(N, OH, OW, C)`` or ``(N, C, OH, OW)``.
    indices : ndarray of int64
        Only with ``return_indices``: the flat index ``h*W + w`` of each
        maximum within its input plane, PyTorch's convention.  It can be given
        to :func:`max_pool2d_backward`.

    Raises
    ------
    ValueError
        ``x`` not 4-D; an unknown layout; sizes below 1; padding above
        ``kernel_size // 2``; a window larger than the padded input (an output
        size below 1) or, with dilation, a window with no input element.
    TypeError
        Non-integer sizes, a non-bool flag, an unsupported dtype (bool,
        complex, ...).

    See Also
    --------
    max_pool2d_backward : the gradient with respect to ``x``.

    Notes
    -----
    On the CPU, where numba is installed (``pip install "cupyconv[jit]"``),
    every dtype but float16 runs in loops it compiles
    (:mod:`cupyconv._fused`) rather than in NumPy's ufuncs, with the same
    results: several times faster for windows other than 2x1, and for the
    2x1 window with indices.  The first call of a process compiles them, or
    loads them from numba's cache.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.array([3, 1, 5, 7, 2, 2]).reshape(1, 3, 2, 1)  # NHWC
    >>> out, indices = cc.max_pool2d(x, (2, 1), return_indices=True)
    >>> out[0, :, :, 0]
    array([[5, 7]])
    >>> indices[0, :, :, 0]
    array([[2, 3]])
    >>> cc.max_pool2d(x, (2, 1), ceil_mode=True)[0, :, :, 0]
    array([[5, 7],
           [2, 2]])
    >>> cc.max_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 3, stride=1,
    ...               padding=1, layout="NCHW")[0, 0]
    array([[ 5.,  6.,  7.,  7.],
           [ 9., 10., 11., 11.],
           [13., 14., 15., 15.],
           [13., 14., 15., 15.]])
    """
    xp = _backend.dispatch(x=x)
    x = _args.native_4d(x, "x", xp)
    if _args.is_bfloat16(x.dtype):
        # Every bfloat16 is a float32, and the maxima come back exactly.
        result = max_pool2d(x.astype(numpy.float32), kernel_size, stride, padding, dilation,
                            ceil_mode=ceil_mode, layout=layout, return_indices=return_indices)
        if return_indices:
            return result[0].astype(x.dtype), result[1]
        return result.astype(x.dtype)
    if _kernels.c_type(x.dtype) is None:
        raise TypeError(
            f"x must have a float or integer dtype, got {x.dtype}")
    if not isinstance(return_indices, (bool, numpy.bool_)):
        raise TypeError(f"return_indices must be a bool, got {return_indices!r}")
    pool = _normalize(x, kernel_size, stride, padding, dilation, ceil_mode, layout)
    if _backend.use_kernels(xp):
        out, indices = _forward_kernels(x, pool, return_indices)
    elif pool.is_2x1:
        out, indices = _forward_2x1(x, pool, return_indices)
    else:
        out, indices = _forward(x, pool, return_indices)
    return (out, indices) if return_indices else out


def max_pool2d_backward(grad_out, x, kernel_size, stride=None, padding=0,
                        dilation=1, *, ceil_mode=False, layout="NHWC",
                        indices=None):
    """Gradient of :func:`max_pool2d` with respect to ``x``.

    Each window's gradient goes to the one element it picked (its first
    maximum, or last NaN) and is summed where windows overlap, in a fixed
    order, so results are deterministic.  Tied elements other than the pick
    get nothing.  Shapes: ``grad_out`` is ``max_pool2d(x, ...)``'s output
    shape; the result is ``x.shape``.

    Parameters
    ----------
    grad_out : array_like
        Gradient with respect to ``max_pool2d``'s output, of ``x``'s dtype.
    x : array_like
        The input of the forward call, float16/32/64 or bfloat16 (whose
        gradients are summed in float32 and rounded once).  Without ``indices``
        the picks are recomputed from it; with them only its shape is used.
    kernel_size, stride, padding, dilation, ceil_mode, layout
        As given to :func:`max_pool2d`.
    indices : array_like of int64, optional
        The indices that ``max_pool2d(..., return_indices=True)`` returned for
        the same ``x`` and arguments (as PyTorch's
        ``max_pool2d_with_indices_backward`` takes them); spares recomputing
        the picks.  An index that does not point into its own window
        contributes nothing.

    Returns
    -------
    ndarray
        The gradient with respect to ``x``: ``x``'s shape and dtype.

    Raises
    ------
    ValueError
        Any error of :func:`max_pool2d`; ``grad_out`` or ``indices`` not of
        the output's shape.
    TypeError
        ``grad_out`` and ``x`` not sharing one float dtype; ``indices`` not
        int64.

    See Also
    --------
    max_pool2d : the forward pass.

    Notes
    -----
    On the CPU, where numba is installed (``pip install "cupyconv[jit]"``),
    the work runs in loops it compiles (:mod:`cupyconv._fused`) rather
    than in NumPy's ufuncs, with the same result bit for bit; see
    :func:`max_pool2d`.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.array([[1.0, 4.0, 4.0, 2.0]]).reshape(1, 1, 1, 4)  # NCHW
    >>> cc.max_pool2d_backward(np.ones((1, 1, 1, 3)), x, (1, 2), stride=1,
    ...                        layout="NCHW")[0, 0]
    array([[0., 2., 1., 0.]])
    >>> x = np.array([2.0, 2.0, 1.0, 3.0]).reshape(1, 2, 2, 1)  # NHWC
    >>> out, indices = cc.max_pool2d(x, (2, 1), return_indices=True)
    >>> cc.max_pool2d_backward(np.array([10.0, 20.0]).reshape(1, 1, 2, 1), x,
    ...                        (2, 1), indices=indices)[0, :, :, 0]
    array([[10.,  0.],
           [ 0., 20.]])
    """
    xp = _backend.dispatch(grad_out=grad_out, x=x, indices=indices)
    grad_out = _args.native_4d(grad_out, "grad_out", xp)
    x = _args.native_4d(x, "x", xp)
    dtype = _args.common_float_dtype(bfloat16=True, grad_out=grad_out, x=x)
    if _args.is_bfloat16(dtype):
        # Picks and sums in float32 (exact picks, one rounding of each sum).
        return max_pool2d_backward(
            grad_out.astype(numpy.float32), x.astype(numpy.float32), kernel_size, stride,
            padding, dilation, ceil_mode=ceil_mode, layout=layout, indices=indices,
        ).astype(dtype)
    pool = _normalize(x, kernel_size, stride, padding, dilation, ceil_mode, layout)
    if grad_out.shape != pool.out_shape:
        raise ValueError(
            f"grad_out must have the output's shape {pool.out_shape}, "
            f"got {grad_out.shape}")
    if indices is not None:
        indices = _args.native(indices, xp)
        if indices.dtype != numpy.int64:
            raise TypeError(f"indices must be int64, got {indices.dtype}")
        if indices.shape != pool.out_shape:
            raise ValueError(
                f"indices must have the output's shape {pool.out_shape}, "
                f"got {indices.shape}")
    if _backend.use_kernels(xp):
        return _backward_kernels(grad_out, x, indices, pool)
    if pool.is_2x1:
        return _backward_2x1(grad_out, x, indices, pool)
    if indices is None:
        indices = _forward(x, pool, True)[1]
    return _backward(grad_out, indices, pool)


# --- NumPy path --------------------------------------------------------------
# Arrays are handled as (N, H, W, C)-shaped views (NCHW ones transposed, no
# copy), so one code path serves both layouts.  Picks are applied with integer
# arithmetic on the elements' bits, which is exact for every dtype (NaN and inf
# included) and several times faster than masked copies (numpy.where).

def _hwc(a, layout):
    return a if layout == "NHWC" else a.transpose(0, 2, 3, 1)


def _bits(a):
    """``a`` viewed as unsigned integers of its item size (no copy)."""
    return a.view(numpy.dtype(f"u{a.dtype.itemsize}"))


def _select(old, new, take, out):
    """``out = new if take else old``, bit for bit: ``old + (new - old) * take``
    on unsigned views, wrapping.  ``out`` may be ``old``."""
    old, out = _bits(old), _bits(out)
    new = _bits(new)
    diff = numpy.subtract(new, old)
    diff *= take
    numpy.add(old, diff, out=out)


def _kept(a, keep):
    """``a`` where ``keep`` else +0, bit for bit (a gradient masked by a pick)."""
    return numpy.multiply(_bits(a), keep).view(a.dtype)


def _beats(new, best, out=None, nan_possible=None):
    """Where ``new``, a later tap, replaces ``best`` as a window's pick:
    strictly greater, or a NaN.  ``nan_possible=False`` from a caller that
    screened ``new`` already skips the screen here."""
    wins = numpy.greater(new, best, out=out)
    if nan_possible is None:
        # numpy.max is NaN if any element is: a cheap screen before the search.
        nan_possible = new.dtype.kind == "f" and new.size and numpy.isnan(numpy.max(new))
    if nan_possible:
        wins |= numpy.isnan(new)
    return wins


def _tap_span(size, out, tap, stride, pad, dilation):
    """For window tap ``tap`` along one axis: the outputs ``[o0, o1)`` whose
    tap lies inside the input, and the input positions they read."""
    offset = tap * dilation - pad  # input position of output 0's tap
    o0 = max(0, -(offset // stride))
    o1 = min(out, (size - 1 - offset) // stride + 1)
    if o1 <= o0:
        return None
    first = o0 * stride + offset
    return slice(o0, o1), numpy.arange(first, first + (o1 - o0) * stride, stride)


def _taps(pool):
    """Every window tap (i, j) that lands in the input for some output, in
    row-major order: (output rows, output columns, input rows, input columns,
    flat input positions ``h*W + w`` shaped (rows, columns, 1))."""
    for i in range(pool.kernel[0]):
        rows = _tap_span(pool.h, pool.oh, i, pool.stride[0], pool.padding[0],
                         pool.dilation[0])
        if rows is None:
            continue
        for j in range(pool.kernel[1]):
            cols = _tap_span(pool.w, pool.ow, j, pool.stride[1], pool.padding[1],
                             pool.dilation[1])
            if cols is None:
                continue
            (out_rows, hs), (out_cols, ws) = rows, cols
            in_rows = slice(hs[0], hs[-1] + 1, pool.stride[0])
            in_cols = slice(ws[0], ws[-1] + 1, pool.stride[1])
            at = (hs[:, None] * pool.w + ws)[:, :, None]
            yield out_rows, out_cols, in_rows, in_cols, at


def _forward(x, pool, want_indices):
    """Any window: a running pick over the kh*kw taps, each an elementwise
    compare of strided views (outputs whose tap is in the padding skip it),
    or where numba is installed one fused loop over output rows."""
    loops = _fused.pool_loops(x.dtype)
    if loops is not None:
        return _forward_fused(loops, x, pool, want_indices)
    out = numpy.empty(pool.out_shape, x.dtype)
    indices = numpy.empty(pool.out_shape, numpy.int64) if want_indices else None
    images, best = _hwc(x, pool.layout), _hwc(out, pool.layout)
    # Whether an output already holds a real element: its first in-bounds tap
    # takes it whatever the (uninitialised) value there.
    filled = numpy.zeros((pool.oh, pool.ow, 1), bool)
    for out_rows, out_cols, in_rows, in_cols, at in _taps(pool):
        tap = images[:, in_rows, in_cols]
        current = best[:, out_rows, out_cols]
        take = _beats(tap, current)
        take |= ~filled[out_rows, out_cols]
        _select(current, tap, take, out=current)
        if want_indices:
            current_at = _hwc(indices, pool.layout)[:, out_rows, out_cols]
            _select(current_at, numpy.broadcast_to(at, current_at.shape), take,
                    out=current_at)
        filled[out_rows, out_cols] = True
    return out, indices


def _backward(grad_out, indices, pool):
    """Any window: each tap adds the gradients of the windows that picked it.
    Per input element the windows come in tap order, as in the gather kernel
    and the fused loop; float16 sums in float32 like the kernel, so all
    round alike."""
    loops = _fused.pool_loops(grad_out.dtype)
    if loops is not None:
        return _backward_fused(loops, grad_out, indices, pool)
    sums = numpy.zeros(pool.in_shape, _kernels.accumulator_dtype(grad_out.dtype))
    grad_in = _hwc(sums, pool.layout)
    grads, picks = _hwc(grad_out, pool.layout), _hwc(indices, pool.layout)
    for out_rows, out_cols, in_rows, in_cols, at in _taps(pool):
        picked = picks[:, out_rows, out_cols] == at
        grad_in[:, in_rows, in_cols] += _kept(grads[:, out_rows, out_cols], picked)
    return sums.astype(grad_out.dtype, copy=False)


#: Channels per pixel (C in NHWC, 1 in NCHW) from which the fused loops of
#: the general window run a pixel at a time, vectorised along C, rather than
#: an element at a time.  Measured on the 3x3 window, stride 2 (one thread,
#: the 2-vCPU AMD EPYC): the forward by pixels took 2.5x the time of the one
#: by elements at C = 1, 0.66x at C = 4; the backward by taps 8.9x the time
#: of the one by windows at C = 1, 0.94x at C = 16, 0.62x at C = 32.
_FUSED_FORWARD_PIXELS = 4
_FUSED_BACKWARD_PIXELS = 32


def _rows_of(pool, a):
    """Images ``a`` (input- or output-sized) as the fused loops see them:
    (planes, H, W * inner), C-contiguous (see :meth:`_Pool.rows`)."""
    planes, _, inner = pool.rows()
    _, _, h, w = _args.spatial_shape(a.shape, pool.layout)
    return numpy.ascontiguousarray(a).reshape(planes, h, w * inner)


def _window_of(pool):
    """The window as the fused loops take it (see :mod:`cupyconv._fused`)."""
    return (*pool.kernel, *pool.stride, *pool.padding, *pool.dilation,
            pool.w, pool.rows()[2])


def _forward_fused(loops, x, pool, want_indices):
    """:func:`_forward` by the fused loops, split by output rows."""
    planes, _, inner = pool.rows()
    out = numpy.empty(pool.out_shape, x.dtype)
    indices = numpy.empty(pool.out_shape if want_indices else (planes, pool.oh, 0),
                          numpy.int64)
    rows, best = _rows_of(pool, x), _rows_of(pool, out)
    best_at = indices.reshape(planes, pool.oh, pool.ow * inner if want_indices else 0)
    loop = (loops.pool_forward_by_pixels if inner >= _FUSED_FORWARD_PIXELS
            else loops.pool_forward_by_elements)
    _parallel.for_each_range(
        functools.partial(loop, rows, _window_of(pool), best, best_at, want_indices),
        planes * pool.oh, x.nbytes)
    return out, indices if want_indices else None


def _backward_fused(loops, grad_out, indices, pool):
    """:func:`_backward` by the fused loops (float32 and float64, which sum
    in their own dtype), split by planes, each zeroed by the thread that
    sums into it, while it is in cache."""
    planes, _, inner = pool.rows()
    grad_in = numpy.empty(pool.in_shape, grad_out.dtype)
    picks, grads = _rows_of(pool, indices), _rows_of(pool, grad_out)
    window, sums = _window_of(pool), _rows_of(pool, grad_in)
    if inner >= _FUSED_BACKWARD_PIXELS:
        loop = functools.partial(loops.pool_backward_by_taps, picks, grads, window, sums,
                                 grad_in.dtype.type(0))
    else:
        row_of, column_of = numpy.divmod(numpy.arange(pool.h * pool.w), pool.w)
        loop = functools.partial(loops.pool_backward_by_windows, picks, grads, window,
                                 row_of, column_of, sums)
    _parallel.for_each_range(loop, planes, grad_in.nbytes)
    return grad_in


# The 2x1 path sees an array as (planes, H, row) like the 2x1 kernels (see
# _Pool.rows), its windows as (planes, pairs, top/bottom, row), and works
# block by block: whole planes, or a run of windows of one plane.  A block's
# few passes then run in cache, and the blocks are shared among the CPU cores
# (NumPy releases the GIL in its loops), as PyTorch spreads its pooling over
# its threads.  NumPy's ufuncs run several times slower on rows spaced apart
# (they copy them through small buffers) than on contiguous arrays, so each
# block first copies the rows it compares into contiguous buffers (copies
# take no such detour), and every ufunc runs on contiguous operands.  The
# detour is NumPy's choice while its ufunc buffer (numpy.setbufsize, 8192
# elements) is longer than a row: with the buffer at most a row long, ufuncs
# on long rows spaced apart run in place, faster than copying the rows
# first, which the forward without indices and the backward use to skip
# their copies (see _row_sized_buffer).

#: Bytes of input per block of the 2x1 path.
_BLOCK_BYTES = 1 << 21

#: Rows of at least this many bytes have the 2x1 path run its ufuncs on them
#: in place; on shorter ones the ufuncs' cost per row outweighs the copies
#: saved.
_IN_PLACE_ROW_BYTES = 1024

#: Bytes of input per block, at most, of the 2x1 backward in place: its four
#: passes gain less from blocks that stay in cache than they lose to the GIL
#: hand-offs of more blocks.
_IN_PLACE_BLOCK_BYTES = 1 << 22


def _blocks(pool, itemsize, block_bytes=None):
    """(plane slice, window-row slice) blocks covering the 2x1 windows, each
    about ``block_bytes`` (default ``_BLOCK_BYTES``) of input: whole planes
    when they are smaller, else runs of windows of one plane."""
    block_bytes = block_bytes or _BLOCK_BYTES
    planes, row, _ = pool.rows()
    pairs = pool.h // 2
    if pairs == 0:
        return []
    pair_bytes = max(1, 2 * row * itemsize)
    if pairs * pair_bytes <= block_bytes:
        step = block_bytes // (pairs * pair_bytes)
        return [(slice(p, p + step), slice(0, pairs))
                for p in range(0, planes, step)]
    run = max(1, block_bytes // pair_bytes)
    return [(slice(p, p + 1), slice(k, min(k + run, pairs)))
            for p in range(planes) for k in range(0, pairs, run)]


class _Buffers:
    """One thread's scratch arrays for one call, kept across its blocks:
    fresh memory for every block would cost a page fault per 4 KiB."""

    def __init__(self):
        self._flat = {}

    def get(self, name, shape, dtype):
        size = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            flat = self._flat[name] = numpy.empty(size, dtype)
        return flat[:size].reshape(shape)


def _in_blocks(work, blocks):
    """``work(planes, windows, buffers)`` for every block, the blocks shared
    among the cores' threads (see :mod:`cupyconv._parallel`)."""
    def run_share(share):
        buffers = _Buffers()
        for planes, windows in share:
            work(planes, windows, buffers)

    _parallel.for_each_share(run_share, blocks)


def _pair_positions(pool, pairs):
    """``h*W + w`` of the top row of the first ``pairs`` 2x1 windows, shaped
    (pairs, row) like the planes' rows."""
    _, row, inner = pool.rows()
    return (numpy.arange(0, 2 * pairs * pool.w, 2 * pool.w)[:, None]
            + numpy.arange(row) // inner)


def _windows(a, pool):
    """Images ``a`` as (planes, H, row) and their 2x1 windows as a (planes,
    pairs, top/bottom, row) view of it."""
    planes, row, _ = pool.rows()
    rows = _rows_of(pool, a)
    pairs = pool.h // 2
    return rows, rows[:, :2 * pairs].reshape(planes, pairs, 2, row)


def _contiguous_rows(windows, top, buffers):
    """The top and bottom rows of ``windows`` (a block) copied to ``top`` and
    to a buffer, contiguous; returns both."""
    bottom = buffers.get("bottom", top.shape, top.dtype)
    numpy.copyto(top, windows[:, :, 0])
    numpy.copyto(bottom, windows[:, :, 1])
    return top, bottom


def _in_place(pool, itemsize):
    """Whether the 2x1 path runs its ufuncs on the rows in place (long
    rows, see the note above ``_BLOCK_BYTES``)."""
    return pool.rows()[1] * itemsize >= _IN_PLACE_ROW_BYTES


@contextlib.contextmanager
def _row_sized_buffer(pool):
    """NumPy's ufunc buffer cut to one row (a multiple of 16 elements, as
    NumPy requires) in this thread, so that ufuncs on rows spaced apart run
    on them in place; put back on exit."""
    row = pool.rows()[1]
    saved = numpy.setbufsize(min(numpy.getbufsize(), max(16, row // 16 * 16)))
    try:
        yield
    finally:
        numpy.setbufsize(saved)


def _forward_2x1(x, pool, want_indices):
    """2x1: rows 2k and 2k+1 compared elementwise.  An odd last row is
    dropped, or with ``ceil_mode`` is a window of its own."""
    planes, row, _ = pool.rows()
    pairs = pool.h // 2
    images, windows = _windows(x, pool)
    out = numpy.empty(pool.out_shape, x.dtype)
    best = out.reshape(planes, pool.oh, row)
    indices = numpy.empty(pool.out_shape, numpy.int64) if want_indices else None
    at = indices.reshape(planes, pool.oh, row) if want_indices else None
    top_at = _pair_positions(pool, pairs)
    # With indices the rows are read twice (comparison and maximum), which
    # contiguous copies make cheaper, or once by a fused loop where numba is
    # installed; the maximum alone reads them in place.
    loops = _fused.pool_loops(x.dtype) if want_indices else None
    in_place = not want_indices and _in_place(pool, x.dtype.itemsize)

    def block(plane, pair, buffers):
        block_best = best[plane, pair]  # contiguous: a whole plane or rows of one
        if in_place:
            top, bottom = windows[plane, pair, 0], windows[plane, pair, 1]
        else:
            top, bottom = _contiguous_rows(windows[plane, pair], block_best, buffers)
        if want_indices:
            block_at = at[plane, pair]
            numpy.copyto(block_at, _beats(  # 0 top, 1 bottom
                bottom, top, out=buffers.get("wins", block_best.shape, bool)))
            block_at *= pool.w
            block_at += top_at[pair]
        # NaN-propagating, so equal to the pick (a tie of -0.0 and +0.0 may
        # give either zero).
        numpy.maximum(top, bottom, out=block_best)

    def block_in_place(plane, pair, buffers):
        with _row_sized_buffer(pool):
            block(plane, pair, buffers)

    if loops is not None:
        _parallel.for_each_range(
            functools.partial(loops.pool2x1_forward, images, _pair_positions(pool, 1)[0],
                              pool.w, best, at),
            planes * pairs, x.nbytes)
    else:
        _in_blocks(block_in_place if in_place else block, _blocks(pool, x.dtype.itemsize))
    if pool.oh > pairs:
        best[:, pairs] = images[:, pool.h - 1]
        if want_indices:
            at[:, pairs] = _pair_positions(pool, 1)[0] + (pool.h - 1) * pool.w
    return out, indices


def _in_place_block_bytes(pool, itemsize):
    """Block size of the 2x1 backward in place: the fewest blocks of at most
    ``_IN_PLACE_BLOCK_BYTES`` that give each thread an even share, and no
    smaller than ``_BLOCK_BYTES`` (small inputs stay on fewer threads)."""
    share = -(-math.prod(pool.in_shape) * itemsize // _parallel.CPUS)
    per_thread = max(1, -(-share // _IN_PLACE_BLOCK_BYTES))
    return max(_BLOCK_BYTES, -(-share // per_thread))


def _picks_of_windows(rows, picks):
    """Which row of each 2x1 window is its pick, as bool in ``picks``
    (planes, pairs, 2, row): the bottom where it is greater or NaN, else the
    top, so exactly one of each pair.  ``rows`` (planes, 2 * pairs, row) are
    the windows' rows, each plane's contiguous.

    Every row is compared with the one above it in a single pass in memory
    order: twice the comparisons the bottom rows need, but reading the
    input is what costs, and it streams faster in order than row by row.
    The comparisons of top rows with the previous window's bottom rows are
    then overwritten.  The NaN screen follows, on input the comparisons
    have just read."""
    flat_picks = picks.reshape(rows.shape)
    numpy.greater(rows[:, 1:], rows[:, :-1], out=flat_picks[:, 1:])
    if numpy.isnan(numpy.max(rows)):
        _beats(rows[:, 1::2], rows[:, ::2], out=picks[:, :, 1], nan_possible=True)
    numpy.logical_not(picks[:, :, 1], out=picks[:, :, 0])


def _backward_2x1(grad_out, x, indices, pool):
    """2x1: each window's gradient goes to the row it picked, found by
    comparing the two rows again or by reading ``indices``; the other row
    gets +0.  Where numba is installed, float32 and float64 go through one
    fused loop per range of windows (:mod:`cupyconv._fused`), which reads
    the input and the gradient once; what follows is the NumPy code that
    runs otherwise.  Each row's share is the gradient times a 0/1 mask of the
    picks, on the bits (exact, unlike floats: inf * 0 is NaN).  Long rows
    are written in place with NumPy's buffer cut to a row (see the note
    above _BLOCK_BYTES): a 0/1 mask of both rows of every window, then one
    multiply by the gradient broadcast over the pair.  Short rows are
    computed in contiguous buffers and then copied to the rows; there
    recomputed picks send each window to one row, so the top row's share is
    the rest of the gradient, and indices (which may pick neither row) get a
    mask each."""
    planes, row, _ = pool.rows()
    pairs = pool.h // 2
    bits = numpy.dtype(f"u{grad_out.dtype.itemsize}")
    grad_in = numpy.empty(pool.in_shape, grad_out.dtype)
    rows_out, windows_out = _windows(grad_in.view(bits), pool)
    grads = _rows_of(pool, grad_out)
    if indices is None:
        images, windows = _windows(x, pool)
    else:
        picks = _rows_of(pool, indices)
        top_at = _pair_positions(pool, pairs)
        bottom_at = top_at + pool.w

    def in_place(plane, pair, buffers):
        out = windows_out[plane, pair]  # contiguous: whole planes or rows of one
        hit = buffers.get("hit", out.shape, bool)
        with _row_sized_buffer(pool):
            if indices is None:
                _picks_of_windows(images[plane, 2 * pair.start:2 * pair.stop], hit)
            else:
                numpy.equal(picks[plane, pair], top_at[pair], out=hit[:, :, 0])
                numpy.equal(picks[plane, pair], bottom_at[pair], out=hit[:, :, 1])
            # Both rows of every window in one pass, the gradient broadcast.
            numpy.multiply(grads[plane, pair, None].view(bits), hit, out=out)

    def through_buffers(plane, pair, buffers):
        g = grads[plane, pair].view(bits)
        to_top = buffers.get("to_top", g.shape, bits)
        to_bottom = buffers.get("to_bottom", g.shape, bits)
        if indices is None:
            top, bottom = _contiguous_rows(
                windows[plane, pair], buffers.get("top", g.shape, x.dtype), buffers)
            numpy.copyto(to_bottom, _beats(bottom, top, out=buffers.get("wins", g.shape, bool)))
            numpy.multiply(g, to_bottom, out=to_bottom)
            numpy.subtract(g, to_bottom, out=to_top)  # g - g = 0 or g - 0 = g
        else:
            hit = buffers.get("hit", g.shape, bool)
            numpy.copyto(to_top, numpy.equal(picks[plane, pair], top_at[pair], out=hit))
            numpy.multiply(g, to_top, out=to_top)
            numpy.copyto(to_bottom, numpy.equal(picks[plane, pair], bottom_at[pair], out=hit))
            numpy.multiply(g, to_bottom, out=to_bottom)
        numpy.copyto(windows_out[plane, pair, 0], to_top)
        numpy.copyto(windows_out[plane, pair, 1], to_bottom)

    itemsize = grad_out.dtype.itemsize
    loops = _fused.pool_loops(grad_out.dtype)
    if loops is not None:
        zero = bits.type(0)
        if indices is None:
            loop = loops.pool2x1_backward
            args = (images, grads.view(bits), rows_out, zero)
        else:
            loop = loops.pool2x1_backward_from_indices
            args = (picks, _pair_positions(pool, 1)[0], pool.w, grads.view(bits), rows_out, zero)
        _parallel.for_each_range(functools.partial(loop, *args), planes * pairs,
                                 math.prod(pool.in_shape) * itemsize)
    elif _in_place(pool, itemsize):
        blocks = _blocks(pool, itemsize, _in_place_block_bytes(pool, itemsize))
        _in_blocks(in_place, blocks)
    else:
        _in_blocks(through_buffers, _blocks(pool, itemsize))
    if pool.oh > pairs:  # with ceil_mode an odd last row is its own window
        last_picked = True if indices is None else (
            picks[:, pairs] == _pair_positions(pool, 1)[0] + (pool.h - 1) * pool.w)
        rows_out[:, pool.h - 1] = _kept(grads[:, pairs], last_picked).view(bits)
    elif pool.h % 2:
        rows_out[:, pool.h - 1] = 0  # in no window
    return grad_in


# --- CUDA kernels (CuPy, or NumPy under the test suite's CPU executor) -------

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
    return (numpy.int32(pool.layout == "NHWC"),) + _kernels.int64s(
        pool.c, pool.h, pool.w, pool.oh, pool.ow, *pool.kernel, *pool.stride,
        *pool.padding, *pool.dilation)


def _forward_kernels(x, pool, want_indices):
    xp = _backend.array_module_of(x)
    x = _kernels.kernel_operand(x, contiguous=True)
    out = xp.empty(pool.out_shape, x.dtype)
    # Without indices the kernels get a stand-in they never write.
    indices = xp.empty(pool.out_shape if want_indices else (1,), numpy.int64)
    if out.size:
        type_name = _kernels.c_type(x.dtype)
        flag = numpy.int32(want_indices)
        if pool.is_2x1:
            kernel = _kernels.get_function("maxpool", f"maxpool2x1_fwd<{type_name}>")
            kernel(_pack_grid(pool, out.size, x.dtype.itemsize), (_THREADS,),
                   (x, out, indices, flag)
                   + _rows_args(pool)
                   + (_kernels.fast_index(out.size),))
        else:
            kernel = _kernels.get_function("maxpool", f"maxpool_fwd<{type_name}>")
            kernel(_kernels.grid_for(out.size, _THREADS), (_THREADS,),
                   (x, out, indices, flag, numpy.int64(out.size))
                   + _window_args(pool))
    return out, (indices if want_indices else None)


def _backward_kernels(grad_out, x, indices, pool):
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
        count = planes * -(-pool.h // 2) * row
        kernel = _kernels.get_function("maxpool", f"maxpool2x1_bwd<{type_name}>")
        kernel(_pack_grid(pool, count, grad_out.dtype.itemsize), (_THREADS,),
               (grad_out, values, picks, numpy.int32(with_indices), grad_in)
               + _rows_args(pool)
               + (_kernels.fast_index(count),))
        return grad_in
    if indices is None:
        indices = _forward_kernels(x, pool, True)[1]
    kernel = _kernels.get_function("maxpool", f"maxpool_bwd<{type_name}>")
    kernel(_kernels.grid_for(grad_in.size, _THREADS), (_THREADS,),
           (grad_out, _kernels.kernel_operand(indices, contiguous=True), grad_in,
            numpy.int64(grad_in.size)) + _window_args(pool))
    return grad_in
