"""Argument normalisation shared by every op: ints, pairs, axes, layouts,
dtypes and shapes.  Every error names the argument at fault.  Each op's own
rules (output sizes, padding forms, windows) live in its ``_geometry``
module.
"""

import collections.abc
import functools
import math
import operator

import numpy

LAYOUTS = ("NHWC", "NCHW")
FLOAT_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
                numpy.dtype(numpy.float64))


#: Integer arguments must lie strictly between -LIMIT and LIMIT: sizes,
#: strides and offsets computed from them then fit the kernels' 64-bit
#: integers.
LIMIT = 2**62

#: Arrays of this many elements or more can never be made (NumPy caps an
#: array at 2**63 - 1 bytes, and float64 is the widest dtype here).
MAX_ELEMENTS = 2**60


#: Types of the arguments a geometry is cached by (see :func:`per_geometry`);
#: tuples of exact ints (or of such tuples) are keys too.
_KEY_TYPES = frozenset({int, bool, str, type(None)})


def _is_key(value):
    """Whether ``value`` can stand for itself in a cache key: an int, a
    bool, a str, None, or a tuple of ints (bools excluded: ``(1, True) ==
    (1, 1)``, but only one of them is a valid stride) or of such tuples."""
    kind = type(value)
    if kind is tuple:
        for v in value:
            if type(v) is not int and not (type(v) is tuple and _is_key(v)):
                return False
        return True
    return kind in _KEY_TYPES


def per_geometry(maxsize):
    """Decorator: cache a geometry builder's result per arguments, for calls
    whose arguments are all plain (:func:`_is_key`); other calls (lists,
    NumPy integers, arrays) build anew.  The cache is typed, so ``True`` and
    ``1`` are different keys, and holds ``maxsize`` entries at most.  A
    builder that raises caches nothing: a bad argument raises every time.
    A small call checks the same arguments at every step of a training loop,
    and checking them is most of its host time."""
    def decorate(build):
        cached = functools.lru_cache(maxsize=maxsize, typed=True)(build)

        @functools.wraps(build)
        def builder(*args, **kwargs):
            for value in args:
                if type(value) not in _KEY_TYPES and not _is_key(value):
                    return build(*args, **kwargs)
            for value in kwargs.values():
                if type(value) not in _KEY_TYPES and not _is_key(value):
                    return build(*args, **kwargs)
            return cached(*args, **kwargs)

        builder.cache_info, builder.cache_clear = cached.cache_info, cached.cache_clear
        return builder

    return decorate


def as_int(value, name):
    """``value`` as a Python int: anything NumPy takes as an integer (a Python
    or NumPy integer, a 0-d integer array, an object with ``__index__``).
    Bools, floats and other types are rejected, and so are magnitudes of
    :data:`LIMIT` or more."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, (bool, numpy.bool_)) or (
            isinstance(dtype, numpy.dtype) and dtype.kind == "b"):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        result = operator.index(value)
    except TypeError:
        described = type(value).__name__
        if isinstance(dtype, numpy.dtype):
            described += f" of {dtype}"
        raise TypeError(
            f"{name} must be an integer, not {described} ({value!r})"
        ) from None
    if abs(result) >= LIMIT:
        raise ValueError(f"{name} must be below 2**62 in magnitude, got {result}")
    return result


def as_sequence(value):
    """The entries of ``value`` as a tuple if it is a sequence -- a tuple, a
    list, an array of one or more dimensions (as nested lists), any other
    non-string sequence -- else None: a scalar, a 0-d array."""
    if isinstance(value, (str, bytes)):
        return None
    if isinstance(value, collections.abc.Sequence):
        return tuple(value)
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):
        return tuple(value.tolist())
    return None


def pair(value, name, minimum=None):
    """``value`` (an int or a length-2 sequence of ints, see
    :func:`as_sequence`) as a tuple ``(a, b)``.

    With ``minimum`` set, both entries must be at least ``minimum``.
    """
    entries = as_sequence(value)
    if entries is not None:
        value = entries
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
    entries = as_sequence(axes)
    axes = (axes,) if entries is None else entries
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
    entries = as_sequence(value)
    if entries is not None:
        value = entries
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


def native(a, xp):
    """``a`` as an ``xp`` array in the machine's byte order (a big-endian
    NumPy array is converted, as NumPy's own arithmetic does)."""
    if type(a) is xp.ndarray and a.dtype.isnative:
        return a
    a = xp.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


def native_4d(a, name, xp):
    """``a`` as a 4-D ``xp`` array in the machine's byte order; ``name`` is
    the argument's name for the error."""
    a = native(a, xp)
    check_ndim(a, 4, name)
    return a


def check_elements(shape, what):
    """Raise ``ValueError`` if an array of ``shape`` could never be made;
    ``what`` names the argument that made it so large and the array."""
    if math.prod(shape) >= MAX_ELEMENTS:
        raise ValueError(f"{what} would have shape {tuple(shape)}: more elements "
                         "than any array can hold")


