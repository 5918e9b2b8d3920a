"""One rich progress bar used by every long job (analysis, training, pre-training)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich Progress with a free-text ``info`` field; disabled output when not wanted."""
    console = Console(stderr=True, quiet=not enabled, force_terminal=None if sys.stderr.isatty() else False)
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*cols, console=console, disable=not enabled, refresh_per_second=2) as p:
        yield p
