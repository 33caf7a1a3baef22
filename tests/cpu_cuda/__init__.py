"""CPU executor for cupyconv's CUDA kernels (test support; see executor.py)."""

from .executor import (
    LAUNCHED,
    SANITIZE_ENV,
    SCHEDULE_ENV,
    SHARED_POISON_ENV,
    CpuKernel,
    CpuKernelProvider,
    KernelLaunchError,
    compiler_unavailable_reason,
    cpu_kernels,
    numpy_path,
    poisoned_empty,
    sanitizer_environment,
    source_file,
)

__all__ = [
    "LAUNCHED",
    "SANITIZE_ENV",
    "SCHEDULE_ENV",
    "SHARED_POISON_ENV",
    "CpuKernel",
    "CpuKernelProvider",
    "KernelLaunchError",
    "compiler_unavailable_reason",
    "cpu_kernels",
    "numpy_path",
    "poisoned_empty",
    "sanitizer_environment",
    "source_file",
]
