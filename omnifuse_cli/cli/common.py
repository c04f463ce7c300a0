"""What every command shares: consoles, the known-error path, debug switch."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape

from omnifuse_cli.errors import ConfigError, OmnifuseError


def _other_rank() -> bool:
    """Under torchrun only rank 0 talks: the other processes would repeat every line."""
    try:
        return int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


console = Console(highlight=False, quiet=_other_rank())
err_console = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


def set_debug(value: bool) -> None:
    _state["debug"] = value


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("OMNIFUSE_DEBUG", "") not in ("", "0")


def report_error(error: OmnifuseError) -> None:
    label = "interrupted" if error.exit_code == 130 else "error"
    if _other_rank():
        if getattr(error, "all_ranks", False):
            return  # rank 0 prints the same error
        label = f"{label} (rank {os.environ['RANK']})"
    err_console.print(
        f"[bold red]{label}:[/] {escape(error.message)}",
        markup=True,
        soft_wrap=True,
        highlight=False,
    )
    if error.hint:  # escaped: a hint like pip install 'omnifuse[mlflow]' is text, not markup
        err_console.print(f"[yellow]hint:[/] {escape(error.hint)}", soft_wrap=True)


def handle_errors(fn: F) -> F:
    """Known errors become a short message on stderr and exit code 2 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OmnifuseError as error:
            if debug_enabled():
                raise
            report_error(error)
            raise typer.Exit(code=error.exit_code) from None

    return cast(F, wrapper)  # functools.wraps keeps fn's signature


def write_or_print(path: Path | None, text: str, overwrite: bool) -> bool:
    """``text`` on stdout (no ``path``), or written to ``path``, which must not exist unless
    ``overwrite``; True when written (`config init`, `tune init`)."""
    if path is None:
        typer.echo(text, nl=False)
        return False
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists", hint="pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True
