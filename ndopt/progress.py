"""The one progress helper: rich progress bars on a terminal, silent elsewhere (tests, CI logs)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def setup_logging(level: int = logging.INFO) -> None:
    log = logging.getLogger("ndopt")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    log.setLevel(level)
    log.propagate = False


@contextlib.contextmanager
def progress(description: str, total: int | None, *, enabled: bool | None = None) -> Iterator[Callable[[str], None]]:
    """Yields `advance(label)`; shows a bar when stderr is a terminal (or `enabled`)."""
    show = console.is_terminal if enabled is None else enabled
    if not show:
        yield lambda _label="": None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=console,
                  transient=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total, label="")

        def advance(label: str = "") -> None:
            bar.update(task, advance=1, label=label)

        yield advance
