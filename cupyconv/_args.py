"""Argument normalisation shared by every op: pairs, axes, padding forms,
layouts, dtypes and output sizes.  Every error names the argument at fault.
"""

import math
import operator
import typing

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


def as_int(value, name):
    """``value`` as a Python int; bools, floats and other types are rejected,
    and so are magnitudes of :data:`LIMIT` or more."""
    if isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, not {type(value).__name__} ({value!r})"
        ) from None
    if abs(result) >= LIMIT:
        raise ValueError(f"{name} must be below 2**62 in magnitude, got {result}")
    return result


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


def native(a, xp):
    """``a`` as an ``xp`` array in the machine's byte order (a big-endian
    NumPy array is converted, as NumPy's own arithmetic does)."""
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
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def common_float_dtype(bfloat16=False, **arrays):
    """The one floating dtype (float16/32/64, and bfloat16 if ``bfloat16``)
    shared by every non-None array."""
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


def conv_output_size(size, kernel, stride, pad_before, pad_after, dilation):
    """Output length of a convolution along one axis:
    ``(size + pad_before + pad_after - dilation*(kernel-1) - 1) // stride + 1``."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def conv_padding(padding, kernel, stride, dilation, size):
    """Explicit padding ``((top, bottom), (left, right))`` from any accepted form.

    ``padding`` is an int, ``(ph, pw)``, ``((top, bottom), (left, right))``,
    ``"valid"`` (no padding) or ``"same"`` (output size ``ceil(size/stride)``;
    an odd total puts the extra row/column at the bottom/right, as JAX and
    TensorFlow do); the strings in any case, as JAX spells them "VALID" and
    "SAME".  ``kernel``, ``stride``, ``dilation`` and ``size`` are ``(h, w)``
    pairs.
    """
    if isinstance(padding, str):
        if padding.lower() == "valid":
            return ((0, 0), (0, 0))
        if padding.lower() == "same":
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


def pool_window(kernel_size, stride, padding, dilation):
    """``(kernel, stride, padding, dilation)`` of a 2-D max-pool as ``(h, w)``
    pairs.  ``stride=None`` means ``kernel_size``; padding is at most
    ``kernel_size // 2`` per axis, as in PyTorch."""
    kernel = pair(kernel_size, "kernel_size", minimum=1)
    stride = kernel if stride is None else pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    for axis, k, p in zip("hw", kernel, padding):
        if p > k // 2:
            raise ValueError(
                f"padding must be at most kernel_size // 2 along each axis, "
                f"got padding {p} for kernel_size {k} along {axis}"
            )
    return kernel, stride, padding, dilation


