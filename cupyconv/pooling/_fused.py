"""Fused CPU loops, compiled by numba where it is installed (the ``jit`` extra).

A NumPy ufunc is one pass over memory, and much of the NumPy path's pooling
takes several.  The 2x1 backward compares each window's rows, screens them
for NaN, turns the picks into a mask and multiplies the gradient by it; the
general window runs a compare and a select per tap over strided views.  One
loop instead reads the input once and writes the result once.  numba
compiles such loops from the Python below; without it, and for float16 (to
which numba gives no arithmetic on the CPU), callers run their NumPy code,
which gives the same result bit for bit.

The loops release the GIL and run on :mod:`cupyconv._parallel`'s threads,
each on a range of rows, windows or planes.  numba's own parallel loops are
not used: its default threading layer aborts when two Python threads run
them at once.  They compile on first use, once per dtype (a fraction of a
second each), and numba caches them on disk (``cache=True``) for later
processes, where it finds a directory it may write to.
"""

import contextlib
import functools
import types

import numpy

__all__ = ["numba_version", "numpy_only", "pool_loops"]

#: Dtypes the loops take: the pool's but float16.  (Gradients are float32
#: or float64.)
DTYPES = frozenset(map(numpy.dtype, (
    "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64")))

_numpy_only = False


def pool_loops(dtype):
    """The compiled pooling loops for arrays of ``dtype``, a namespace of
    the functions below without their leading underscore, or None: numba
    not installed, ``dtype`` not taken, or inside :func:`numpy_only`."""
    if _numpy_only or dtype not in DTYPES:
        return None
    return _compiled()


@contextlib.contextmanager
def numpy_only():
    """Run the NumPy code instead of the loops within the block, for tests
    and benchmarks that compare both; it switches them off in every thread."""
    global _numpy_only
    saved, _numpy_only = _numpy_only, True
    try:
        yield
    finally:
        _numpy_only = saved


def numba_version():
    """numba's version, or None where it is not installed."""
    numba = _numba()
    return None if numba is None else numba.__version__


@functools.cache
def _numba():
    try:
        import numba
    except ImportError:  # not installed, or not for this NumPy
        return None
    return numba


@functools.cache
def _compiled():
    numba = _numba()
    if numba is None:
        return None
    try:
        return _jit_loops(numba.njit(nogil=True, cache=True))
    except RuntimeError:  # no writable cache directory: compile in each process
        return _jit_loops(numba.njit(nogil=True))


def _jit_loops(jit):
    return types.SimpleNamespace(
        pool2x1_forward=jit(_pool2x1_forward),
        pool2x1_backward=jit(_pool2x1_backward),
        pool2x1_backward_from_indices=jit(_pool2x1_backward_from_indices),
        pool_forward_by_pixels=jit(_pool_forward_by_pixels),
        pool_forward_by_elements=jit(_pool_forward_by_elements),
        pool_backward_by_taps=jit(_pool_backward_by_taps),
        pool_backward_by_windows=jit(_pool_backward_by_windows))


# The loops see arrays as the 2x1 path does: (planes, H, row) images, their
# windows rows 2k and 2k+1 of a plane, numbered plane * pairs + k; gradients
# as unsigned integers of their item size, so that moving one is exact.  Each
# call does the windows [first, stop).  ``zero`` is a 0 of the gradients'
# type: a literal 0 would be int64, which numba unifies with uint64 as
# float64.  Elements are loaded before the comparisons and stored through
# conditional expressions, not if statements, so that LLVM vectorises the
# picks as selects: a branch per element is mispredicted on random data
# (docs/kernels.rst, pooling's design notes).

def _pool2x1_forward(rows, columns, width, best, best_at, first, stop):
    """Each window's pick into ``best`` and its position ``h*W + w`` into
    ``best_at``: the bottom row where it is greater or NaN, else the top;
    ``columns`` holds the image column ``w`` of each row element."""
    pairs = rows.shape[1] // 2
    for window in range(first, stop):
        plane = window // pairs
        pair = window - plane * pairs
        upper, lower = rows[plane, 2 * pair], rows[plane, 2 * pair + 1]
        out, out_at = best[plane, pair], best_at[plane, pair]
        top_at = 2 * pair * width
        for i in range(out.shape[0]):
            a, b = upper[i], lower[i]
            lower_wins = b > a or b != b
            out[i] = b if lower_wins else a
            out_at[i] = top_at + columns[i] + (width if lower_wins else 0)


