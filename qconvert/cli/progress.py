"""Progress on stderr: bars on a terminal, one line per finished block in a CI log, nothing else."""

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from qconvert.cli.common import stderr


class _Bar:
    """A rich progress bar on stderr, silent when stderr is not a terminal; `report` updates it."""

    def __init__(self, *columns, field: str) -> None:
        self.progress = Progress(
            *columns,
            TimeRemainingColumn(),
            TextColumn(f"{{task.fields[{field}]}}"),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal,
        )
        self.field = field
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self.report

    def report(self, label: str, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=total, **{self.field: ""})
        self.progress.update(self.task, completed=done, **{self.field: label})

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def progress_bar(label: str) -> _Bar:
    """Conversion progress: source bytes done, with the current tensor."""
    return _Bar(TextColumn(label), BarColumn(), DownloadColumn(), field="tensor")


class block_progress(_Bar):
    """Calibration progress: a bar over blocks on a terminal, one line per block otherwise (CI logs)."""

    def __init__(self) -> None:
        super().__init__(
            TextColumn("calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"), field="stage"
        )

    def report(self, stage: str, done: int, total: int) -> None:
        super().report(stage, done, total)
        if not stderr.is_terminal and ": done" in stage:
            stderr.print(f"calibrating: {stage} ({done}/{total})", highlight=False)
