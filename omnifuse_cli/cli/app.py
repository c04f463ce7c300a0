"""The root `omnifuse` command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from omnifuse_cli import __version__
from omnifuse_cli.cli import check, cv, evaluate, make_data, predict, report, synth, train
from omnifuse_cli.cli.common import set_debug
from omnifuse_cli.cli.config_commands import config_app
from omnifuse_cli.cli.help import command_options
from omnifuse_cli.cli.tune import tune_app

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


COMMANDS: dict[str, Callable[..., Any]] = {
    "synth": synth.synth,
    "make-data": make_data.make_data,
    "check": check.check,
    "train": train.train,
    "evaluate": evaluate.evaluate,
    "predict": predict.predict,
    "cv": cv.cv,
    "report": report.report,
}
for _name, _function in COMMANDS.items():
    app.command(_name, **command_options(_name, _function))(_function)
app.add_typer(config_app, name="config")
app.add_typer(tune_app, name="tune")


def main() -> None:
    app()
