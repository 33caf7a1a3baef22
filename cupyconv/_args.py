"""Argument normalisation shared by every op: pairs, axes, padding forms,
layouts, dtypes and output sizes.  Every error names the argument at fault.
"""

import operator

import numpy

LAYOUTS = ("NHWC", "NCHW")
FLOAT_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
                numpy.dtype(numpy.float64))


def as_int(value, name):
    """``value`` as a Python int; bools, floats and other types are rejected."""
    if isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, not {type(value).__name__} ({value!r})"
        ) from None


def pair(value, name, minimum=None):
    """``value`` (an int or a length-2 sequence of ints) as a tuple ``(a, b)``.

    With ``minimum`` set, both entries must be at least ``minimum``.
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be an int or a pair of ints, got {len(value)} "
                f"values: {value!r}"
            )
        result = (as_int(value[0], f"{name}[0]"), as_int(value[1], f"{name}[1]"))
    else:
        v = as_int(value, name)
        result = (v, v)
    if minimum is not None and min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def normalize_axes(axes, ndim, name="axes"):
    """``axes`` (an int or a sequence of ints, negatives allowed) as a tuple of
    distinct non-negative axes of an ``ndim``-dimensional array."""
    if not isinstance(axes, (tuple, list)):
        axes = (axes,)
    result = []
    for i, axis in enumerate(axes):
        axis = as_int(axis, f"{name}[{i}]")
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"{name}[{i}] = {axis} is out of range for an array of ndim {ndim}"
            )
        axis %= ndim
        if axis in result:
            raise ValueError(f"{name} repeats axis {axis}: {tuple(axes)!r}")
        result.append(axis)
    return tuple(result)


def per_axis(value, count, name, minimum=0):
    """``value`` (an int or one int per axis) as a tuple of ``count`` ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != count:
            raise ValueError(
                f"{name} has {len(value)} entries but axes has {count}"
            )
        result = tuple(as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    else:
        result = (as_int(value, name),) * count
    if any(v < minimum for v in result):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def check_layout(layout):
    """``layout`` checked to be ``"NHWC"`` or ``"NCHW"``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    return layout


def check_ndim(a, ndim, name):
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")


def spatial_shape(shape, layout):
    """``(N, C, H, W)`` of a 4-D shape in ``layout``."""
    if layout == "NHWC":
        n, h, w, c = shape
    else:
        n, c, h, w = shape
    return n, c, h, w


def common_float_dtype(**arrays):
    """The one floating dtype (float16/32/64) shared by every non-None array."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be float16, float32 or float64, got {dtype}"
            )
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} is {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"arguments must share one dtype: {listed}")
    return next(iter(dtypes.values()))


def conv_output_size(size, kernel, stride, pad_before, pad_after, dilation):
    """Output length of a convolution along one axis:
    ``(size + pad_before + pad_after - dilation*(kernel-1) - 1) // stride + 1``."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def conv_padding(padding, kernel, stride, dilation, size):
    """Explicit padding ``((top, bottom), (left, right))`` from any accepted form.

    ``padding`` is an int, ``(ph, pw)``, ``((top, bottom), (left, right))``,
    ``"valid"`` (no padding) or ``"same"`` (output size ``ceil(size/stride)``;
    an odd total puts the extra row/column at the bottom/right, as JAX and
    TensorFlow do).  ``kernel``, ``stride``, ``dilation`` and ``size`` are
    ``(h, w)`` pairs.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0), (0, 0))
        if padding == "same":
            result = []
            for k, s, d, n in zip(kernel, stride, dilation, size):
                out = -(-n // s)
                total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
                result.append((total // 2, total - total // 2))
            return tuple(result)
        raise ValueError(
            f"padding must be 'valid', 'same', an int or pairs, got {padding!r}"
        )
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
        isinstance(p, (tuple, list)) for p in padding
    ):
        result = (pair(padding[0], "padding[0]"), pair(padding[1], "padding[1]"))
    else:
        ph, pw = pair(padding, "padding")
        result = ((ph, ph), (pw, pw))
    if min(result[0] + result[1]) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return result


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    """Output length of a max-pool along one axis, PyTorch's rule: with
    ``ceil_mode`` the last window must start inside the input or the left
    padding, never in the right padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = span // stride + 1
    return out
