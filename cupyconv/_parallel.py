"""Sharing the NumPy path's memory-bound loops among the CPU cores.

NumPy releases the GIL inside its loops, so threads that each run a loop
over their own part of an array run in parallel, as PyTorch spreads its
elementwise work over its threads.  The pool is created on first use and
holds one thread per usable core but one: the calling thread takes a share
too.
"""

import concurrent.futures
import functools
import os

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


if hasattr(os, "register_at_fork"):
    # A forked child has the pool object but none of its threads: work
    # handed to it would never run.  The child makes its own on first use.
    os.register_at_fork(after_in_child=_pool.cache_clear)


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


def copyto(dst, src):
    """``numpy.copyto(dst, src)`` for arrays of one shape, split along the
    first axis among the cores when the copy is large enough to gain."""
    parts = min(CPUS, dst.shape[0] if dst.ndim else 1)
    if parts <= 1 or dst.nbytes < MIN_PARALLEL_BYTES:
        numpy.copyto(dst, src)
        return
    bounds = [i * dst.shape[0] // parts for i in range(parts + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def copy(share):
        for part in share:
            numpy.copyto(dst[part], src[part])

    for_each_share(copy, slices)
