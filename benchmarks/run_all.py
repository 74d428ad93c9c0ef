#!/usr/bin/env python
"""Run the benchmarks (rgemma against the official `recurrentgemma.torch`, HF
RecurrentGemma and a HF Gemma transformer baseline) and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py --quick      # tiny shapes: a functional run, ~2 min
    python benchmarks/run_all.py --reduced    # 2B widths, 6 layers: ~20-25 min, 2 cores
    python benchmarks/run_all.py --full       # the 2B preset (needs ~16 GiB free)

Options such as `--sections prefill,decode`, `--impls rgemma,gemma`,
`--prefill-lengths 128,2k,32k`, `--threads 2` follow (`--help` lists them). Results
go to benchmarks/results/SHAPE/ (results.json, tables.txt, *.png); after a reduced
or full run, the generated part of benchmarks/RESULTS.md is rewritten from every
results/{reduced,full}/results.json present, with the command and the machine. See
benchmarks/README.md. (`rgemma bench` times rgemma alone.)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks import harness, report
from rgemma.errors import RgemmaError

EPILOG = """\
examples:
  python benchmarks/run_all.py --quick
  python benchmarks/run_all.py --reduced --sections decode --decode-positions 16,2k,32k
  python benchmarks/run_all.py --full --impls rgemma,gemma

Shapes that do not fit in the available memory are refused before anything is
allocated (rgemma), or skipped with the estimate (peers, long prompts).
"""


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmarks, write the results; returns the exit code
    (2, with one line on stderr, for bad options or a shape that does not fit)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="benchmarks/run_all.py",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    for shape, help in (
        ("quick", "tiny shapes, every code path (a couple of minutes)"),
        ("reduced", "2B widths with 6 layers; the main CPU run (~20-25 min, 2 cores)"),
        ("full", "the recurrentgemma-2b preset and Gemma-2B"),
    ):
        which.add_argument(
            f"--{shape}", action="store_const", const=shape, dest="preset_shape", help=help
        )
    harness.add_arguments(parser)
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
    command = "python benchmarks/run_all.py " + " ".join(shlex.quote(a) for a in argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        harness.run_benchmarks(harness.options_from_args(args, command), log=log)
    except RgemmaError as err:
        print(f"run_all: error: {err}", file=sys.stderr)
        return 2
    if md:
        dirs = [HERE / "results" / s for s in ("reduced", "full")]
        if Path(args.out).resolve() not in [d.resolve() for d in dirs]:
            dirs.append(Path(args.out))
        log(f"wrote {report.write_results_md(dirs, md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
