"""Shared fixtures: ``path`` (a test body run on each of cupyconv's paths),
``cpu_kernels`` (CUDA kernels on the CPU) and ``gpu``.

``path`` runs the test once per path named by its ``paths`` marker (all of
:data:`PATHS` without one): ``"numpy"`` (NumPy alone), ``"numba"`` (NumPy
with the numba loops), ``"cpu_kernels"`` (the CUDA kernels on the CPU
executor), ``"gpu"`` (CuPy, skipped without a GPU).  The test moves its
inputs with ``path.asarray`` and its results back with ``path.asnumpy``
(or calls ``path.run``, which does both), and computes what the NumPy path
gives with ``path.on_numpy``.

Every test that runs kernels on the CPU (the ``cpu_kernels`` fixture, or
``path`` on ``"cpu_kernels"``) is given the ``cpu_kernels`` marker, so
``pytest -m cpu_kernels`` selects exactly the CPU-executed kernel tests
(test_kernels_cpu.py re-runs them that way under AddressSanitizer), and
those on ``"gpu"`` the ``gpu`` marker (``pytest -m gpu``).  Tests
marked ``run_last`` run after all others (the kernel coverage test reads
what the others launched).  Float64 references and case records live in
``reference.py``.
"""

import contextlib
import pathlib
import sys

import numpy
import pytest

import cupyconv
from cupyconv.pooling import _fused

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
        "automatically to tests that use the cpu_kernels fixture or the "
        "cpu_kernels path)")
    config.addinivalue_line("markers", "run_last: run after every other test")
    config.addinivalue_line(
        "markers", "paths(*names): the paths the path fixture runs the test on")
    config.stash[FULL_SUITE] = True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    # tryfirst: the markers must be there before -m deselects.
    for item in items:
        on_path = getattr(item, "callspec", None) and item.callspec.params.get("path")
        if "cpu_kernels" in getattr(item, "fixturenames", ()) or on_path == "cpu_kernels":
            item.add_marker(pytest.mark.cpu_kernels)
        if on_path == "gpu":
            item.add_marker(pytest.mark.gpu)
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)
    collected = {item.path for item in items}
    if any(path not in collected for path in TESTS_DIR.glob("test_*.py")):
        config.stash[FULL_SUITE] = False


def pytest_deselected(items):
    if items:
        items[0].config.stash[FULL_SUITE] = False


#: Every path a public function can take.
PATHS = ("numpy", "numba", "cpu_kernels", "gpu")


def pytest_generate_tests(metafunc):
    if "path" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "path" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return  # a test's own argument named path, not this fixture
    marker = metafunc.definition.get_closest_marker("paths")
    metafunc.parametrize("path", marker.args if marker else PATHS, indirect=True)


class Path:
    """The path a test runs on: ``name`` (one of :data:`PATHS`) and ``xp``,
    the array module of its arrays."""

    def __init__(self, name, xp):
        self.name, self.xp = name, xp

    def asarray(self, a):
        """A NumPy array ``a`` as this path's array (a copy on the GPU)."""
        return self.xp.asarray(a) if self.name == "gpu" else a

    @staticmethod
    def asnumpy(a):
        return cupyconv.asnumpy(a)

    def run(self, function, *args, **kwargs):
        """``function`` on this path: NumPy array arguments moved to it, the
        result (or each of a tuple of results) back as NumPy arrays."""
        def move(value):
            return self.asarray(value) if isinstance(value, numpy.ndarray) else value

        result = function(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
        if isinstance(result, tuple):
            return tuple(map(self.asnumpy, result))
        return self.asnumpy(result)

    def numpy(self):
        """Context: compute on the NumPy path (with numba where installed),
        the reference a kernel path is compared with."""
        if self.name == "cpu_kernels":
            return cpu_cuda.numpy_path()
        return contextlib.nullcontext()

    def on_numpy(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` of NumPy arrays on the NumPy path."""
        with self.numpy():
            return function(*args, **kwargs)

    def __repr__(self):
        return self.name


@pytest.fixture
def path(request):
    """The test body on one path (see the module docstring); ``numpy.empty``
    is poisoned on the CPU paths, so that an element left unwritten shows."""
    name = request.param
    if name == "gpu":
        reason = cupyconv.gpu_unavailable_reason()
        if reason is not None:
            pytest.skip(f"no GPU: {reason}")
        import cupy

        yield Path(name, cupy)
        return
    with contextlib.ExitStack() as stack:
        if name == "numpy":
            stack.enter_context(_fused.numpy_only())
            stack.enter_context(cpu_cuda.poisoned_empty())
        elif name == "numba":
            pytest.importorskip("numba")
            assert _fused.pool_loops(numpy.dtype(numpy.float32)) is not None
            stack.enter_context(cpu_cuda.poisoned_empty())
        elif name == "cpu_kernels":
            reason = cpu_cuda.compiler_unavailable_reason()
            if reason is not None:
                pytest.skip(f"cannot build CPU kernels: {reason}")
            stack.enter_context(cpu_cuda.cpu_kernels())
        else:
            raise ValueError(f"unknown path {name!r}; the paths are {PATHS}")
        yield Path(name, numpy)


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
