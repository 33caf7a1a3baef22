"""Fused CPU loops, compiled by numba where it is installed (the ``jit`` extra).

A NumPy ufunc is one pass over memory, and some of the NumPy path's work
takes several.  The 2x1 pool backward compares each window's rows, screens
them for NaN, turns the picks into a mask and multiplies the gradient by it,
where one loop reads the input and the gradient once and writes the result
once, as fast as memory allows.  numba compiles such loops from the Python
below; without it, and for dtypes the loops do not take, callers run their
NumPy code, which gives the same result bit for bit.

The loops release the GIL and run on :mod:`cupyconv._parallel`'s threads,
each on a range of windows.  numba's own parallel loops are not used: its
default threading layer aborts when two Python threads run them at once.
They compile on first use, once per dtype (a fraction of a second each), and
numba caches them on disk (``cache=True``) for later processes, where it
finds a directory it may write to.
"""

import contextlib
import functools
import types

import numpy

__all__ = ["numba_version", "numpy_only", "pool2x1_loops"]

#: Dtypes the loops take: numba has no float16 arithmetic on the CPU.
DTYPES = frozenset(map(numpy.dtype, ("float32", "float64")))

_numpy_only = False


def pool2x1_loops(dtype):
    """The compiled 2x1 pool backward loops for ``dtype`` (a namespace of
    ``backward`` and ``backward_from_indices``), or None: numba not
    installed, ``dtype`` not taken, or inside :func:`numpy_only`."""
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
        backward=jit(_pool2x1_backward),
        backward_from_indices=jit(_pool2x1_backward_from_indices))


# The loops see arrays as the 2x1 path does: (planes, H, row) images, their
# windows rows 2k and 2k+1 of a plane, numbered plane * pairs + k; gradients
# as unsigned integers of their item size, so that moving one is exact.  Each
# call does the windows [first, stop).  ``zero`` is a 0 of the gradients'
# type: a literal 0 would be int64, which numba unifies with uint64 as
# float64.  Elements are loaded before the comparisons and stored through
# conditional expressions, not if statements, so that LLVM vectorises the
# picks as selects: a branch per element, mispredicted on random data, ran
# eight times slower.

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
