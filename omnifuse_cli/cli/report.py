"""`omnifuse report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnifuse_cli.cli.common import console, handle_errors


@handle_errors
def report(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run folder (omnifuse train), a cross-validation folder (omnifuse cv) or a "
            "tune folder (omnifuse tune run)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The HTML file; figures go to a folder beside it (<name>-figures/, PNG and PDF).",
            show_default="SOURCE/report.html",
        ),
    ] = None,
) -> None:
    """One self-contained HTML page (figures embedded) plus the figures as PNG and PDF."""
    from omnifuse_cli.report import build_report  # matplotlib: not at `omnifuse --help`

    result = build_report(source, out)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"report: [bold]{result.html}[/]  ·  figures (PNG, PDF): {result.figures_dir}"
        f"  ·  {result.seconds:.1f} s"
    )
