"""The built wheel and sdist carry the CUDA sources, and an installed,
non-editable package finds every one of them."""

import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

pytest.importorskip("hatchling", reason="building needs hatchling (the test extra)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p.name for p in (ROOT / "cuda").iterdir() if p.suffix in (".cu", ".cuh"))

pytestmark = pytest.mark.slow


def run(*command, cwd=None):
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", str(out), str(ROOT))
    return out


def test_wheel_contains_sources(dist):
    wheel, = dist.glob("cupyconv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in SOURCES:
        assert f"cupyconv/cuda/{source}" in names


def test_sdist_contains_sources(tmp_path):
    pytest.importorskip("build", reason="the sdist check needs the 'build' package")
    run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path),
        str(ROOT))
    sdist, = tmp_path.glob("cupyconv-*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
    for source in SOURCES:
        assert f"cuda/{source}" in names


def test_installed_wheel_finds_every_kernel_source(dist, tmp_path):
    wheel, = dist.glob("cupyconv-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel))
    check = (
        "import cupyconv, cupyconv._kernels as k\n"
        "d = k.cuda_source_dir()\n"
        "assert 'site-packages' in str(d), d\n"
        "for family in k.FAMILIES: assert (d / (family + '.cu')).is_file(), family\n"
        "print(sorted(p.name for p in d.iterdir()))\n"
        "print(cupyconv.__file__)\n"
    )
    out = run(python, "-c", check, cwd=tmp_path)
    listed, location = out.strip().splitlines()
    assert str(venv) in location
    for source in SOURCES:
        assert source in listed
