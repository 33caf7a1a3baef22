"""Every .cu file compiles without warnings under nvcc for sm_80 and sm_90.

Each family is compiled as NVRTC compiles it for CuPy: the .cu file with every
name expression of ``_kernels.FAMILIES`` instantiated (by taking its address).
"""

import re
import shutil
import subprocess

import pytest

from cupyconv import _kernels

NVCC = shutil.which("nvcc")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH"),
]


def _instances(family, tmp_path):
    """A unit that includes the family's .cu file and takes the address of
    every name expression, so each one is compiled."""
    addresses = ",\n    ".join(
        f"reinterpret_cast<const void*>(&{name})" for name in _kernels.FAMILIES[family])
    unit = tmp_path / f"{family}_instances.cu"
    unit.write_text(
        f'#include "{family}.cu"\n'
        f"const void* cupyconv_instances[] = {{\n    {addresses}\n}};\n")
    return unit


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(family) -> (commands, result) of nvcc runs of a family for
    sm_80 and sm_90, with warnings as errors and ptxas's resource usage
    (-Xptxas -v) in ``result.stderr``; each family is compiled once, the two
    architectures in two processes at once (their stderr kept apart, so
    that each kernel's usage lines stay together)."""
    done = {}

    def compile_family(family):
        if family not in done:
            tmp_path = tmp_path_factory.mktemp(family)
            unit = _instances(family, tmp_path)
            commands = [[
                NVCC, "-std=c++17", "-c", str(unit), "-o", str(tmp_path / f"sm_{arch}.o"),
                f"-I{_kernels.cuda_source_dir()}", "-Werror", "all-warnings",
                "-Xcompiler", "-Wall,-Werror", "-Xptxas", "-v",
                "-gencode", f"arch=compute_{arch},code=sm_{arch}",
            ] for arch in ("80", "90")]
            runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for command in commands]
            stderrs = [run.communicate()[1] for run in runs]
            result = subprocess.CompletedProcess(
                commands, max(run.returncode for run in runs), "", "".join(stderrs))
            done[family] = "\n".join(" ".join(c) for c in commands), result
        return done[family]
    return compile_family


@pytest.mark.parametrize("family", sorted(_kernels.FAMILIES))
def test_family_compiles_without_warnings(family, build):
    commands, result = build(family)
    assert result.returncode == 0, f"{commands}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr


def test_every_cu_file_is_a_family():
    sources = {p.stem for p in _kernels.cuda_source_dir().glob("*.cu")}
    assert sources == set(_kernels.FAMILIES)


def test_pool_comparisons_are_exact_under_flush_to_zero(tmp_path):
    """CuPy compiles every kernel with -ftz=true, under which a float32
    comparison sees subnormals as zero.  The pool kernels compare floats
    through their bit patterns instead: the PTX holds no flushing compare."""
    unit = _instances("pooling", tmp_path)
    ptx = tmp_path / "pooling.ptx"
    command = [NVCC, "-std=c++17", "-ptx", "-ftz=true", "-arch=sm_80",
               f"-I{_kernels.cuda_source_dir()}", str(unit), "-o", str(ptx)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    assert "pooling_forward_2x1" in text and "pooling_forward_window" in text
    flushing = [line.strip() for line in text.splitlines()
                if line.strip().startswith("setp.") and ".ftz." in line]
    assert flushing == []


@pytest.mark.parametrize("arch", ["80", "90"])
def test_tensor_core_kernels_keep_everything_in_registers(build, arch):
    """ptxas -v: no spill and no stack frame (local memory) in any kernel of
    the tensor-core family: accumulators and fragments indexed by a loop
    that is not unrolled would live in local memory."""
    _, result = build("convolution_mma")
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'.*?(\d+) bytes stack "
                         r"frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                         result.stderr, flags=re.S)
    entries = [(name, *usage) for name, sm, *usage in entries if sm == arch]
    assert len(entries) == len(_kernels.FAMILIES["convolution_mma"]), result.stderr
    heavy = [entry for entry in entries if entry[1:] != ("0", "0", "0")]
    assert not heavy, f"stack frame / spill stores / spill loads: {heavy}"


@pytest.mark.parametrize("arch", ["80", "90"])
def test_large_tile_kernels_keep_everything_in_registers(build, arch):
    """ptxas -v: the 128 x 128 FMA kernels (64 accumulators a thread) fit
    the 255 registers of one thread with no spill and no stack frame."""
    _, result = build("convolution")
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"Compiling entry function '(\w+igemm128\w+)' for 'sm_(\d+)'.*?"
                         r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads\s+ptxas info\s+: Used (\d+) registers",
                         result.stderr, flags=re.S)
    entries = [(name, *usage) for name, sm, *usage in entries if sm == arch]
    expected = [name for name in _kernels.FAMILIES["convolution"] if "igemm128" in name]
    assert len(entries) == len(expected) == 3, result.stderr
    heavy = [entry for entry in entries
             if entry[1:4] != ("0", "0", "0") or int(entry[4]) > 255]
    assert not heavy, f"stack frame / spill stores / spill loads / registers: {heavy}"


def test_large_tile_kernels_compile_without_cp_async_before_sm80(tmp_path):
    """GPUs before sm_80 have no cp.async: there the pipelined kernels copy
    through registers, so the convolution family still compiles for them
    (sm_75, the oldest nvcc 13 targets) and its PTX holds no cp.async."""
    unit = _instances("convolution", tmp_path)
    ptx = tmp_path / "convolution.ptx"
    command = [NVCC, "-std=c++17", "-ptx", "-arch=sm_75",
               f"-I{_kernels.cuda_source_dir()}", str(unit), "-o", str(ptx)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    assert "convolution_forward_igemm128" in text
    assert "cp.async" not in text
