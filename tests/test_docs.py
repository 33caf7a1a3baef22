"""The documentation: complete NumPy-style docstrings whose Examples run, pages
whose ``>>>`` examples run, figures that draw, and a Sphinx build that is
clean with warnings as errors.

Docstring examples run here through :mod:`doctest`, once per module that
defines a public function, so the plain ``python -m pytest`` runs them
exactly once (no ``--doctest-modules`` needed, nothing collected twice).
"""

import doctest
import importlib
import inspect
import io
import os
import pathlib
import re
import subprocess
import sys

import pytest

import cupyconv

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

PUBLIC = {name: getattr(cupyconv, name) for name in cupyconv.__all__
          if name != "__version__"}
FUNCTIONS = {name: obj for name, obj in PUBLIC.items() if inspect.isfunction(obj)}
MODULES = sorted({obj.__module__ for obj in FUNCTIONS.values()})
PAGES = sorted(p.name for p in DOCS.glob("*.rst") if ">>>" in p.read_text())

#: Public functions that raise no error of their own, so need no Raises section.
RAISE_NOTHING = {"asnumpy", "gpu_available", "gpu_unavailable_reason", "backend_info",
                 "get_default_precision"}

# Same option as pytest's doctest default; outputs must otherwise match exactly.
FLAGS = doctest.ELLIPSIS


def sections(docstring):
    """Names of the NumPy-style sections (a title underlined with dashes)."""
    return set(re.findall(r"^(\w[\w ]*)\n-{3,}$", docstring, flags=re.MULTILINE))


def run_doctests(tests):
    """Run doctest ``tests``; return (attempted, failed, report)."""
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    return result.attempted, result.failed, out.getvalue()


def test_public_names_are_listed():
    missing = [name for name in cupyconv.__all__ if not hasattr(cupyconv, name)]
    assert not missing, f"cupyconv.__all__ names missing attributes: {missing}"
    assert FUNCTIONS, "cupyconv.__all__ lists no function"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_docstring_has_numpy_sections(name):
    func = FUNCTIONS[name]
    doc = inspect.getdoc(func)
    assert doc, f"{name} has no docstring"
    found = sections(doc)
    needed = {"Returns", "Examples"}
    if inspect.signature(func).parameters:
        needed.add("Parameters")
    if name not in RAISE_NOTHING:
        needed.add("Raises")
    assert needed <= found, f"{name}'s docstring lacks {sorted(needed - found)}"
    examples = re.split(r"^Examples\n-{3,}$", doc, flags=re.MULTILINE)[1]
    assert ">>>" in examples, f"{name}'s Examples section has no runnable example"


@pytest.mark.parametrize("name", sorted(set(PUBLIC) - set(FUNCTIONS)))
def test_public_class_has_docstring(name):
    assert inspect.getdoc(PUBLIC[name]), f"{name} has no docstring"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder().find(module)
    attempted, failed, report = run_doctests(tests)
    assert attempted, f"{module_name} has no doctest examples"
    assert not failed, f"{failed} of {attempted} examples failed in {module_name}:\n{report}"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
    path = DOCS / page
    parser = doctest.DocTestParser()
    test = parser.get_doctest(path.read_text(), {}, page, str(path), 0)
    attempted, failed, report = run_doctests([test])
    assert not failed, f"{failed} of {attempted} examples failed in docs/{page}:\n{report}"


def test_figures_draw(tmp_path):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (test extra)")
    sys.path.insert(0, str(DOCS))
    try:
        figures = importlib.import_module("figures")
    finally:
        sys.path.remove(str(DOCS))
    figures.draw_all(tmp_path)
    for name in figures.FIGURES:
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name


def test_sphinx_build_is_clean(tmp_path):
    for module in ("sphinx", "myst_parser", "matplotlib"):
        pytest.importorskip(
            module, reason=f"building the docs needs {module}: pip install -e '.[docs]'"
        )
    assert (DOCS / "benchmarks.md").is_file(), (
        "docs/benchmarks.md is missing: run `python -m cupyconv.bench` to write it"
    )
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
               "-b", "html", "-d", str(tmp_path / "doctrees"),
               str(DOCS), str(tmp_path / "html")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    )
    assert (tmp_path / "html" / "api.html").is_file()


def test_tuning_script_runs():
    """docs/tuning.py, which reproduces the design notes' figures, lists its
    experiments and runs one (the kernels page names each of them)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    listed = subprocess.run([sys.executable, str(DOCS / "tuning.py")], env=env,
                            capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[0] for line in listed.splitlines()]
    page = (DOCS / "kernels.rst").read_text()
    assert names and all(f"docs/tuning.py {name}" in " ".join(page.split()) for name in names)
    out = subprocess.run([sys.executable, str(DOCS / "tuning.py"), "dilation-runs",
                          "--rounds", "1"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert re.search(r"runs of 16: [\d.]+ ms, elements: [\d.]+ ms", out), out
    out = subprocess.run([sys.executable, str(DOCS / "tuning.py"), "host-overhead",
                          "--rounds", "1"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert len(re.findall(r"^(conv2d|max_pool2d|dilate).*: [\d.]+ us$", out, re.M)) == 8, out
