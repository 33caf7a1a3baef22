"""Command line of ``python -m cupyconv.bench``; run with ``--help``."""

import argparse
import json
import pathlib
import sys

from . import report
from .cases import OPS
from .run import run

PLOT_NAME = pathlib.Path("_static") / "benchmark_ratios.png"


def _ops(text):
    ops = tuple(op.strip() for op in text.split(",") if op.strip())
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(OPS)}")
    return ops


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser():
    p = argparse.ArgumentParser(
        prog="python -m cupyconv.bench",
        description="Time cupyconv's ops against PyTorch, plain NumPy/CuPy and naive "
        "loops on the same inputs; print a table, and optionally write JSON, the "
        "Markdown report and its plot. Progress goes to stderr. The GPU part runs "
        "when cupyconv.gpu_available() (CuPy and a CUDA device), and is otherwise "
        "skipped with the reason. Method: see the docstring of cupyconv.bench.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cpu-only", action="store_true",
                       help="run only the CPU part (NumPy path vs PyTorch CPU, plain NumPy, naive loops)")
    where.add_argument("--gpu-only", action="store_true",
                       help="run only the GPU part (exits with status 2 if no GPU is usable)")
    p.add_argument("--quick", action="store_true",
                   help="tiny problem sizes and short timing loops: checks the tool works, "
                   "the numbers mean nothing (the smoke test uses this)")
    p.add_argument("--repeats", type=_positive, metavar="N",
                   help="timed calls per implementation after warm-up (default: sized to "
                   "about 0.7 s per implementation on the CPU, 0.3 s on the GPU)")
    p.add_argument("--ops", type=_ops, default=OPS, metavar="LIST",
                   help=f"comma-separated ops to run (default: all of {','.join(OPS)}); "
                   "conv2d includes the batch sweep")
    p.add_argument("--json", metavar="PATH",
                   help="write all results (schema 'cupyconv-bench/1': machine, versions, "
                   "reference rates, per-call times of every variant) as JSON to PATH; "
                   "'-' writes it to stdout and moves the table to stderr")
    p.add_argument("--report", metavar="PATH",
                   help="write the Markdown report (e.g. docs/benchmarks.md) with the plot")
    p.add_argument("--plot", metavar="PATH",
                   help="where the ratio plot goes (default with --report: "
                   f"{PLOT_NAME.as_posix()} beside the report; without --report no plot "
                   "unless this is given). Needs matplotlib (the 'plot' extra); without it "
                   "the report says the plot was skipped")
    p.add_argument("--no-plot", action="store_true", help="make no plot")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    devices = ("cpu",) if args.cpu_only else ("gpu",) if args.gpu_only else ("gpu", "cpu")
    if args.gpu_only:
        import cupyconv

        if not cupyconv.gpu_available():
            print(f"--gpu-only: no GPU: {cupyconv.gpu_unavailable_reason()}", file=sys.stderr)
            return 2

    def log(line):
        print(line, file=sys.stderr, flush=True)

    result = run(devices=devices, ops=args.ops, quick=args.quick, repeats=args.repeats, log=log)

    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(report.text_table(result), file=table_out)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=1)
        print()
    elif args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {path}")

    plot_path = None if args.no_plot else args.plot
    if plot_path is None and args.report and not args.no_plot:
        plot_path = pathlib.Path(args.report).parent / PLOT_NAME
    plot_note = "No plot: --no-plot was given." if args.no_plot else None
    if plot_path is not None:
        plot_note = report.plot_ratios(result, plot_path)
        if plot_note is None:
            log(f"wrote {plot_path}")
        else:
            log(plot_note)
            plot_path = None
    if args.report:
        path = pathlib.Path(args.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.markdown(result, plot_path, plot_note, path))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
