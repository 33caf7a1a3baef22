"""Sphinx configuration for cupyconv's documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"`` first).  Nothing in ``_generated/`` is stored
in the repository: at the start of every build ``figures.py`` draws the
figures there, computing what they show with cupyconv itself, and the demo's
``--help`` text is captured there, so the pages cannot fall out of date.
"""

import contextlib
import io
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
# Document the checkout this file belongs to, not some other installed copy.
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS))

import cupyconv  # noqa: E402
import figures  # noqa: E402

from cupyconv.demo.train import parse_args  # noqa: E402

GENERATED = DOCS / "_generated"
figures.draw_all(GENERATED)
with contextlib.redirect_stdout(io.StringIO()) as demo_help:
    with contextlib.suppress(SystemExit):  # argparse exits after --help
        parse_args(["--help"])
(GENERATED / "demo_help.txt").write_text(demo_help.getvalue())

project = "cupyconv"
author = "the cupyconv developers"
copyright = "the cupyconv developers"
release = cupyconv.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    # Reads benchmarks.md, the report that `python -m cupyconv.bench` writes.
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# NumPy-style docstrings, parsed by napoleon (ships with Sphinx).
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"

html_theme = "alabaster"
html_theme_options = {
    "description": "Dilation, rectangular convolution and max-pooling on NumPy and CuPy",
    "fixed_sidebar": True,
}
