"""cupyconv: dilation, rectangular 2-D convolution and max-pooling, with
gradients, for NumPy arrays (on the CPU) and CuPy arrays (on the GPU).

Every function returns an array of the library it was given: NumPy in,
NumPy out; CuPy in, CuPy out, computed by the CUDA kernels in ``cuda/``.
"""

from ._version import __version__
from ._backend import (
    asnumpy,
    backend_info,
    get_array_module,
    gpu_available,
    gpu_unavailable_reason,
)
from ._kernels import KernelCompileError
from .convolution import conv2d, conv2d_input, conv2d_weight
from .dilation import dilate, undilate
from .pooling import max_pool2d, max_pool2d_backward
from .convolution._precision import default_precision, get_default_precision, set_default_precision

__all__ = [
    "__version__",
    "asnumpy",
    "backend_info",
    "get_array_module",
    "gpu_available",
    "gpu_unavailable_reason",
    "KernelCompileError",
    "conv2d",
    "conv2d_input",
    "conv2d_weight",
    "dilate",
    "undilate",
    "max_pool2d",
    "max_pool2d_backward",
    "default_precision",
    "get_default_precision",
    "set_default_precision",
]
