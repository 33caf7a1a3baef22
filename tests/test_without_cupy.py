"""The README's test command on a machine without CuPy: every test file is
still collected (none skips whole when it is imported), so the kernel
coverage test, which runs only when the whole suite does, is not skipped."""

import os
import pathlib
import subprocess
import sys

import cupyconv as cc

from conftest import TESTS_DIR

PACKAGE_ROOT = str(pathlib.Path(cc.__file__).resolve().parent.parent)

NO_CUPY = """\
import sys


class NoCuPy:
    def find_spec(self, name, path=None, target=None):
        if name == "cupy" or name.startswith(("cupy.", "cupy_backends", "cupyx")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoCuPy())
"""


def test_every_test_file_is_collected_without_cupy(tmp_path):
    # Python imports sitecustomize at start-up: there, `import cupy` is made
    # to fail as it does where CuPy is not installed.
    (tmp_path / "sitecustomize.py").write_text(NO_CUPY)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tmp_path), PACKAGE_ROOT, env.get("PYTHONPATH")]))
    check = subprocess.run([sys.executable, "-c", "import cupy"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "ModuleNotFoundError: No module named 'cupy'" in check.stderr, check.stderr

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(TESTS_DIR)],
        env=env, capture_output=True, text=True, cwd=PACKAGE_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    collected = {pathlib.Path(line.split("::")[0]).name
                 for line in result.stdout.splitlines() if "::" in line}
    missing = sorted({path.name for path in TESTS_DIR.glob("test_*.py")} - collected)
    assert not missing, f"not collected without CuPy: {missing}\n{result.stdout[-2000:]}"
    assert "test_kernels_cpu.py::test_every_kernel_was_launched_on_the_cpu" in result.stdout
