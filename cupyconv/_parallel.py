"""Sharing the NumPy path's work among the CPU cores.

NumPy releases the GIL inside its loops and BLAS calls, so threads that each
work on their own part of an array run in parallel, as PyTorch spreads its
work over its threads.

Memory-bound loops (:func:`for_each_share`, :func:`copyto`) run on a pool of
one thread per usable core but one: the calling thread takes a share too.

Blocks of a convolution -- a gather and a matrix product each -- run through
:func:`for_each_block` on the calling thread and a second pool, BLAS held to
one thread meanwhile; each thread takes blocks one at a time as it finishes
the last.  Two things
make that faster than one block at a time with BLAS's own threads: the
gathers run in parallel too, and no BLAS thread spins idle on a core between
products while the gathers run (OpenBLAS's waiting threads do, for a while,
and take the core from the thread that gathers).  Taking blocks in turn also
lets a core slowed by other load do less of the work.  Holding BLAS to one
thread needs ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27 and later,
as NumPy's wheels ship); without it blocks run on the calling thread, one
after another, with BLAS's own threads.  Despite its name, in the pthreads
OpenBLAS of NumPy's wheels that function sets the count for the whole
process: it is held at one only while blocks run and then put back, so
BLAS calls that other threads make at the same time run single-threaded.
The pools are created on first use.
"""

import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import math
import os
import threading

import numpy

#: Cores this process may run on.
CPUS = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 1)

#: Copies smaller than this stay on the calling thread: handing work to a
#: pool thread costs tens of microseconds.
MIN_PARALLEL_BYTES = 1 << 20


@functools.cache
def _pool():
    return concurrent.futures.ThreadPoolExecutor(
        CPUS - 1, thread_name_prefix="cupyconv")


def _blas_candidates():
    """Paths of OpenBLAS libraries that may be NumPy's: those its wheel ships
    first (SciPy's wheel ships another OpenBLAS, which may be loaded too),
    then any this process has loaded (Linux; NumPy built on a system
    OpenBLAS)."""
    root = os.path.dirname(numpy.__file__)
    shipped = sorted(glob.glob(os.path.join(os.path.dirname(root), "numpy.libs", "*"))
                     + glob.glob(os.path.join(root, ".dylibs", "*")))
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]
        loaded = sorted({f[5].strip() for f in fields if len(f) == 6})
    except OSError:
        loaded = []
    return [path for path in shipped + loaded
            if "openblas" in os.path.basename(path).lower()]


@functools.cache
def _blas_thread_limit():
    """``openblas_set_num_threads_local`` of the OpenBLAS NumPy uses, or None
    where there is none (another BLAS, or an OpenBLAS before 0.3.27)."""
    for path in _blas_candidates():
        try:
            limit = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        limit.argtypes, limit.restype = [ctypes.c_int], ctypes.c_int
        return limit
    return None


def blas_threads_limited():
    """Whether :func:`for_each_block` can run blocks on several threads."""
    return CPUS > 1 and _blas_thread_limit() is not None


@functools.cache
def _blas_pool():
    return concurrent.futures.ThreadPoolExecutor(CPUS - 1, thread_name_prefix="cupyconv-blas")


