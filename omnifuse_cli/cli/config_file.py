"""`--config FILE.yaml`: a command's settings from YAML files, under the names of its flags.

A key is the flag without its dashes (`batch-size` for `--batch-size`; `batch_size` is accepted
too), a switch pair takes true/false under its positive name (`amp`, `pretrained-image`; null is
its default where it has one), and a positional argument is named as in `--help` (`manifest`,
`run-dir`, `patients`). Several files are merged in order (a later file's key wins); a flag given
on the command line wins over every file, even when its value is the default. Relative paths are
read from the current directory, as on the command line.

`with_config_file` gives a command the option and does the merging before the command's body
runs, so the body sees one value per parameter wherever it came from. `run_settings` writes a
run's resolved settings in the same format (train and cv save it as config.yaml) and `template`
the commented file `omnifuse config init` prints.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from omnifuse_cli.errors import ConfigError
from omnifuse_cli.settings import (
    BY_NAME,
    OWN_TITLES,
    SECTION_TITLES,
    run_config_yaml,
    section_of,
    yaml_line,
)

# Parameters a file cannot set: --resume takes every setting from the run it continues.
NOT_IN_FILE = ("resume",)
ConfigOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of settings under the flags' "
        "names (see omnifuse config init); repeat to merge several, later files win; "
        "flags given here win over every file.",
        show_default=False,
    ),
]


def key_of(param: Any) -> str:
    """A click parameter's key in a config file: its first long flag without the dashes, or an
    argument's name in kebab-case."""
    if getattr(param, "param_type_name", "") == "option":
        longs = [o for o in param.opts if o.startswith("--")]
        return (longs[0] if longs else param.opts[0]).lstrip("-")
    return str(param.name).replace("_", "-")


def file_keys(command: Any) -> dict[str, list[Any]]:
    """key -> the click parameters it sets (train's MANIFEST argument and --manifest share one);
    parameters a file cannot set are left out."""
    keys: dict[str, list[Any]] = {}
    for param in command.params:
        if param.name in (*NOT_IN_FILE, "config") or not param.name:
            continue
        keys.setdefault(key_of(param), []).append(param)
    return keys


def click_command(name: str) -> Any:
    """The click command behind `omnifuse NAME` (for its parameters' flags, help and defaults)."""
    from omnifuse_cli.cli.app import app  # a cycle: app imports the commands, which import us

    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _loader() -> Any:
    """yaml.SafeLoader that refuses a key given twice (PyYAML would keep the last silently)."""
    import yaml  # ~15 ms that `omnifuse --help` need not pay: only --config files need it

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def read_files(paths: Sequence[Path]) -> dict[str, tuple[Any, Path]]:
    """Every file's keys (normalised to kebab-case) merged in order: key -> (value, file)."""
    import yaml  # ~15 ms that `omnifuse --help` need not pay: only --config files need it

    merged: dict[str, tuple[Any, Path]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"--config {path} does not exist",
                hint="omnifuse config init FILE.yaml writes a template",
            )
        try:
            raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_loader())
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--config {path} is not valid YAML{line}: {problem}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"--config {path} is not UTF-8 text ({err.reason})") from None
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ConfigError(
                f"--config {path} must be a mapping of settings (key: value), "
                f"not a {type(raw).__name__}",
                hint="e.g. a line 'epochs: 10'",
            )
        seen: dict[str, str] = {}
        for name, value in raw.items():
            key = str(name).strip().replace("_", "-")
            if key in seen:
                raise ConfigError(f"--config {path} sets {key} twice ({seen[key]!r} and {name!r})")
            seen[key] = str(name)
            merged[key] = (value, path)
    return merged


def resolve(
    ctx: Any, signature: inspect.Signature, values: dict[str, Any], paths: Sequence[Path]
) -> dict[str, Any]:
    """``values`` (the parsed command line) with every setting the files give and the command
    line does not."""
    command = ctx.command
    keys = file_keys(command)
    given = {
        name
        for name in values
        if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    }
    for name in NOT_IN_FILE:
        if name in given:
            raise ConfigError(
                f"--config and --{name} together: a resumed run takes every "
                "setting from its own folder",
                hint=f"drop --config, or --{name}",
            )
    out = dict(values)
    settings = read_files(paths)
    for key, (_, path) in settings.items():
        if key not in keys:
            raise _unknown(key, path, ctx.info_name or "this command", keys)
    for key, (value, path) in settings.items():
        params = keys[key]
        if any(p.name in given for p in params):
            continue
        param = params[0]
        out[param.name] = _convert(
            value, signature.parameters[param.name].annotation, param, f"{path}: {key}"
        )
    return out


def _unknown(key: str, path: Path, command: str, keys: Mapping[str, Any]) -> ConfigError:
    if key in NOT_IN_FILE:
        return ConfigError(
            f"{path}: {key} cannot come from a config file",
            hint=f"pass --{key} RUN on the command line (it takes every setting from the run)",
        )
    close = difflib.get_close_matches(key, list(keys), n=1)
    hint = (f"did you mean {close[0]}?" if close else "") + (
        f" omnifuse config init --command {command} lists every key"
    )
    return ConfigError(f"{path}: unknown key {key!r} for omnifuse {command}", hint=hint.strip())


