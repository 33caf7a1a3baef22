"""``python -m cupyconv`` as a user runs it, through a subprocess."""

import os
import pathlib
import re
import subprocess
import sys

import cupyconv as cc

PACKAGE_ROOT = str(pathlib.Path(cc.__file__).resolve().parent.parent)


def environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


def run(*args):
    return subprocess.run([sys.executable, "-m", "cupyconv", *args], capture_output=True,
                          text=True, env=environment(), timeout=300)


def test_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cupyconv {cc.__version__}\n"


def test_help_is_plain_text():
    for flag in ("--help", "-h"):
        result = run(flag)
        assert result.returncode == 0, result.stderr
        text = result.stdout
        assert text.startswith("usage: python -m cupyconv")
        assert "demo" in text and "--version" in text
        # No reStructuredText markup: inline literals, roles, directives.
        assert not re.search(r"``|:\w+:`|^\.\. ", text, re.MULTILINE), text


def test_unknown_argument_points_to_help():
    result = run("--frobnicate")
    assert result.returncode == 2
    assert "unknown argument '--frobnicate'" in result.stderr
    assert "python -m cupyconv --help" in result.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """``python -m cupyconv | head -1``: the pipe closes before the output is
    written; no BrokenPipeError traceback, a SIGPIPE-like status."""
    for args in ([], ["--help"]):
        process = subprocess.Popen([sys.executable, "-m", "cupyconv", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=environment())
        process.stdout.close()  # the reader is gone before the first line
        stderr = process.stderr.read().decode()
        process.stderr.close()
        assert process.wait(timeout=300) == 141, stderr
        assert stderr == "", stderr
