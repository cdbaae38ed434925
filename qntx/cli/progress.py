"""How ``qntx ix`` shows a running job: its output as it streams, and its progress
as one live bar (rate and time left) on a terminal, or as plain lines in a pipe."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Steps per second, as the handler reports them."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


class ProgressView:
    def __init__(self, label: str, *, live: bool):
        self.label = label
        self.live = live
        self.streamed = {"stdout": 0, "stderr": 0}  # characters of this attempt already shown
        self.open_line: dict[str, bool] = {}  # a stream whose last output did not end its line
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def progress(self, current: float, total: float) -> None:
        if not self.live:
            print(f"progress {current:g}/{total:g}", file=sys.stderr, flush=True)
            return
        if self._bar is None:  # a job that never reports progress never shows a bar
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                TextColumn("eta"), TimeRemainingColumn(),
                console=Console(file=sys.stderr), redirect_stdout=True, redirect_stderr=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total or None)
        self._bar.update(self._task, completed=current, total=total or None)

    def output(self, stream: str, text: str) -> None:
        # While the bar is live, rich reroutes these writes above it.
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(text)
        target.flush()
        self.streamed[stream] = self.streamed.get(stream, 0) + len(text)
        if text:
            self.open_line[stream] = not text.endswith("\n")

    def end_lines(self) -> None:
        """End a line the output left open, so what follows starts on its own."""
        for stream, target in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            if self.open_line.get(stream):
                target.write("\n")
                self.open_line[stream] = False

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
