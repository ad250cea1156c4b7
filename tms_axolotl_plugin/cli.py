"""Command line: `tms report RUN_DIR [RUN_DIR ...] [--out DIR]` (also `python -m tms_axolotl_plugin`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tms_axolotl_plugin.errors import TMSError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tms", description="Trajectory-Mixed Supervision tools")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="plots and a summary of PLD and retention for SFT vs TMS")
    report.add_argument("runs", nargs="+", type=Path, help="output_dir of one or more TMS runs")
    report.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: <first run>/tms/report)")
    args = parser.parse_args(argv)

    from tms_axolotl_plugin.report import write_report

    out = args.out or args.runs[0] / "tms" / "report"
    try:
        summary = write_report(args.runs, out)
    except TMSError as error:
        print(f"tms report: {error}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text())
    print(f"written to {out}")
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