def pool_output_shape(size, kernel, stride, padding, dilation, ceil_mode):
    """``(OH, OW)`` of a 2-D max-pool of an ``(H, W)`` image (all ``(h, w)``
    pairs), per axis ``pool_output_size``.  Every window must hold at least one
    input element: a dilated window whose taps all fall in the padding or step
    over the image (which PyTorch answers with -inf and a meaningless index) is
    rejected."""
    if not isinstance(ceil_mode, (bool, numpy.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    shape = []
    for axis, n, k, s, p, d in zip("hw", size, kernel, stride, padding, dilation):
        out = pool_output_size(n, k, s, p, d, ceil_mode)
        if out < 1:
            raise ValueError(
                f"kernel_size {k} (dilation {d}) is larger than the input "
                f"along {axis}: {n} + 2*padding {p} < {d * (k - 1) + 1}"
            )
        # A window starting at or after row/column 0 holds its first tap
        # (the last window starts before the end, see pool_output_size), so
        # only those starting in the padding, and the last, need a look: is
        # their first tap at or after 0 still in the window and the image?
        # Without dilation the window is contiguous and reaches past the
        # padding (p <= k // 2), so none can miss.
        suspects = {*range(min(out, -(-p // s))), out - 1} if d > 1 else ()
        if any(_first_tap_misses(i * s - p, n, k, d) for i in suspects):
            raise ValueError(
                f"dilation {d} along {axis} leaves a window with no input "
                f"element (input {n}, kernel_size {k}, padding {p})"
            )
        shape.append(out)
    return tuple(shape)


def _first_tap_misses(start, n, k, d):
    """Whether a window of ``k`` taps ``d`` apart starting at ``start``
    has no tap inside ``[0, n)``."""
    first = max(0, -(start // d))
    return first >= k or start + first * d >= n


def shape_arg(value, ndim, name):
    """``value`` (a sequence of ``ndim`` non-negative ints) as a tuple."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(
            f"{name} must be a tuple of {ndim} ints, got {type(value).__name__}"
        )
    if len(value) != ndim:
        raise ValueError(
            f"{name} must have {ndim} entries, got {len(value)}: {tuple(value)!r}"
        )
    shape = tuple(as_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    if any(v < 0 for v in shape):
        raise ValueError(f"{name} entries must be >= 0, got {shape!r}")
    return shape


class ConvGeometry(typing.NamedTuple):
    """One 2-D convolution, normalised: sizes, ``(h, w)`` pairs, explicit
    padding ``((top, bottom), (left, right))`` and the output size."""

    batch: int
    in_channels: int
    out_channels: int
    in_hw: tuple
    kernel: tuple
    out_hw: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    layout: str

    @property
    def out_shape(self):
        """Shape of the convolution's output in ``layout``."""
        return activation_shape(self.batch, self.out_channels, self.out_hw, self.layout)

    @property
    def in_shape(self):
        """Shape of the convolution's input in ``layout``."""
        return activation_shape(self.batch, self.in_channels, self.in_hw, self.layout)

    @property
    def weight_shape(self):
        """Shape of the kernel: ``(kh, kw, C_in/groups, C_out)`` (NHWC) or
        ``(C_out, C_in/groups, kh, kw)`` (NCHW)."""
        (kh, kw), cin_g = self.kernel, self.in_channels // self.groups
        if self.layout == "NHWC":
            return (kh, kw, cin_g, self.out_channels)
        return (self.out_channels, cin_g, kh, kw)


def conv2d_geometry(x_shape, w_shape, stride, padding, dilation, groups, layout,
                    x_name="x", w_name="w"):
    """Check a 2-D convolution's arguments and return its :class:`ConvGeometry`.

    ``x_shape`` is ``(N, H, W, C_in)`` (NHWC) or ``(N, C_in, H, W)`` (NCHW);
    ``w_shape`` is ``(kh, kw, C_in // groups, C_out)`` or ``(C_out,
    C_in // groups, kh, kw)``.  ``x_name`` and ``w_name`` name the arguments
    the shapes came from in error messages.  The output is
    ``(H + top + bottom - dh*(kh - 1) - 1) // sh + 1`` rows by the same along W.
    """
    layout = check_layout(layout)
    groups = as_int(groups, "groups")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    n, c_in, h, w = spatial_shape(x_shape, layout)
    if layout == "NHWC":
        kh, kw, cin_per_group, c_out = w_shape
    else:
        c_out, cin_per_group, kh, kw = w_shape
    if min(kh, kw) < 1:
        raise ValueError(f"{w_name} must have a kernel of at least 1x1, got {kh}x{kw}")
    if c_in % groups:
        raise ValueError(
            f"groups={groups} does not divide the {c_in} input channels of {x_name}"
        )
    if c_out % groups:
        raise ValueError(
            f"groups={groups} does not divide the {c_out} output channels of {w_name}"
        )
    if cin_per_group * groups != c_in:
        raise ValueError(
            f"{w_name} has {cin_per_group} input channels per group but {x_name} "
            f"has {c_in} channels in {groups} group(s) ({c_in // groups} per group)"
        )
    padding = conv_padding(padding, (kh, kw), stride, dilation, (h, w))
    out_hw = tuple(
        conv_output_size(size, k, s, before, after, d)
        for size, k, s, (before, after), d in zip(
            (h, w), (kh, kw), stride, padding, dilation)
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"output size {out_hw[0]}x{out_hw[1]} is below 1: {x_name}'s padded "
            f"size {h + sum(padding[0])}x{w + sum(padding[1])} is smaller than "
            f"the dilated kernel {dilation[0] * (kh - 1) + 1}x"
            f"{dilation[1] * (kw - 1) + 1} of {w_name}"
        )
    return ConvGeometry(n, c_in, c_out, (h, w), (kh, kw), out_hw, stride,
                        padding, dilation, groups, layout)
