#!/usr/bin/env python
"""Run the benchmarks (rgemma against the official `recurrentgemma.torch`, HF
RecurrentGemma and a HF Gemma transformer baseline) and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py --quick      # tiny shapes: a functional run, ~2 min
    python benchmarks/run_all.py --reduced    # 2B widths, 6 layers: ~20-25 min, 2 cores
    python benchmarks/run_all.py --full       # the 2B preset (needs ~16 GiB free)

Any `rgemma bench` option can follow, e.g. `--sections prefill,decode`,
`--impls rgemma,gemma`, `--prefill-lengths 128,2k,32k`, `--max-seconds-per-point 60`,
`--threads 2`. Results go to benchmarks/results/SHAPE/ (results.json, tables.txt,
*.png); after a reduced or full run, benchmarks/RESULTS.md is rewritten from every
results/{reduced,full}/results.json present, with the command and the machine.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rgemma import bench
from rgemma.errors import RgemmaError

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="benchmarks/run_all.py",
        description=__doc__.split("\n\n")[0],
        epilog=bench.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="preset_shape",
        help="tiny shapes, every code path (a couple of minutes)",
    )
    which.add_argument(
        "--reduced",
        action="store_const",
        const="reduced",
        dest="preset_shape",
        help="2B widths with 6 layers; the main CPU run (~20-25 min, 2 cores)",
    )
    which.add_argument(
        "--full",
        action="store_const",
        const="full",
        dest="preset_shape",
        help="the recurrentgemma-2b preset and Gemma-2B",
    )
    bench.add_arguments(parser)
    parser.add_argument(
        "--results-md",
        metavar="PATH",
        help="where to write RESULTS.md (default benchmarks/RESULTS.md after "
        "a reduced or full run; none after a quick run)",
    )
    parser.add_argument("--no-results-md", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    if args.preset_shape:
        args.shape = args.preset_shape
    if args.out is None:
        args.out = str(HERE / "results" / args.shape)
    md = None
    if not args.no_results_md:
        md = args.results_md or (str(HERE / "RESULTS.md") if args.shape != "quick" else None)
    args.results_md = None  # written below, from every run present
    command = "python benchmarks/run_all.py " + " ".join(shlex.quote(a) for a in argv)
    try:
        bench.run(args, command)
    except RgemmaError as err:
        print(f"run_all: error: {err}", file=sys.stderr)
        return 2
    if md:
        dirs = [HERE / "results" / s for s in ("reduced", "full")]
        if Path(args.out).resolve() not in [d.resolve() for d in dirs]:
            dirs.append(Path(args.out))
        path = bench.write_results_md(dirs, md)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
