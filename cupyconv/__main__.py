"""``python -m cupyconv``: version, active backend and a quick self-check.

``python -m cupyconv demo [options]`` trains the seed's price-chart CNN
(see ``python -m cupyconv demo --help``); ``python -m cupyconv demo-dask``
runs the trained model over a lazily made chart set with Dask;
``--version`` prints the version.
"""

import os
import sys

HELP = """\
usage: python -m cupyconv [--version | --help | demo [options] | demo-dask [options]]

With no argument, print the version, the active backend (the GPU, or the
NumPy fallback and why) and run a quick self-check of every op; the exit
status is 0 when every check passes.

commands:
  demo          train the seed's price-chart CNN on synthetic charts
                (python -m cupyconv demo --help lists its options)
  demo-dask     run a trained model over a lazily made chart set with Dask
                (python -m cupyconv demo-dask --help lists its options)

options:
  --version     print the version and exit
  -h, --help    print this help and exit
"""


def _run(argv):
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "demo-dask":
        from .demo.dask_inference import main as dask_demo_main

        return dask_demo_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    if argv and argv[0] == "--version":
        from ._version import __version__

        print(f"cupyconv {__version__}")
        return 0
    if argv:
        print(f"unknown argument {argv[0]!r}; try: python -m cupyconv --help",
              file=sys.stderr)
        return 2
    from ._selfcheck import report

    return report()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        status = _run(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (``python -m cupyconv | head -1``): end quietly, as
        # a command killed by SIGPIPE would, and keep Python's final flush
        # from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # a shell's status for a command ended by SIGPIPE (128 + 13)
    return status


if __name__ == "__main__":
    sys.exit(main())
