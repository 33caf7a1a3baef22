"""Independent NumPy references for the number formats the kernels use."""

import numpy as np


def tf32_reference(x):
    """float32 ``x`` rounded to TF32 (10 mantissa bits, to nearest, ties away
    from zero), chosen between the two neighbouring TF32 values by their
    distance in float64; NaN -> the canonical NaN 0x7FFFFFFF, infinities kept."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    # NaN and infinities go through the arithmetic too (and are put back
    # below): no warnings for them.
    with np.errstate(invalid="ignore", over="ignore"):
        low = (bits & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
        exponent = ((bits & np.uint32(0x7F800000)) >> 23).astype(np.int64)
        ulp = np.ldexp(1.0, np.maximum(exponent, 1) - 127 - 10)  # subnormals: the same ulp
        high = low + np.copysign(ulp, low)
        x64 = x.astype(np.float64)
        pick_high = np.abs(x64 - high) <= np.abs(x64 - low)  # ties away from zero
        out = np.where(pick_high, high, low).astype(np.float32)
    special = ~np.isfinite(x)
    out[special] = x[special]
    out[np.isnan(x)] = np.uint32(0x7FFFFFFF).view(np.float32)
    return out
