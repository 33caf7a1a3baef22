"""Backend dispatch: which array library (NumPy or CuPy) a call runs on.

The rule is the one NumPy users expect from ``cupy.get_array_module``: a
``cupy.ndarray`` input runs on the GPU, anything else goes through
``numpy.asarray`` and runs on the CPU.  CuPy is never imported just to look at
an input: a CuPy array can only exist if the user already imported CuPy.
"""

import functools
import sys

import numpy

from . import _kernels

__all__ = [
    "get_array_module",
    "asnumpy",
    "gpu_available",
    "gpu_unavailable_reason",
    "backend_info",
]


def _is_cupy_array(a):
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def get_array_module(*arrays):
    """Return the array module (``numpy`` or ``cupy``) that ``arrays`` live in.

    Parameters
    ----------
    *arrays : array_like or None
        Inputs of one call.  ``None`` entries are ignored.

    Returns
    -------
    module
        ``cupy`` if any input is a ``cupy.ndarray``, otherwise ``numpy``.

    Raises
    ------
    TypeError
        If the inputs mix CuPy arrays with NumPy arrays (or other array-likes).

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> cc.get_array_module(np.ones(3), [1, 2]).__name__
    'numpy'
    """
    return dispatch(**{f"arrays[{i}]": a for i, a in enumerate(arrays)})


def dispatch(**named):
    """Return the array module of the named inputs; ``None`` values are skipped.

    Used by every op so that a mixed call names the offending arguments::

        TypeError: conv2d: arguments mix CuPy and NumPy arrays: x is a
        cupy.ndarray, w is a numpy.ndarray
    """
    for a in named.values():  # the common case first: NumPy arrays alone
        if a is not None and type(a) is not numpy.ndarray:
            break
    else:
        return numpy
    on_gpu = {name: _is_cupy_array(a) for name, a in named.items() if a is not None}
    if not any(on_gpu.values()):
        return numpy
    if not all(on_gpu.values()):
        described = ", ".join(
            f"{name} is {'a cupy.ndarray' if gpu else 'a ' + _type_name(named[name])}"
            for name, gpu in on_gpu.items()
        )
        raise TypeError(
            "arguments mix CuPy and NumPy arrays (move them to one device "
            f"first): {described}"
        )
    return sys.modules["cupy"]


def _type_name(a):
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__name__


def array_module_of(a):
    """``cupy`` for a ``cupy.ndarray``, else ``numpy`` (no checks, one input)."""
    if type(a) is numpy.ndarray:
        return numpy
    return sys.modules["cupy"] if _is_cupy_array(a) else numpy


def use_kernels(xp):
    """Whether a call on arrays of module ``xp`` runs the CUDA kernels.

    True on CuPy; also on NumPy while the test suite's CPU executor is the
    kernel provider, so that the GPU launch code runs on NumPy buffers.
    """
    return xp is not numpy or _kernels.provider_runs_on_numpy()


def asnumpy(a):
    """Return ``a`` as a ``numpy.ndarray``, copying from the GPU if needed.

    Parameters
    ----------
    a : array_like
        A CuPy array, a NumPy array or anything ``numpy.asarray`` accepts.

    Returns
    -------
    numpy.ndarray
        ``a`` itself when it already is a NumPy array.

    Examples
    --------
    >>> import cupyconv as cc
    >>> cc.asnumpy([1, 2, 3])
    array([1, 2, 3])
    """
    if _is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


@functools.lru_cache(maxsize=None)
def _probe_gpu():
    """Import CuPy and look for a device once per process: (cupy or None, reason)."""
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy is not installed ({exc})"
    except Exception as exc:  # a broken CuPy install must not break cupyconv
        return None, f"CuPy failed to import: {type(exc).__name__}: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, driver too old, no libcuda ...
        return None, f"no usable CUDA driver: {type(exc).__name__}: {exc}"
    if count < 1:
        return None, "CuPy found no CUDA device"
    return cupy, None


def gpu_available():
    """Return whether the GPU backend can run: CuPy imports and sees a device.

    Returns
    -------
    bool

    Examples
    --------
    >>> import cupyconv as cc
    >>> isinstance(cc.gpu_available(), bool)
    True
    """
    return _probe_gpu()[0] is not None


def gpu_unavailable_reason():
    """Return why the GPU backend cannot run, or ``None`` when it can.

    Returns
    -------
    str or None
        For example ``"CuPy is not installed (No module named 'cupy')"``.

    Examples
    --------
    >>> import cupyconv as cc
    >>> reason = cc.gpu_unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
    """
    return _probe_gpu()[1]


def backend_info():
    """Describe the active backend as a dict of strings.

    Returns
    -------
    dict
        ``backend`` is ``"CuPy (GPU)"`` or ``"NumPy fallback"``; with a GPU
        also ``device``, ``cuda`` and ``cupy`` versions, else ``reason``.
        ``numpy`` is NumPy's version; ``numba`` numba's, or ``"not
        installed"`` (it compiles the NumPy path's fused CPU loops).

    Examples
    --------
    >>> import cupyconv as cc
    >>> cc.backend_info()["backend"] in ("CuPy (GPU)", "NumPy fallback")
    True
    """
    cupy, reason = _probe_gpu()
    from .pooling import _fused

    info = {"numpy": numpy.__version__, "numba": _fused.numba_version() or "not installed"}
    if cupy is None:
        info.update(backend="NumPy fallback", reason=reason)
        return info
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"]
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    info.update(
        backend="CuPy (GPU)",
        device=f"{name.decode() if isinstance(name, bytes) else name} "
        f"(device {device.id}, compute capability {device.compute_capability})",
        cuda=f"{runtime // 1000}.{runtime % 1000 // 10}",
        cupy=cupy.__version__,
    )
    return info
