"""A rich progress bar of an evaluation: episodes done / total and the success rate so far."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pi_build.evaluation.driver import EpisodeHook


@contextlib.contextmanager
def episode_progress(console: Console, total: int, title: str) -> Iterator[EpisodeHook]:
    """Yields the hook to call with each finished episode's record (run_evaluation's on_episode)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("success {task.fields[rate]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        job = bar.add_task(title, total=total, rate="-")
        seen = {"episodes": 0, "successes": 0}

        def on_episode(record: dict[str, Any]) -> None:
            seen["episodes"] += 1
            seen["successes"] += bool(record["success"])
            rate = f"{seen['successes']}/{seen['episodes']} ({seen['successes'] / seen['episodes']:.0%})"
            bar.update(job, advance=1, rate=rate)

        yield on_episode