def spatial_shape(shape, layout):
    """``(N, C, H, W)`` of a 4-D shape in ``layout``."""
    if layout == "NHWC":
        n, h, w, c = shape
    else:
        n, c, h, w = shape
    return n, c, h, w


def activation_shape(n, c, hw, layout):
    """Shape of ``n`` images of ``c`` channels and size ``hw`` in ``layout``."""
    h, w = hw
    return (n, h, w, c) if layout == "NHWC" else (n, c, h, w)


def is_bfloat16(dtype):
    """Whether ``dtype`` is ``ml_dtypes.bfloat16`` (known by name, so that
    ml_dtypes is imported only by whoever made such an array)."""
    return dtype.itemsize == 2 and _named_bfloat16(dtype)


@functools.lru_cache(maxsize=64)
def _named_bfloat16(dtype):
    # numpy.dtype.name is a slow property: looked up once per dtype.
    return dtype.name == "bfloat16"


def _all_native_arrays(xp, operands):
    """Whether every operand is ``None`` or an ``xp.ndarray`` (not a
    subclass) in the machine's byte order: what :func:`float_operands`
    leaves as it is."""
    array_type = xp.ndarray
    for value in operands:
        if value is not None and (type(value) is not array_type
                                  or not value.dtype.isnative):
            return False
    return True


def float_operands(xp, **operands):
    """The named operands (``None`` stays ``None``) as ``xp`` arrays in the
    machine's byte order (see :func:`native`).

    Operands given without a dtype -- Python numbers, lists, tuples -- adapt
    to the float dtype of the first operand that has one, as NumPy's "weak"
    Python scalars do (NEP 50): ``conv2d(x32, w32, [0.5, 0, -1, 2])`` adds a
    float32 bias.  Operands with a dtype keep it, so a float64 array next to
    a float32 one is still an error of :func:`common_float_dtype`.
    """
    if _all_native_arrays(xp, operands.values()):
        return tuple(operands.values())
    arrays = {name: None if value is None else native(value, xp)
              for name, value in operands.items()}
    strong = [arrays[name].dtype for name, value in operands.items()
              if value is not None and hasattr(value, "dtype")]
    target = next((dtype for dtype in strong
                   if dtype in FLOAT_DTYPES or is_bfloat16(dtype)), None)
    if target is not None:
        for name, value in operands.items():
            a = arrays[name]
            if a is not None and not hasattr(value, "dtype") and a.dtype.kind in "iuf":
                arrays[name] = a.astype(target)
    return tuple(arrays.values())


def common_float_dtype(bfloat16=False, **arrays):
    """The one floating dtype (float16/32/64, and bfloat16 if ``bfloat16``)
    shared by every non-None array."""
    first = None
    for a in arrays.values():  # the common case first: one float dtype
        if a is not None:
            if first is None:
                first = a.dtype
            elif a.dtype != first:
                break
    else:
        if first in FLOAT_DTYPES:
            return first
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES and not (bfloat16 and is_bfloat16(dtype)):
            choices = "float16, bfloat16, float32" if bfloat16 else "float16, float32"
            raise TypeError(
                f"{name} must be {choices} or float64, got {dtype}"
            )
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} is {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"arguments must share one dtype: {listed}")
    return next(iter(dtypes.values()))


def plural(n, unit):
    """``n`` and ``unit``, pluralised: "1 row", "3 rows"."""
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def check_window_fits(out, axis, size, padding, kernel, dilation, kernel_name,
                      input_name):
    """Raise ``ValueError`` unless ``out`` outputs along ``axis`` (0: H, 1: W)
    make sense: at least one, or none from an input with no element along
    the axis (a 1-row kernel, or 'same' padding, over 0 rows gives 0 rows).
    The message says which window is longer than which padded input;
    ``kernel`` and ``dilation`` are ``(h, w)`` pairs, ``padding`` is
    ``(before, after)`` along the axis, and ``kernel_name`` and
    ``input_name`` name the arguments they came from."""
    if out >= 1 or (out == 0 and size == 0):
        return
    unit = ("row", "column")[axis]
    before, after = padding
    span = dilation[axis] * (kernel[axis] - 1) + 1
    raise ValueError(
        f"{kernel_name} {tuple(kernel)} with dilation {tuple(dilation)} spans "
        f"{plural(span, unit)}, more than the {plural(size + before + after, unit)} "
        f"of the padded input ({input_name}'s {plural(size, unit)} + padding "
        f"{before}+{after})"
    )


@per_geometry(maxsize=256)
def shape_arg(value, ndim, name):
    """``value`` (a sequence of ``ndim`` non-negative ints, see
    :func:`as_sequence`: a tuple, a list, a 1-D integer array) as a tuple."""
    entries = as_sequence(value)
    if entries is None:
        raise TypeError(
            f"{name} must be a sequence of {ndim} ints, got {type(value).__name__}"
        )
    value = entries
    if len(value) != ndim:
        raise ValueError(
            f"{name} must have {ndim} entries, got {len(value)}: {tuple(value)!r}"
        )
    shape = tuple(as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    if any(v < 0 for v in shape):
        raise ValueError(f"{name} entries must be >= 0, got {shape!r}")
    return shape
