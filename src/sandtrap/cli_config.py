"""Which config file a command reads: ``--config``/``-c`` before or after the command, else ``$SANDTRAP_CONFIG``.

``sandtrap -c F run``, ``sandtrap run -c F`` and ``sandtrap sessions -c F list`` all read F. Each level that
takes the option records what it was given (:func:`remember`, from the group callbacks); a command's own
value is passed to :func:`settings`, the one place that decides. The value nearest the command wins, with a
warning when two differ; no value at all means ``$SANDTRAP_CONFIG``, else the built-in defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sandtrap.config import Settings, load_settings
from sandtrap.errors import SandtrapError

ENV = "SANDTRAP_CONFIG"

ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help=f"YAML config file, before or after the command (default: ${ENV}, else built-in defaults)",
        show_default=False,
    ),
]

console = Console(stderr=True)


@dataclass
class _Given:
    """The values given before the command in this invocation, outermost first."""

    values: list[str] = field(default_factory=list)


given = _Given()


def reset(config: str | None) -> None:
    """The top-level callback: a new invocation, with what was given before any command."""
    given.values = [config] if config else []


def remember(config: str | None) -> None:
    """A command group's callback (``sandtrap sessions -c F list``)."""
    if config:
        given.values = [*given.values, config]


def config_path(config: str | None) -> str | None:
    """The file for a command given ``config`` after it: the nearest value given, else ``$SANDTRAP_CONFIG``."""
    values = [*given.values, *([config] if config else [])]
    chosen = values[-1] if values else os.environ.get(ENV) or None
    others = {v for v in values[:-1] if Path(v).expanduser().resolve() != Path(values[-1]).expanduser().resolve()}
    if others:
        shown = ", ".join(sorted(others))
        console.print(
            f"[yellow]warning:[/] --config given more than once: using {escape(values[-1])} "
            f"(the one nearest the command), not {escape(shown)}",
            highlight=False,
            soft_wrap=True,
        )
    return chosen


def settings(config: str | None) -> Settings:
    """The settings of the file :func:`config_path` picks; a bad file is an error naming the key (exit 2)."""
    try:
        return load_settings(config_path(config))
    except SandtrapError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
