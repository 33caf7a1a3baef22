"""``python -m cupyconv``: version, active backend and a quick self-check.

``python -m cupyconv demo [options]`` trains the seed's price-chart CNN
(see ``python -m cupyconv demo --help``).
"""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] not in ("-h", "--help"):
        print(f"unknown command {argv[0]!r}; try: python -m cupyconv [demo]",
              file=sys.stderr)
        return 2
    if argv:
        print(__doc__.strip())
        return 0
    from ._selfcheck import report

    return report()


if __name__ == "__main__":
    sys.exit(main())
