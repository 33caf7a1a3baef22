"""Shared fixtures: ``cpu_kernels`` (CUDA kernels on the CPU) and ``gpu``.

Every test that uses the ``cpu_kernels`` fixture is given the
``cpu_kernels`` marker, so ``pytest -m cpu_kernels`` selects exactly the
CPU-executed kernel tests (test_kernels_cpu.py re-runs them that way under
AddressSanitizer).  Tests marked ``run_last`` run after all others (the
kernel coverage test reads what the others launched).
"""

import pathlib
import sys

import pytest

import cupyconv

TESTS_DIR = pathlib.Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `import cpu_cuda` under any import mode
    sys.path.insert(0, str(TESTS_DIR))

import cpu_cuda  # noqa: E402

#: config.stash entry: whether this session runs every test of tests/
#: (the coverage test is only meaningful then).
FULL_SUITE = pytest.StashKey[bool]()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cpu_kernels: runs CUDA kernels on the CPU through tests/cpu_cuda (given "
        "automatically to tests that use the cpu_kernels fixture)")
    config.addinivalue_line("markers", "run_last: run after every other test")
    config.stash[FULL_SUITE] = True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    # tryfirst: the markers must be there before -m deselects.
    for item in items:
        if "cpu_kernels" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cpu_kernels)
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)
    collected = {item.path for item in items}
    if any(path not in collected for path in TESTS_DIR.glob("test_*.py")):
        config.stash[FULL_SUITE] = False


def pytest_deselected(items):
    if items:
        items[0].config.stash[FULL_SUITE] = False


@pytest.fixture
def cpu_kernels():
    """Run cupyconv's kernels on NumPy arrays through the CPU executor.

    Inside the test, public functions called with NumPy arrays take their GPU
    code path; the kernels are the ``cuda/*.cu`` files built with g++, and
    ``numpy.empty`` returns poisoned arrays (NaN / 0xA5 bytes) so unwritten
    output elements fail comparisons.  Yields the provider.
    """
    reason = cpu_cuda.compiler_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot build CPU kernels: {reason}")
    with cpu_cuda.cpu_kernels() as provider:
        yield provider


@pytest.fixture
def gpu():
    """The ``cupy`` module; skips the test (with the reason) without a GPU."""
    reason = cupyconv.gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no GPU: {reason}")
    import cupy

    return cupy


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        reason = cupyconv.gpu_unavailable_reason()
        if reason is not None:
            pytest.skip(f"no GPU: {reason}")
