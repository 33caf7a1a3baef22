"""The NumPy path's thread pool: shares, errors, and a forked child."""

import multiprocessing
import sys

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
def test_copyto_splits_any_first_axis(monkeypatch, cpus):
    monkeypatch.setattr(_parallel, "CPUS", cpus)
    monkeypatch.setattr(_parallel, "MIN_PARALLEL_BYTES", 0)
    for shape in [(7, 3, 2), (1, 5), (3,), ()]:
        src = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
        dst = np.zeros_like(src)
        _parallel.copyto(dst, src)
        np.testing.assert_array_equal(dst, src)


def _child_uses_pool(queue):
    seen = []
    _parallel.for_each_share(seen.extend, [1, 2, 3, 4])
    queue.put(sorted(seen))


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
def test_forked_child_gets_its_own_pool(monkeypatch):
    """A child forked after the parent used the pool does not wait forever
    on the parent's threads, which it does not have."""
    monkeypatch.setattr(_parallel, "CPUS", 2)
    _parallel.for_each_share(list, [1, 2])  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_uses_pool, args=(queue,))
    child.start()
    child.join(timeout=20)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert queue.get(timeout=5) == [1, 2, 3, 4]
