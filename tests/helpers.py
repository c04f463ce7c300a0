"""Helpers many test modules share: running `omnifuse` through typer's CliRunner, checking its
exit, and the flags of the tiny run (resnet18 at 32 px on the CPU, a 60/20/20 split)."""

from __future__ import annotations

from collections.abc import Mapping

from typer.testing import CliRunner, Result

from omnifuse_cli.cli.app import app
from omnifuse_cli.settings import as_flags

# The model and split of every tiny CLI run (tests/conftest.py's tiny_request, as flags). Each
# module adds its own --num-classes, --epochs, --folds, --tla-min-patients, ...: the parser does
# not care about the order.
TINY_RUN = as_flags(
    {
        "image_backbone": "resnet18",
        "image_size": 32,
        "device": "cpu",
        "pretrained_image": False,
        "train_ratio": 0.6,
        "val_ratio": 0.2,
        "test_ratio": 0.2,
        "seed": 0,
        "batch_size": 8,
    }
)


def invoke(*args: object, env: Mapping[str, str] | None = None, width: int = 200) -> Result:
    """Run `omnifuse ARGS` (each stringified) with a wide terminal so rich never wraps what we
    assert on; ``env`` adds to (or overrides) that environment."""
    return CliRunner().invoke(
        app, [str(a) for a in args], env={"COLUMNS": str(width), **(env or {})}
    )


def flat(text: str) -> str:
    """Output with rich's wrapping undone (narrow table titles wrap at the table's width)."""
    return " ".join(text.split())


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def assert_user_error(result: Result, *fragments: str) -> list[str]:
    """Exit code 2, no traceback, and on stderr one `error:` line first (a manifest error
    lists its problems indented below it) and an optional hint; every fragment on stderr.
    Returns the non-blank stderr lines."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert all(line.startswith(("error: ", "hint: ", "  ")) for line in lines), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"
    return lines
