"""`omnifuse config init` and `omnifuse config show`: the --config files (cli/config_file.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnifuse_cli.cli.common import console, handle_errors, write_or_print
from omnifuse_cli.cli.config_file import template
from omnifuse_cli.cli.help import epilog
from omnifuse_cli.engine.runs import CONFIG_YAML
from omnifuse_cli.errors import BundleError, ConfigError

COMMANDS = ("train", "cv", "evaluate", "predict")  # the commands that take --config

config_app = typer.Typer(
    help="Settings files for --config: a commented template, a run's resolved settings.",
    no_args_is_help=True,
    add_completion=False,
)


@config_app.command("init", epilog=epilog("config init"))
@handle_errors
def init(
    path: Annotated[
        Path | None,
        typer.Argument(help="File to write (default: print to the terminal).", show_default=False),
    ] = None,
    command: Annotated[
        str, typer.Option("--command", help=f"Whose settings: {', '.join(COMMANDS)}.")
    ] = "train",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace PATH if it exists.")
    ] = False,
) -> None:
    """Write a commented template of every setting with its default, for --config."""
    if command not in COMMANDS:
        raise ConfigError(
            f"--command {command!r} takes no config file", hint=f"one of {', '.join(COMMANDS)}"
        )
    if not write_or_print(path, template(command), overwrite):
        return
    console.print(f"written to [bold]{path}[/]  ·  next: omnifuse {command} --config {path}")


@config_app.command("show", epilog=epilog("config show"))
@handle_errors
def show(
    run: Annotated[Path, typer.Argument(help="A run or cv folder.")],
) -> None:
    """Print the resolved settings a run or cross-validation was started with (its config.yaml,
    which --config accepts)."""
    path = run / CONFIG_YAML
    if not path.is_file():
        if not run.is_dir():
            raise BundleError(f"{run} is not a folder")
        raise BundleError(
            f"{run} has no {CONFIG_YAML}",
            hint="runs started before config files keep their settings in "
            "request.json (cv.json for cv)",
        )
    typer.echo(path.read_text(encoding="utf-8"), nl=False)
