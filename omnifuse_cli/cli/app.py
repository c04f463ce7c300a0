"""The root `omnifuse` command."""

from __future__ import annotations

from typing import Annotated

import typer

from omnifuse_cli import __version__
from omnifuse_cli.cli import check, cv, evaluate, make_data, predict, report, synth, train
from omnifuse_cli.cli.common import set_debug
from omnifuse_cli.cli.config_commands import config_app

app = typer.Typer(
    name="omnifuse",
    help="OmniFuse multimodal learning on low-quality medical data: labs, ultrasound, notes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"omnifuse {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show full tracebacks on errors (or set OMNIFUSE_DEBUG=1)."),
    ] = False,
) -> None:
    set_debug(debug)


app.command("synth")(synth.synth)
app.command("make-data")(make_data.make_data)
app.command("check")(check.check)
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("cv")(cv.cv)
app.command("report")(report.report)
app.add_typer(config_app, name="config")


def main() -> None:
    app()
