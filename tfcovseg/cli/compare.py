"""``tfcovseg-compare`` / ``python -m tfcovseg.compare``: the paper's tables over evaluated
runs (the library: `tfcovseg.evaluation.compare`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools.files import OutputError, atomic_write_text, check_output_dir
from tfcovseg import cli
from tfcovseg.constants import DISCLAIMER
from tfcovseg.evaluation import compare


def _printable(text: str) -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
        return text
    except (UnicodeEncodeError, LookupError):
        return text.replace("±", "+/-")


def build_parser():
    parser = cli.parser(
        "compare",
        "Compare evaluated runs or cross-validation folders in the layouts of the paper's "
        "Tables 4, 6 and 7",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run or cross-validation folders")
    out = compare.DEFAULT_OUT
    parser.add_argument("--out", type=Path, default=out, help=f"output folder (default: {out})")
    parser.add_argument("--names", help="comma-separated row names, one per run, in order")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # before the tables are computed and printed, not after
        check_output_dir(args.out)
    except OutputError as e:
        return cli.fail(str(e))
    try:
        summaries = compare.load_summaries(args.runs)
        names = args.names.split(",") if args.names is not None else None
        names = compare.display_names(summaries, names)
    except compare.CompareError as e:
        return cli.fail(str(e))
    tables = compare.comparison(summaries, names)
    print(_printable(f"{DISCLAIMER}\n"))
    for table in tables["text"]:
        print(_printable(compare.render_text(table)))
        print()
    try:
        markdown = compare.render_comparison_markdown(summaries, names)
        atomic_write_text(args.out / "comparison.md", markdown)
        content = compare._json(compare.comparison_json(summaries, names))
        atomic_write_text(args.out / "comparison.json", content)
    except OSError as e:
        return cli.fail(f"cannot write to {args.out}: {e}")
    print(f"written: {args.out / 'comparison.md'}, {args.out / 'comparison.json'}")
    return 0