def _kinds(annotation: Any) -> tuple[Any, bool, bool]:
    """(base type, None allowed, a list) of a parameter's annotation."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _convert(value: Any, annotation: Any, param: Any, where: str) -> Any:
    """A file's value as the Python value typer would have passed, or a ConfigError naming the
    key. Stricter than click's own conversion, which would read 2.5 as 2 or true as 1."""
    base, optional, many = _kinds(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} needs a value (it has no empty setting)")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_scalar(v, base, param, where) for v in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where} takes one value, not a {type(value).__name__}: {value!r}")
    return _scalar(value, base, param, where)


def _scalar(value: Any, base: Any, param: Any, where: str) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ConfigError(f"{where} must be {_describe(base)}, not {value!r}")
    if base is int:
        number = _number(value, int)
        if number is None:
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        return _in_range(number, param, where)
    if base is float:
        number = _number(value, float)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, not {value!r}")
        return _in_range(number, param, where)
    text = str(value)
    return Path(text) if base is Path else text


def _number(value: Any, kind: type) -> Any:
    """An int or float from a number, or from a string (PyYAML reads 1e-4 as a string)."""
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                return None
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _in_range(number: Any, param: Any, where: str) -> Any:
    """The option's own bounds (min=1 and the like), as the command line checks them."""
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and number < low:
        raise ConfigError(f"{where} must be at least {low}, not {number!r}")
    if high is not None and number > high:
        raise ConfigError(f"{where} must be at most {high}, not {number!r}")
    return number


def _describe(base: Any) -> str:
    return {int: "a whole number", float: "a number", Path: "a path", str: "text"}.get(
        base, str(base)
    )


def with_config_file(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` a repeatable ``--config FILE.yaml``; its body receives every parameter
    with the files' values filled in where the command line gives none."""
    own = inspect.signature(command, eval_str=True)
    wants_ctx = "ctx" in own.parameters  # a command may take the click context too
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("ctx", keyword, annotation=typer.Context),
        inspect.Parameter("config", keyword, default=None, annotation=ConfigOption),
        *(p.replace(kind=keyword) for p in own.parameters.values() if p.name != "ctx"),
    ]

    @functools.wraps(command)
    def wrapper(ctx: typer.Context, config: list[Path] | None = None, **values: Any) -> Any:
        if config:
            values = resolve(ctx, own, values, config)
        if wants_ctx:
            values["ctx"] = ctx
        return command(**values)

    wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    if hasattr(wrapper, "__wrapped__"):
        del wrapper.__wrapped__  # typer must see the signature with --config
    return wrapper


def _groups(command_name: str, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parameters in sections: the command's own, then the settings by the config they build."""
    own_title = OWN_TITLES.get(command_name, command_name)
    sections: dict[str, list[str]] = {own_title: []}
    for title in SECTION_TITLES.values():
        sections[title] = []
    shared = command_name in ("train", "cv")
    for name in names:
        sections[section_of(name) if shared and name in BY_NAME else own_title].append(name)
    return [(title, members) for title, members in sections.items() if members]


# Where and how a run is written, not what it is: its saved settings leave them out (cv's variants
# file is saved as the --variant list it gave).
NOT_SAVED = ("out_dir", "overwrite", "resume", "manifest_opt", "variants_file")


def run_settings(command_name: str, values: Mapping[str, Any]) -> str:
    """A run's resolved settings (every parameter, defaults included) as the config.yaml saved in
    it: `omnifuse COMMAND --config config.yaml --out-dir NEW` repeats the run."""
    command = click_command(command_name)
    own = [
        (key_of(p), values[p.name])
        for p in command.params
        if p.name in values and p.name not in NOT_SAVED and p.name not in BY_NAME
    ]
    return run_config_yaml(command_name, own, {n: v for n, v in values.items() if n in BY_NAME})


# What a template shows (commented out) for a setting the command needs that has no default.
_NEEDED = {
    ("train", "manifest"): "data/manifest.csv",
    ("train", "num-classes"): 3,
    ("cv", "manifest"): "data/manifest.csv",
    ("cv", "num-classes"): 3,
    ("evaluate", "run-dir"): "runs/NAME",
    ("predict", "patients"): "patients.csv",
}


def template(command_name: str) -> str:
    """Every setting of `omnifuse COMMAND` with its default and help, commented, in sections;
    `--config` accepts it as it is (needed settings without a default are commented out)."""
    command = click_command(command_name)
    keys = file_keys(command)
    first = {params[0].name: key for key, params in keys.items()}
    lines = [
        f"# Settings of omnifuse {command_name}, for --config (every key is a flag without "
        "its dashes;",
        "# flags given on the command line win). Delete what you keep at its default.",
    ]
    for title, members in _groups(
        command_name, [p.name for p in command.params if p.name in first]
    ):
        lines.append(f"\n# -- {title} --")
        for name in members:
            param = next(p for p in command.params if p.name == name)
            key = first[name]
            help_text = " ".join((getattr(param, "help", None) or "").split())
            shown = getattr(param, "show_default", None)
            if isinstance(shown, str) and param.default is None:
                help_text += f" (null: {shown})"  # what the option's --help says it defaults to
            for row in textwrap.wrap(help_text, 96):
                lines.append(f"# {row}")
            if (command_name, key) in _NEEDED:
                example = yaml_line(key, _NEEDED[command_name, key]).rstrip()
                lines.append(f"# {example}   (needed: here or on the command line)")
            else:
                default = param.default
                if isinstance(default, tuple):
                    default = list(default)
                lines.append(yaml_line(key, default).rstrip("\n"))
    return "\n".join(lines) + "\n"
