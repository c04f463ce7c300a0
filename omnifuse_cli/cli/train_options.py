"""The settings of omnifuse_cli/settings.py as typer options, for every command that trains
(`train`, `cv` and its `--variant` flags).

`with_train_options` gives a command every setting as an option (name, type, default and help
from its `Setting`); `parse_variant` reads a `--variant` flag string exactly as `omnifuse train`
would. Adding a setting is done in omnifuse_cli/settings.py alone.
"""

from __future__ import annotations

import functools
import inspect
import shlex
from collections.abc import Callable
from typing import Any

import typer

from omnifuse_cli.cli.options import setting_option
from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import DATA_READING, SETTINGS

# train's own parameters: which data, where the run goes, resuming. Commands that share the
# training options define these themselves.
TRAIN_ONLY = ("manifest", "manifest_opt", "num_classes", "resume", "out_dir", "overwrite")
# What cli/config_file.with_config_file gives every command that takes --config.
CONFIG_PARAMS = ("ctx", "config")
HELP_PANEL = "Model and training options (as omnifuse train)"


def train_parameters(panel: str | None = None) -> list[inspect.Parameter]:
    """Every setting as a keyword parameter of a typer command, listed under ``panel`` in
    --help (None: with the command's own options)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(
            s.name, keyword, default=s.default, annotation=setting_option(s.name, panel)
        )
        for s in SETTINGS
    ]


def with_train_options(
    panel: str | None = HELP_PANEL,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command (which ends in ``**train_options``) every setting as an option, listed
    under ``panel`` in --help (None: with the command's own); it receives their values in
    ``train_options``."""
    return functools.partial(_with_train_options, panel=panel)


def _with_train_options(command: Callable[..., Any], panel: str | None) -> Callable[..., Any]:
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    params += [p for p in train_parameters(panel) if p.name not in taken]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        return command(**kwargs)

    wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must see the merged signature, not the command's own
    return wrapper


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=--no-imputation --lr 1e-3`` -> (name, flags, the settings they give), parsed
    exactly as `omnifuse train` parses them."""
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(
            f'--variant {spec!r} is not NAME="FLAGS"',
            hint='write e.g. --variant no-imputation="--no-imputation"',
        )
    try:
        args = shlex.split(flags)
    except ValueError as err:
        raise ConfigError(f"--variant {name}: cannot read its flags {flags!r} ({err})") from err
    if "--help" in args:
        raise ConfigError(f"--variant {name}: give train options, not --help")
    if not args:
        raise ConfigError(
            f"--variant {name} has no flags",
            hint=f'give the train options it changes, e.g. {name}="--no-tla"',
        )

    def parse_only(**_: Any) -> None:
        """(parses a variant's flags)"""

    parse_only.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in train_parameters()]
    )
    app = typer.Typer(add_completion=False)
    app.command()(parse_only)
    command = typer.main.get_command(app)
    # Click's classes are matched by name: typer may use its own vendored copy of click.
    try:
        ctx = command.make_context(f"--variant {name}", list(args), resilient_parsing=False)
    except Exception as err:
        if type(err).__name__ == "NoSuchOption":
            raise ConfigError(
                f"--variant {name}: {err.option_name} is not a model or training "  # type: ignore[attr-defined]
                "option of omnifuse train",
                hint=f"a variant takes train's model and training options ({flags.strip()!r} "
                "was given); see omnifuse train --help",
            ) from err
        if hasattr(err, "format_message"):
            raise ConfigError(f"--variant {name}: {err.format_message()}") from err
        raise
    given = {
        k: v
        for k, v in ctx.params.items()
        if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"
    }
    fixed = [f"--{k.replace('_', '-')}" for k in given if k in DATA_READING]
    if fixed:
        raise ConfigError(
            f"--variant {name} changes {', '.join(fixed)}: a variant is compared with the base "
            "model on the same patients and values",
            hint="give data options once, outside --variant",
        )
    return name, " ".join(args), given
