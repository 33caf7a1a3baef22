"""``python -m cupyconv``: version, active backend and a quick self-check.

``python -m cupyconv demo [options]`` trains the seed's price-chart CNN
(see ``python -m cupyconv demo --help``); ``python -m cupyconv demo-dask``
runs the trained model over a lazily made chart set with Dask.
"""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "demo-dask":
        from .demo.dask_inference import main as dask_demo_main

        return dask_demo_main(argv[1:])
    if argv and argv[0] not in ("-h", "--help"):
        print(f"unknown command {argv[0]!r}; try: python -m cupyconv [demo | demo-dask]",
              file=sys.stderr)
        return 2
    if argv:
        print(__doc__.strip())
        return 0
    from ._selfcheck import report

    return report()


if __name__ == "__main__":
    sys.exit(main())
