"""The NumPy path of max_pool2d and its gradient (see :mod:`cupyconv.pooling`
for the semantics): a running pick over the window's taps for any window,
the 2x1 window in cache-sized blocks, and where numba is installed the
fused loops of :mod:`._fused` instead of most of NumPy's passes.
"""

import contextlib
import functools
import math

import numpy

from .. import _args, _kernels, _parallel
from . import _fused


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


def forward(x, pool, want_indices):
    """``(out, indices or None)`` of max_pool2d of ``x`` (validated, of
    geometry ``pool``)."""
    if pool.is_2x1:
        return _forward_2x1(x, pool, want_indices)
    return _forward(x, pool, want_indices)


def backward(grad_out, x, indices, pool):
    """The gradient of max_pool2d with respect to ``x``, from ``indices``
    where given, else from picks recomputed from ``x``."""
    if pool.is_2x1:
        return _backward_2x1(grad_out, x, indices, pool)
    if indices is None:
        indices = _forward(x, pool, True)[1]
    return _backward(grad_out, indices, pool)


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
#: an element at a time: where each loop overtakes the other (figures:
#: docs/kernels.rst, pooling's design notes).
_FUSED_FORWARD_PIXELS = 4
_FUSED_BACKWARD_PIXELS = 32


def _rows_of(pool, a):
    """Images ``a`` (input- or output-sized) as the fused loops see them:
    (planes, H, W * inner), C-contiguous (see :meth:`._geometry.PoolGeometry.rows`)."""
    planes, _, inner = pool.rows()
    _, _, h, w = _args.spatial_shape(a.shape, pool.layout)
    return numpy.ascontiguousarray(a).reshape(planes, h, w * inner)


def _window_of(pool):
    """The window as the fused loops take it (see :mod:`cupyconv.pooling._fused`)."""
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
    if out.size == 0:  # the loops divide by the row's length
        return out, indices if want_indices else None
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
    if grad_in.size == 0:  # the loops divide by the row's length
        return grad_in
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
# PoolGeometry.rows), its windows as (planes, pairs, top/bottom, row), and works
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


def _pair_blocks(pool, itemsize, block_bytes=None):
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


def _in_blocks(work, blocks):
    """``work(planes, windows, scratch)`` for every block, the blocks shared
    among the cores' threads, each with its :class:`cupyconv._parallel.Scratch`."""
    _parallel.for_each_share_with_scratch(
        lambda block, scratch: work(*block, scratch), blocks)


def _pair_positions(pool, pairs):
    """``h*W + w`` of the top row of the first ``pairs`` 2x1 windows, shaped
    (pairs, row) like the planes' rows."""
    _, row, inner = pool.rows()
    return (numpy.arange(0, 2 * pairs * pool.w, 2 * pool.w)[:, None]
            + numpy.arange(row) // inner)


def _row_pairs(a, pool):
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
    images, windows = _row_pairs(x, pool)
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
        _in_blocks(block_in_place if in_place else block, _pair_blocks(pool, x.dtype.itemsize))
    if pool.oh > pairs:
        best[:, pairs] = images[:, pool.h - 1]
        if want_indices:
            at[:, pairs] = _pair_positions(pool, 1)[0] + (pool.h - 1) * pool.w
    return out, indices


def _in_place_block_bytes(pool, itemsize):
    """Block size of the 2x1 backward in place: the fewest blocks of at most
    ``_IN_PLACE_BLOCK_BYTES`` that give each thread an even share, and no
    smaller than ``_BLOCK_BYTES`` (small inputs stay on fewer threads)."""
    share = _kernels.ceil_div(math.prod(pool.in_shape) * itemsize, _parallel.CPUS)
    per_thread = max(1, _kernels.ceil_div(share, _IN_PLACE_BLOCK_BYTES))
    return max(_BLOCK_BYTES, _kernels.ceil_div(share, per_thread))


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
    fused loop per range of windows (:mod:`._fused`), which reads
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
    rows_out, windows_out = _row_pairs(grad_in.view(bits), pool)
    grads = _rows_of(pool, grad_out)
    if indices is None:
        images, windows = _row_pairs(x, pool)
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
        blocks = _pair_blocks(pool, itemsize, _in_place_block_bytes(pool, itemsize))
        _in_blocks(in_place, blocks)
    else:
        _in_blocks(through_buffers, _pair_blocks(pool, itemsize))
    if pool.oh > pairs:  # with ceil_mode an odd last row is its own window
        last_picked = True if indices is None else (
            picks[:, pairs] == _pair_positions(pool, 1)[0] + (pool.h - 1) * pool.w)
        rows_out[:, pool.h - 1] = _kept(grads[:, pairs], last_picked).view(bits)
    elif pool.h % 2:
        rows_out[:, pool.h - 1] = 0  # in no window
    return grad_in


