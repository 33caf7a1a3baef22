"""The arithmetic of float32 convolutions: ``precision=`` and its default.

``"highest"``
    float32 products, float32 sums: the same as the NumPy path up to the
    order of summation.
``"tf32"``
    Each float32 operand rounded to TF32 (10 mantissa bits, to nearest, ties
    away from zero, as ``cvt.rna.tf32.f32``), products summed in float32 (on
    the GPU by tensor cores).  The NumPy path rounds its operands the same
    way, so the two agree to float32 rounding error and the effect of TF32
    on a model can be seen on the CPU.
``"3xtf32"``
    Each float32 operand split into a TF32 part and a TF32 remainder and
    three tensor-core products summed (big*big + big*small + small*big):
    about float32 accuracy at tensor-core speed.  On the NumPy path it is
    ``"highest"``.

float16 and bfloat16 always multiply their own values (exactly, with float32
sums) and float64 never leaves float64: ``precision`` changes float32 only.
"""

import contextlib
import contextvars

import numpy

__all__ = ["PRECISIONS", "default_precision", "get_default_precision",
           "set_default_precision"]

#: The accepted values of ``precision=``.
PRECISIONS = ("highest", "tf32", "3xtf32")

_FLOAT32 = numpy.dtype(numpy.float32)

_process_default = "highest"
#: Set by :func:`default_precision` for the current thread or task only.
_scoped_default = contextvars.ContextVar("cupyconv_precision", default=None)


def _checked(precision, name):
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, PRECISIONS))}"
                         f"{' or None' if name == 'precision' else ''}, got {precision!r}")
    return precision


def get_default_precision():
    """The precision that ``precision=None`` means here and now.

    Returns
    -------
    str
        The innermost :func:`default_precision` of this thread (or task), else
        the process default of :func:`set_default_precision`, at first
        ``"highest"``.

    Examples
    --------
    >>> import cupyconv as cc
    >>> cc.get_default_precision()
    'highest'
    """
    scoped = _scoped_default.get()
    return _process_default if scoped is None else scoped


def set_default_precision(precision):
    """Set the process-wide default of ``precision=`` in :func:`conv2d`,
    :func:`conv2d_input` and :func:`conv2d_weight`.

    Parameters
    ----------
    precision : {'highest', 'tf32', '3xtf32'}

    Returns
    -------
    str
        The previous process default.

    Raises
    ------
    ValueError
        Any other value.

    Examples
    --------
    >>> import cupyconv as cc
    >>> previous = cc.set_default_precision("tf32")
    >>> cc.get_default_precision(), previous
    ('tf32', 'highest')
    >>> _ = cc.set_default_precision(previous)
    """
    global _process_default
    previous, _process_default = _process_default, _checked(precision, "default precision")
    return previous


@contextlib.contextmanager
def default_precision(precision):
    """Context manager: ``precision=None`` means ``precision`` inside, in
    this thread (or asyncio task) only.

    Parameters
    ----------
    precision : {'highest', 'tf32', '3xtf32'}

    Returns
    -------
    context manager
        Restores the previous default on exit.

    Raises
    ------
    ValueError
        ``precision`` not one of the choices.

    Examples
    --------
    >>> import numpy as np
    >>> import cupyconv as cc
    >>> x = np.full((1, 1, 1, 1), 1 + 2**-12, dtype=np.float32)
    >>> w = np.ones((1, 1, 1, 1), dtype=np.float32)
    >>> with cc.default_precision("tf32"):
    ...     float(cc.conv2d(x, w)[0, 0, 0, 0])  # x rounded to 10 mantissa bits
    1.0
    >>> float(cc.conv2d(x, w)[0, 0, 0, 0]) == 1 + 2**-12
    True
    """
    token = _scoped_default.set(_checked(precision, "default precision"))
    try:
        yield
    finally:
        _scoped_default.reset(token)


def resolve(precision, dtype):
    """The precision a call with ``precision=`` computes ``dtype`` in:
    ``"highest"`` for every dtype but float32 (after checking the value)."""
    precision = get_default_precision() if precision is None else _checked(precision, "precision")
    return precision if dtype == _FLOAT32 else "highest"


def round_to_tf32(a, xp=numpy):
    """float32 array ``a`` rounded to TF32 (nearest, ties away from zero), as
    a new float32 array.  Adding half a unit of the 10th mantissa bit to the
    magnitude's bits and clearing the 13 below rounds so, carrying into the
    exponent up to infinity; infinities and NaN pass unchanged."""
    bits = xp.ascontiguousarray(a, dtype=numpy.float32).view(numpy.uint32)
    rounded = (bits + numpy.uint32(0x1000)) & numpy.uint32(0xFFFFE000)
    special = (bits & numpy.uint32(0x7F800000)) == numpy.uint32(0x7F800000)
    return xp.where(special, bits, rounded).view(numpy.float32)


def rounded_operands(precision, *operands, xp=numpy):
    """The factors of a product as float32 FMA arithmetic must see them to
    compute ``precision``: rounded to TF32 for ``"tf32"`` (TF32 products are
    exact in float32, so the result is what TF32 tensor cores give up to the
    order of summation); unchanged otherwise, ``"3xtf32"`` included (exact
    float32 products are at least as accurate)."""
    if precision != "tf32":
        return operands
    return tuple(round_to_tf32(a, xp) for a in operands)
