"""The geometry of a 2-D convolution: :class:`ConvGeometry`, built once per
call by :func:`conv2d_geometry` from the arguments, before the call goes to
the NumPy path (:mod:`._cpu`) or the kernels (:mod:`._cuda`).
"""

import typing

from .. import _kernels
from .._args import (activation_shape, as_int, as_sequence, check_layout,
                     check_window_fits, pair, per_geometry, spatial_shape)


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
                out = _kernels.ceil_div(n, s)
                total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
                result.append((total // 2, total - total // 2))
            return tuple(result)
        raise ValueError(
            f"padding must be 'valid', 'same', an int or pairs, got {padding!r}"
        )
    entries = as_sequence(padding)
    if entries is not None and len(entries) == 2 and all(
        as_sequence(p) is not None for p in entries
    ):
        result = (pair(entries[0], "padding[0]"), pair(entries[1], "padding[1]"))
    else:
        ph, pw = pair(padding, "padding")
        result = ((ph, ph), (pw, pw))
    if min(result[0] + result[1]) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return result


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


@per_geometry(maxsize=256)
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
    for axis, (out, size) in enumerate(zip(out_hw, (h, w))):
        check_window_fits(out, axis, size, padding[axis], (kh, kw), dilation,
                          f"{w_name}'s kernel", x_name)
    return ConvGeometry(n, c_in, c_out, (h, w), (kh, kw), out_hw, stride,
                        padding, dilation, groups, layout)


def check_grad_out(grad_out, geom):
    """``grad_out`` must have the convolution's output shape."""
    if tuple(grad_out.shape) != geom.out_shape:
        raise ValueError(
            f"grad_out must have the convolution's output shape "
            f"{geom.out_shape} ({geom.layout}), got {tuple(grad_out.shape)}"
        )
