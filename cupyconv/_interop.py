"""Arrays of other libraries: DLPack producers (PyTorch, JAX, ...) and Dask.

Every public op goes through :func:`interoperable`.  Calls with NumPy and CuPy
arrays (and Python numbers, lists, tuples) pass straight through.  Otherwise:

* Dask arrays (``dask.array.Array``) make the call lazy: it is handed to
  :mod:`cupyconv.dask`, which builds a graph of calls on the chunks.
* Any other argument with ``__dlpack__`` is taken without a copy through the
  DLPack protocol: CPU producers with :func:`numpy.from_dlpack`, CUDA ones
  with :func:`cupy.from_dlpack` (which hands the producer CuPy's current
  stream, so the producer's pending work is ordered before ours).  The results
  go back to the library of the first such argument in the function's
  parameter order (PyTorch's ``torch.from_dlpack``, otherwise the producer's
  ``__array_namespace__().from_dlpack``, which JAX arrays have).

The arguments of one call must live on one device; NumPy arrays count as CPU
arrays, CuPy arrays as CUDA arrays of their device.  See ``docs/ecosystem.rst``.
"""

import functools
import inspect
import sys

import numpy

from ._backend import _is_cupy_array, _type_name

__all__ = ["interoperable"]

# DLPack device types (dlpack.h: DLDeviceType).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_DEVICE_NAMES = {_DL_CPU: "cpu", _DL_CUDA: "cuda", _DL_CUDA_HOST: "cpu",
                 _DL_CUDA_MANAGED: "cuda"}

#: Types that never need a look: the fast path of every call.
_PLAIN = frozenset({numpy.ndarray, int, float, bool, str, tuple, list,
                    type(None)})


def interoperable(func):
    """Decorate a public op so that it accepts DLPack producers and Dask arrays.

    The wrapped function is called unchanged when no argument is foreign; its
    signature, name and docstring are kept (``functools.wraps``).
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not (_any_foreign(args) or (kwargs and _any_foreign(kwargs.values()))):
            return func(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return func(*args, **kwargs)  # let the op report its own misuse
        return _call_foreign(func, bound)

    return wrapper


def _any_foreign(values):
    for a in values:
        if type(a) not in _PLAIN and (is_dask_array(a) or _is_producer(a)):
            return True
    return False


def is_dask_array(a):
    """Whether ``a`` is a ``dask.array.Array`` (without importing Dask)."""
    dask_array = sys.modules.get("dask.array")
    return dask_array is not None and isinstance(a, dask_array.Array)


def _is_producer(a):
    """A DLPack producer that is not NumPy or CuPy (those run as they are)."""
    return (hasattr(type(a), "__dlpack__") and hasattr(type(a), "__dlpack_device__")
            and not isinstance(a, (numpy.ndarray, numpy.generic))
            and not _is_cupy_array(a))


def _call_foreign(func, bound):
    arguments = bound.arguments
    dask_names = [name for name, a in arguments.items() if is_dask_array(a)]
    if dask_names:
        others = [name for name, a in arguments.items() if _is_producer(a)]
        if others:
            raise TypeError(
                f"{func.__name__}: Dask arrays ({', '.join(dask_names)}) "
                f"cannot be mixed with {_type_name(arguments[others[0]])} "
                f"({', '.join(others)}); give them NumPy, CuPy or Dask arrays")
        from . import dask as cupyconv_dask

        return cupyconv_dask.call(func, bound)

    producers = {name: a for name, a in arguments.items() if _is_producer(a)}
    device = _common_device(func.__name__, arguments)
    for name, a in producers.items():
        arguments[name] = _take(func.__name__, name, a)
    indices = arguments.get("indices")
    if "indices" in producers and indices.dtype.kind in "iu" and indices.itemsize < 8:
        # JAX's default 32-bit mode turns int64 indices into int32 ones.
        arguments["indices"] = indices.astype(numpy.int64)
    result = _run_on(device, func, bound)
    give_back = _returner(next(iter(producers.values())))
    if isinstance(result, tuple):
        return tuple(give_back(r) for r in result)
    return give_back(result)


def _run_on(device, func, bound):
    if device[0] == "cuda":
        import cupy

        with cupy.cuda.Device(device[1]):
            return func(*bound.args, **bound.kwargs)
    return func(*bound.args, **bound.kwargs)


def _device_of(a):
    """``("cpu", 0)`` or ``("cuda", id)`` for an array argument, else None."""
    if isinstance(a, numpy.ndarray):
        return ("cpu", 0)
    if _is_cupy_array(a):
        return ("cuda", a.device.id)
    if not _is_producer(a):
        return None
    kind, index = a.__dlpack_device__()
    kind = int(kind)
    if kind not in _DEVICE_NAMES:
        return (f"DLPack device type {kind}", int(index))
    return (_DEVICE_NAMES[kind], 0 if _DEVICE_NAMES[kind] == "cpu" else int(index))


def _common_device(op, arguments):
    devices = {name: d for name, a in arguments.items()
               if (d := _device_of(a)) is not None}
    if len(set(devices.values())) > 1:
        described = ", ".join(
            f"{name} is {_type_name(arguments[name])} on {_device_text(d)}"
            for name, d in devices.items())
        raise ValueError(
            f"{op}: arguments live on different devices (move them to one "
            f"device first): {described}")
    device = next(iter(devices.values()))
    if device[0] not in ("cpu", "cuda"):
        raise TypeError(
            f"{op}: arguments on {_device_text(device)} are not supported "
            "(cupyconv runs on the CPU and on CUDA devices)")
    return device


def _device_text(device):
    return "the CPU" if device[0] == "cpu" else f"{device[0]}:{device[1]}"


def _take(op, name, a):
    """``a`` as a NumPy or CuPy array sharing its memory (DLPack, no copy)."""
    if getattr(a, "requires_grad", False):
        torch = sys.modules.get("torch")
        if torch is not None and not torch.is_grad_enabled():
            a = a.detach()  # no graph is being recorded: nothing to lose
        else:
            raise TypeError(
                f"{op}: {name} requires grad, and cupyconv's array functions do "
                "not record PyTorch's autograd graph; use cupyconv.torch (its "
                "conv2d, max_pool2d, dilate, undilate and the Conv2d and "
                "MaxPool2d modules are differentiable), or pass "
                f"{name}.detach() (or call under torch.no_grad()) if no "
                "gradient is wanted")
    kind = _device_of(a)[0]
    try:
        if kind == "cpu":
            return numpy.from_dlpack(a)
        try:
            import cupy
        except ImportError as exc:
            raise TypeError(
                f"{op}: {name} is a CUDA array, which needs CuPy (the cuda12 or "
                f"cuda13 extra, or cupy-cuda12x / cupy-cuda13x): {exc}") from None
        # cupy.from_dlpack passes CuPy's current stream to a.__dlpack__, so
        # the producer orders its pending work on a before that stream.
        return cupy.from_dlpack(a)
    except (BufferError, RuntimeError, ValueError) as exc:
        raise TypeError(
            f"{op}: {name} ({_type_name(a)}) cannot be taken through DLPack: "
            f"{exc}") from None


def _returner(producer):
    """A function giving a NumPy/CuPy result back as ``producer``'s kind."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(producer, torch.Tensor):
        return torch.from_dlpack
    namespace = getattr(producer, "__array_namespace__", None)
    if namespace is not None:
        from_dlpack = getattr(namespace(), "from_dlpack", None)
        if from_dlpack is not None:
            return from_dlpack
    return lambda result: result  # no known way back: NumPy or CuPy
