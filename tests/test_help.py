"""--help reads well: descriptions wrap at the terminal's width (no line breaks left over from
docstrings), every command has an Examples section, and every example parses."""

from __future__ import annotations

import shlex

import pytest
import typer

from omnifuse_cli.cli.app import app
from omnifuse_cli.cli.help import EXAMPLES, paragraphs

from .helpers import invoke

COMMANDS = sorted(EXAMPLES)


def help_text(name: str, width: int) -> str:
    result = invoke(*name.split(), "--help", width=width)
    assert result.exit_code == 0, result.output
    return result.output


def description_lines(text: str) -> list[str]:
    """The lines between `Usage:` and the first box (the command's own description)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
    return [line.rstrip() for line in lines[start:end]]


def test_every_command_has_examples() -> None:
    click_app = typer.main.get_command(app)
    groups = ("config", "tune")
    names = set(click_app.commands) - set(groups)  # type: ignore[attr-defined]
    for group in groups:
        names |= {f"{group} {n}" for n in click_app.commands[group].commands}  # type: ignore[attr-defined]
    assert names == set(EXAMPLES)


@pytest.mark.parametrize("width", [80, 160])
@pytest.mark.parametrize("name", COMMANDS)
def test_help_wraps_cleanly_with_examples(name: str, width: int) -> None:
    text = help_text(name, width)
    flat = " ".join(text.split())
    assert "Examples" in text
    for example in EXAMPLES[name]:
        assert f"$ {example}" in flat, example
    lines = description_lines(text)
    assert any(lines), "no description"
    for line, following in zip(lines, lines[1:], strict=False):
        # A line followed by more of its paragraph was wrapped by the terminal's width: the next
        # word did not fit. Where it would have, the break was left over from the docstring.
        if line.strip() and following.strip():
            next_word = following.split()[0]
            assert len(line) + 1 + len(next_word) > width - 2, (
                f"stray line break at {width} columns: {line!r}"
            )


def test_paragraphs_join_docstring_lines() -> None:
    doc = """First line
    goes on.

    Second paragraph
       with odd indentation."""
    assert paragraphs(doc) == "First line goes on.\n\nSecond paragraph with odd indentation."


@pytest.mark.parametrize(("name", "example"), [(n, e) for n in COMMANDS for e in EXAMPLES[n]])
def test_every_example_parses(name: str, example: str) -> None:
    """The command line as written is accepted by the parser (options, types, ranges)."""
    words = shlex.split(example.split(">")[0])  # a shell redirection is not the command's
    assert words[: 1 + len(name.split())] == ["omnifuse", *name.split()]
    command = typer.main.get_command(app)
    for part in name.split():
        command = command.commands[part]  # type: ignore[attr-defined]
    args = words[1 + len(name.split()) :]
    command.make_context(f"omnifuse {name}", args, resilient_parsing=False)
