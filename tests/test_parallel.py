"""The NumPy path's thread pools: shares, blocks, errors, BLAS threads and a
forked child."""

import ctypes
import multiprocessing
import sys
import threading
import time

import numpy as np
import pytest

from cupyconv import _parallel


def test_every_item_once_and_errors_surface(monkeypatch):
    monkeypatch.setattr(_parallel, "CPUS", 3)
    seen = []
    _parallel.for_each_share(seen.extend, list(range(10)))
    assert sorted(seen) == list(range(10))

    def fail(share):
        if 1 in share:
            raise RuntimeError("share failed")
    with pytest.raises(RuntimeError, match="share failed"):
        _parallel.for_each_share(fail, [0, 1, 2])


@pytest.mark.parametrize("cpus", [1, 2, 5])
def test_ranges_cover_every_item_once(monkeypatch, cpus):
    monkeypatch.setattr(_parallel, "CPUS", cpus)
    big = _parallel.MIN_PARALLEL_BYTES
    for count in (0, 1, 3, 7, 100):
        parts = _parallel.ranges(count, big)
        assert len(parts) == min(count, cpus)
        assert [i for lo, hi in parts for i in range(lo, hi)] == list(range(count))
        assert all(hi > lo for lo, hi in parts)
        assert _parallel.ranges(count, big - 1) == ([(0, count)] if count else [])


@pytest.mark.parametrize("cpus", [1, 2, 5])
def test_copyto_splits_any_first_axis(monkeypatch, cpus):
    monkeypatch.setattr(_parallel, "CPUS", cpus)
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_BYTES", 0)
    for shape in [(7, 3, 2), (1, 5), (3,), ()]:
        src = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
        dst = np.zeros_like(src)
        _parallel.copyto(dst, src)
        np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("limited", [False, True])
def test_every_block_once_with_its_thread_state(monkeypatch, limited):
    monkeypatch.setattr(_parallel, "CPUS", 3)
    monkeypatch.setattr(_parallel, "blas_threads_limited", lambda: limited)
    states = _parallel.for_each_block(
        lambda block, state: state.append(block), list(range(20)), scratch=list)
    assert len(states) == (3 if limited else 1)
    assert sorted(b for state in states for b in state) == list(range(20))

    fixed = _parallel.for_each_block(lambda block, state: state.append(block),
                                     list(range(8)), scratch=list, fixed_shares=True)
    assert fixed == ([[0, 3, 6], [1, 4, 7], [2, 5]] if limited else [list(range(8))])

    def fail(block, state):
        if block == 7:
            raise RuntimeError("block failed")
    with pytest.raises(RuntimeError, match="block failed"):
        _parallel.for_each_block(fail, list(range(20)))


@pytest.mark.skipif(not _parallel.blas_threads_limited(),
                    reason="needs OpenBLAS >= 0.3.27 under NumPy and 2+ cores")
def test_blocks_run_with_single_threaded_blas():
    """On every thread that runs blocks BLAS runs one thread (the
    setter returns the count it replaces)."""
    limit = _parallel._blas_thread_limit()
    states = _parallel.for_each_block(
        lambda block, state: state.append(limit(1)), [0, 1, 2, 3], scratch=list)
    assert {count for state in states for count in state} == {1}


def _blas_thread_count():
    """A getter of the process's OpenBLAS thread count, under the names
    OpenBLAS builds export it as."""
    library = ctypes.CDLL(_parallel._blas_candidates()[0])
    for name in ("openblas_get_num_threads", "openblas_get_num_threads64_",
                 "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads"):
        if hasattr(library, name):
            return getattr(library, name)
    pytest.skip("this OpenBLAS exports no known thread-count getter")


@pytest.mark.skipif(not _parallel.blas_threads_limited(),
                    reason="needs OpenBLAS >= 0.3.27 under NumPy and 2+ cores")
def test_blas_thread_count_is_put_back():
    """Blocks hold BLAS to one thread only while they run, also when calls
    from several threads overlap: the caller's BLAS is as fast after."""
    count = _blas_thread_count()
    prior = _parallel._blas_thread_limit()(2)  # whatever earlier tests left
    before = count()
    assert before == 2
    seen = []

    def blocks():
        _parallel.for_each_block(lambda block, state: (time.sleep(0.01), seen.append(count())),
                                 list(range(6)))

    blocks()
    assert count() == before
    callers = [threading.Thread(target=blocks) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert count() == before
    assert set(seen) == {1}
    _parallel._blas_thread_limit()(prior)


def _child_uses_pool(queue):
    seen = []
    _parallel.for_each_share(seen.extend, [1, 2, 3, 4])
    states = _parallel.for_each_block(lambda block, state: state.append(block),
                                      [5, 6], scratch=list)
    queue.put(sorted(seen + [b for state in states for b in state]))


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
def test_forked_child_gets_its_own_pool(monkeypatch):
    """A child forked after the parent used the pool does not wait forever
    on the parent's threads, which it does not have."""
    monkeypatch.setattr(_parallel, "CPUS", 2)
    _parallel.for_each_share(list, [1, 2])  # the parent's pools now exist
    _parallel.for_each_block(lambda block, state: None, [1, 2])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_uses_pool, args=(queue,))
    child.start()
    child.join(timeout=20)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert queue.get(timeout=5) == [1, 2, 3, 4, 5, 6]
