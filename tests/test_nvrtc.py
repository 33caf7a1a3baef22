"""Every .cu family compiles with NVRTC exactly as ``cupy.RawModule`` compiles
it (CuPy's include directories and flags, every name expression), for sm_80
and sm_90.  Needs CuPy and NVRTC but no GPU; skipped where they are missing.

CI installs both (``.ci/run``), so a source that nvcc accepts but NVRTC
rejects -- a missing header, a host-only construct -- fails there, not on a
user's first GPU call.
"""

import pytest

from cupyconv import _kernels

# The skips are per test, not for the module: a module skipped whole is not
# collected, and the kernel coverage test runs only when every file is.


@pytest.fixture(scope="module")
def nvrtc():
    compiler = pytest.importorskip("cupy.cuda.compiler", reason="CuPy is not installed")
    try:
        compiler._get_nvrtc_version()
    except Exception as exc:  # a missing libnvrtc raises its own error types
        pytest.skip(f"NVRTC is not available: {type(exc).__name__}: {exc}")
    return compiler


@pytest.fixture(scope="module")
def core():
    return pytest.importorskip("cupy._core.core", reason="CuPy is not installed")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("family", sorted(_kernels.FAMILIES))
def test_family_compiles_with_nvrtc(nvrtc, core, monkeypatch, family, arch):
    # CuPy asks the current device whether to emit PTX or a cubin; without a
    # device, answer for it: PTX for the virtual architecture.
    monkeypatch.setattr(nvrtc, "_get_arch_for_options_for_nvrtc",
                        lambda arch: (f"-arch=compute_{arch[3:]}", "ptx"))
    source_dir = _kernels.cuda_source_dir()
    options = core.assemble_cupy_compiler_options(
        _kernels.COMPILE_OPTIONS + (f"-I{source_dir}",))
    ptx, mapping = nvrtc.compile_using_nvrtc(
        (source_dir / f"{family}.cu").read_text(), options, arch=arch,
        filename=f"{family}.cu", name_expressions=_kernels.FAMILIES[family],
        cache_in_memory=True)
    assert set(mapping) == set(_kernels.FAMILIES[family])
    for mangled in mapping.values():
        assert mangled.encode() in ptx
