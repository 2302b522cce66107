"""What both command-line tools share: options, the recipe a command uses, and how errors print.

A user's mistake (a PiBuildError: a bad recipe, a missing engine, a refused artifact...) prints as
one or two lines that name the problem and the fix, and the command exits with code 1; typer's
own usage errors exit with 2. Any other exception is an internal error and keeps its traceback.
``--debug`` (or PI_BUILD_DEBUG=1) shows the traceback of user errors too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from pi_build.errors import PiBuildError

console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

RecipeOpt = Annotated[Optional[Path], typer.Option(
    "--recipe", "-r", help="recipe TOML (default: $PI_BUILD_RECIPE, else the recipe that ./pi-build.toml names)")]
EnginesOpt = Annotated[Optional[Path], typer.Option("--engines", help="engines folder (default: $PI_BUILD_ENGINES, else engines/)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: --set denoise.steps=3")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks of user errors too", envvar="PI_BUILD_DEBUG")]

F = TypeVar("F", bound=Callable[..., Any])
_debug = False


def set_debug(value: bool) -> None:
    global _debug
    _debug = value or os.environ.get("PI_BUILD_DEBUG", "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """An error's message folded onto one line (multi-line details joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] if len(lines) == 1 else lines[0].rstrip(":") + ": " + "; ".join(lines[1:])


def handle_errors(command: F) -> F:
    """Print a user's mistake (PiBuildError) as one line and exit 1; let everything else through."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PiBuildError as e:
            if _debug:
                raise
            err_console.print(f"[red]error:[/] {escape(one_line(e))}", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def parse_int_list(text: str | None, option: str, minimum: int = 1) -> list[int] | None:
    """"1,3,10" -> [1, 3, 10] (each >= minimum), None -> None; a bad list is a usage error naming the option."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of whole numbers (e.g. 1,3,10)", param_hint=option) from None
    if not values or any(v < minimum for v in values):
        raise typer.BadParameter(f"{text!r}: every value must be >= {minimum}", param_hint=option)
    return values