_held = threading.Lock()
_holders = 0
_saved_count = None


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS held to one thread inside, and put back as it was after.  The
    count is process-wide (see above) and calls may overlap: the first one
    in saves it, the last one out restores it."""
    global _holders, _saved_count
    limit = _blas_thread_limit()
    with _held:
        if _holders == 0:
            _saved_count = limit(1)
        _holders += 1
    try:
        yield limit
    finally:
        with _held:
            _holders -= 1
            if _holders == 0:
                limit(_saved_count)


def single_threaded_blas():
    """A context in which BLAS runs on the calling thread alone, where
    :func:`blas_threads_limited` (else it changes nothing).  For products
    too small to gain from more threads: on a busy machine a call split
    over threads waits for the slowest, up to a scheduler tick."""
    if not blas_threads_limited():
        return contextlib.nullcontext()
    return _single_threaded_blas()


def _after_fork_in_child():
    """A forked child has the pool objects but none of their threads: work
    handed to them would never run, and a lock a parent's thread held stays
    held.  The child makes its own pools on first use."""
    global _held, _holders
    _pool.cache_clear()
    _blas_pool.cache_clear()
    _held, _holders = threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Scratch:
    """One thread's arrays for one call, kept across the blocks it takes:
    fresh memory for every block would cost a page fault per 4 KiB.  Every
    op's NumPy path hands one to each thread (:func:`for_each_block`,
    :func:`for_each_share_with_scratch`)."""

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype):
        """Array ``name`` of ``shape`` and ``dtype``, uninitialised: a view of
        a buffer that grows as needed and is reused by later asks."""
        size = math.prod(shape)
        flat = self._arrays.get(name)
        if flat is None or flat.size < size or flat.dtype != dtype:
            flat = self._arrays[name] = numpy.empty(size, dtype)
        return flat[:size].reshape(shape)

    def zeros(self, name, shape, dtype):
        """Array ``name`` of ``shape`` and ``dtype``, zero-filled when first
        asked for and kept as it is after: a running sum over the blocks."""
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = numpy.zeros(shape, dtype)
        return array


def for_each_share(function, items):
    """Call ``function(share)`` on up to :data:`CPUS` interleaved shares of
    the list ``items`` (share ``i`` holds items ``i, i + CPUS, ...``), the
    first on the calling thread; return when all are done.  An exception in
    any share is raised here."""
    shares = min(CPUS, len(items))
    if shares <= 1:
        function(items)
        return
    others = [_pool().submit(function, items[i::shares]) for i in range(1, shares)]
    function(items[0::shares])
    for share in others:
        share.result()


def ranges(count, nbytes):
    """``(lo, hi)`` ranges that split ``count`` items into one part per
    core when their work touches ``nbytes`` of :data:`MIN_PARALLEL_BYTES` or
    more, else into one part; none if ``count`` is 0."""
    parts = min(count, CPUS if nbytes >= MIN_PARALLEL_BYTES else 1)
    bounds = [count * i // parts for i in range(parts + 1)] if parts else []
    return list(zip(bounds, bounds[1:]))


def for_each_share_with_scratch(work, items):
    """Call ``work(item, scratch)`` for every item of the list ``items``,
    shared among the cores as :func:`for_each_share` does, each thread with
    its own :class:`Scratch`."""
    def run(share):
        scratch = Scratch()
        for item in share:
            work(item, scratch)

    for_each_share(run, items)


def for_each_range(function, count, nbytes):
    """Call ``function(lo, hi)`` for each of the :func:`ranges` of ``count``
    items (work touching ``nbytes``), shared among the cores as
    :func:`for_each_share` does."""
    def run(share):
        for lo, hi in share:
            function(lo, hi)

    for_each_share(run, ranges(count, nbytes))


def copyto(dst, src):
    """``numpy.copyto(dst, src)`` for arrays of one shape, split along the
    first axis among the cores when the copy is large enough to gain."""
    if dst.ndim == 0 or len(ranges(dst.shape[0], dst.nbytes)) <= 1:
        numpy.copyto(dst, src)
        return
    for_each_range(lambda lo, hi: numpy.copyto(dst[lo:hi], src[lo:hi]),
                   dst.shape[0], dst.nbytes)


def for_each_block(work, blocks, scratch=Scratch, *, fixed_shares=False):
    """Call ``work(block, state)`` for every item of the list ``blocks`` and
    return the list of the ``state`` objects used, one per thread in order
    (by default a :class:`Scratch`).

    Where :func:`blas_threads_limited`, up to :data:`CPUS` threads (the
    calling one first, then the pool's) each make ``state = scratch()`` and
    take blocks in turn until none is left, BLAS running single-threaded
    meanwhile.  With ``fixed_shares`` thread ``i`` takes blocks
    ``i, i + threads, ...`` instead, so what a state accumulates, and in
    which order, does not depend on timing (sums over blocks come out the
    same on every run).
    Otherwise the calling thread does every block with one ``state``.
    ``work`` must not write what another block reads or writes.  An
    exception in any block is raised here.
    """
    threads = min(CPUS, len(blocks)) if blas_threads_limited() else 1
    if threads <= 1:
        state = scratch()
        for block in blocks:
            work(block, state)
        return [state]
    shared, lock = iter(blocks), threading.Lock()
    done = object()

    def next_block(own):
        if own is not None:
            return next(own, done)
        with lock:
            return next(shared, done)

    def run(share, limit):
        limit(1)  # for an OpenBLAS whose count is per thread, as named
        state = scratch()
        own = None if share is None else iter(blocks[share::threads])
        while (block := next_block(own)) is not done:
            work(block, state)
        return state

    with _single_threaded_blas() as limit:
        futures = [_blas_pool().submit(run, i if fixed_shares else None, limit)
                   for i in range(1, threads)]
        try:
            first = run(0 if fixed_shares else None, limit)
        finally:  # the pool's threads finish before BLAS is put back
            concurrent.futures.wait(futures)
        return [first] + [future.result() for future in futures]