def _pool2x1_backward(rows, grads, grad_rows, zero, first, stop):
    """Each window's gradient to its pick, recomputed from ``rows``: the
    bottom row where it is greater or NaN (a later NaN wins, as in PyTorch)."""
    pairs = rows.shape[1] // 2
    for window in range(first, stop):
        plane = window // pairs
        top = 2 * (window - plane * pairs)
        grad = grads[plane, top // 2]
        upper, lower = rows[plane, top], rows[plane, top + 1]
        to_upper, to_lower = grad_rows[plane, top], grad_rows[plane, top + 1]
        for i in range(grad.shape[0]):
            a, b, g = upper[i], lower[i], grad[i]
            lower_wins = b > a or b != b
            to_upper[i] = zero if lower_wins else g
            to_lower[i] = g if lower_wins else zero


def _pool2x1_backward_from_indices(picks, columns, width, grads, grad_rows,
                                   zero, first, stop):
    """Each window's gradient to the row its index ``h*W + w`` names, or to
    neither; ``columns`` holds the image column ``w`` of each row element."""
    pairs = grad_rows.shape[1] // 2
    for window in range(first, stop):
        plane = window // pairs
        pair = window - plane * pairs
        top_at = 2 * pair * width
        pick, grad = picks[plane, pair], grads[plane, pair]
        to_upper, to_lower = grad_rows[plane, 2 * pair], grad_rows[plane, 2 * pair + 1]
        for i in range(grad.shape[0]):
            at, g = pick[i] - columns[i] - top_at, grad[i]  # at 0: top row, width: bottom
            to_upper[i] = g if at == 0 else zero
            to_lower[i] = g if at == width else zero


# The general window's loops see arrays as (planes, H, W * inner): planes
# are images (NHWC, inner = C) or image channels (NCHW, inner = 1), and an
# element (h, w, c) of a plane sits at [h, w * inner + c].  ``window`` is
# (kh, kw, sh, sw, ph, pw, dh, dw, W, inner).  Each op has two loops: one
# over pixels, vectorised along C where that is long enough, and one over
# single elements.  The pixel loops index slices of ``inner`` elements with
# the loop counter: numba indexes with a computed index (``w * inner + c``)
# through a check for negative indices, which LLVM turns into gathers and
# scatters (docs/kernels.rst).  Taps count in row-major window order, as in
# the NumPy code and the CUDA kernels; a window's first tap inside the image
# is its first candidate, so padding is never picked.

def _pool_forward_by_pixels(rows, window, best, best_at, want_at, first, stop):
    """Each window's pick (its first maximum, or last NaN) into ``best``
    and, if ``want_at``, its position ``h*W + w`` into ``best_at`` (else of
    width 0), a pixel at a time.  Does output rows ``first`` to ``stop``,
    numbered ``plane * OH + oh``."""
    kh, kw, sh, sw, ph, pw, dh, dw, width, inner = window
    height, out_height = rows.shape[1], best.shape[1]
    out_width = best.shape[2] // inner
    for task in range(first, stop):
        plane = task // out_height
        oh = task - plane * out_height
        for ow in range(out_width):
            out = best[plane, oh, ow * inner:(ow + 1) * inner]
            out_at = best_at[plane, oh, ow * inner:(ow + 1) * inner]
            filled = False
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                if ih < 0 or ih >= height:
                    continue
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    if iw < 0 or iw >= width:
                        continue
                    pixel, at = rows[plane, ih, iw * inner:(iw + 1) * inner], ih * width + iw
                    if not filled:
                        out[:] = pixel
                        if want_at:
                            out_at[:] = at
                        filled = True
                    elif want_at:
                        for c in range(inner):
                            v, b, a = pixel[c], out[c], out_at[c]
                            take = (v > b) | (v != v)
                            out[c] = v if take else b
                            out_at[c] = at if take else a
                    else:
                        for c in range(inner):
                            v, b = pixel[c], out[c]
                            out[c] = v if (v > b) | (v != v) else b


def _pool_forward_by_elements(rows, window, best, best_at, want_at, first, stop):
    """As :func:`_pool_forward_by_pixels`, an element at a time."""
    kh, kw, sh, sw, ph, pw, dh, dw, width, inner = window
    height, out_height = rows.shape[1], best.shape[1]
    out_width = best.shape[2] // inner
    for task in range(first, stop):
        plane = task // out_height
        oh = task - plane * out_height
        out, out_at = best[plane, oh], best_at[plane, oh]
        for ow in range(out_width):
            for c in range(inner):
                o = ow * inner + c
                filled, b, a = False, out[o], 0
                for i in range(kh):
                    ih = oh * sh - ph + i * dh
                    if ih < 0 or ih >= height:
                        continue
                    for j in range(kw):
                        iw = ow * sw - pw + j * dw
                        if iw < 0 or iw >= width:
                            continue
                        v = rows[plane, ih, iw * inner + c]
                        take = (not filled) | (v > b) | (v != v)
                        b = v if take else b
                        a = ih * width + iw if take else a
                        filled = True
                out[o] = b
                if want_at:
                    out_at[o] = a


def _pool_backward_by_taps(picks, grads, window, sums, zero, first, stop):
    """Into ``sums`` of planes ``first`` to ``stop``, zeroed here: each
    window's gradient added to the element its index ``h*W + w`` names, if
    that is one of its taps.  Tap by tap, a pixel at a time, each tap adding
    the gradient or +0 as the NumPy code does, so that both sum alike."""
    kh, kw, sh, sw, ph, pw, dh, dw, width, inner = window
    height, out_height = sums.shape[1], grads.shape[1]
    out_width = grads.shape[2] // inner
    for plane in range(first, stop):
        sums[plane] = zero
        for i in range(kh):
            for j in range(kw):
                for oh in range(out_height):
                    ih = oh * sh - ph + i * dh
                    if ih < 0 or ih >= height:
                        continue
                    for ow in range(out_width):
                        iw = ow * sw - pw + j * dw
                        if iw < 0 or iw >= width:
                            continue
                        at = ih * width + iw
                        pick = picks[plane, oh, ow * inner:(ow + 1) * inner]
                        grad = grads[plane, oh, ow * inner:(ow + 1) * inner]
                        to = sums[plane, ih, iw * inner:(iw + 1) * inner]
                        for c in range(inner):
                            to[c] += grad[c] if pick[c] == at else zero


def _pool_backward_by_windows(picks, grads, window, row_of, column_of, sums,
                              first, stop):
    """As :func:`_pool_backward_by_taps`, window by window: each element
    gets its windows' gradients in tap order as long as the windows come
    in reverse row-major order (a later window holds the element at an
    earlier tap), and adding +0 changes no sum of gradients (they start at
    +0 and so are never -0).  ``row_of`` and ``column_of`` give ``h`` and
    ``w`` of a position ``h*W + w``, sparing a division per element."""
    kh, kw, sh, sw, ph, pw, dh, dw, width, inner = window
    out_height, positions = grads.shape[1], row_of.shape[0]
    out_width = grads.shape[2] // inner
    for plane in range(first, stop):
        sums[plane] = 0
        for oh in range(out_height - 1, -1, -1):
            top = oh * sh - ph
            for ow in range(out_width - 1, -1, -1):
                left = ow * sw - pw
                for c in range(inner):
                    at = picks[plane, oh, ow * inner + c]
                    if at < 0 or at >= positions:
                        continue
                    h, w = row_of[at], column_of[at]
                    i, j = h - top, w - left
                    if (0 <= i < kh * dh and 0 <= j < kw * dw
                            and (dh == 1 or i % dh == 0) and (dw == 1 or j % dw == 0)):
                        sums[plane, h, w * inner + c] += grads[plane, oh, ow * inner + c]
