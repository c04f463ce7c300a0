"""Reading what a training run left behind: its meta.csv, split assignment and bundle; and
rebuilding the saved request of a run or cross-validation."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import pandas as pd

from omnifuse_cli.engine.bundle import BUNDLE_DIR, bundle_folder
from omnifuse_cli.errors import BundleError


def read_meta(run_dir: Path) -> dict[str, str]:
    """The run's meta.csv as key -> value (users may edit paths in it after moving data)."""
    path = Path(run_dir) / "meta.csv"
    if not path.is_file():
        bundle_folder(run_dir)  # the clearer error when this is not a run at all
        raise BundleError(
            f"{run_dir} has no meta.csv; was training interrupted before the end?",
            hint="evaluate an external cohort with --manifest instead",
        )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(frame["key"], frame["value"], strict=True))


def read_split_assignment(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / "split_assignment.csv"
    if not path.is_file():
        raise BundleError(f"{run_dir} has no split_assignment.csv")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def find_latest_run(root: Path = Path("runs")) -> Path:
    """The most recently trained run under ``root`` (by its bundle's modification time)."""
    bundles = sorted(
        Path(root).glob(f"*/{BUNDLE_DIR}/bundle.json"), key=lambda p: p.stat().st_mtime
    )
    if not bundles:
        raise BundleError(
            f"no trained run found under {Path(root).resolve()}",
            hint="train one with `omnifuse train MANIFEST --num-classes C`, or pass --run RUN_DIR",
        )
    return bundles[-1].parent.parent


def from_primitive(cls: type, raw: Any) -> Any:
    """Rebuild a (nested, frozen) config dataclass saved with to_primitive: lists become the
    tuples the field types name, dicts the dataclasses."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name])
    return cls(**values)


def _coerce(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_primitive(hint, value)  # type: ignore[arg-type]  # a hint is a class
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is tuple and isinstance(value, list):
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None) and (
                dataclasses.is_dataclass(arg) or typing.get_origin(arg) is tuple
            ):
                return _coerce(arg, value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value
