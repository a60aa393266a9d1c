"""What a user sees while a pipeline runs: a live line per stage, then the summary table."""

from __future__ import annotations

import time

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class Display:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.fields[stage]:<10}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=False,
            disable=quiet,
        )
        self.tasks: dict[str, int] = {}
        self.t0: dict[str, float] = {}

    def start(self, todo) -> None:
        for p in todo:
            self.tasks[p.name] = self.progress.add_task(
                "", total=None, start=False, stage=p.name, note=f"[dim]{p.reason}"
            )
        self.progress.start()

    def begin(self, name: str) -> None:
        self.t0[name] = time.time()
        self.progress.update(self.tasks[name], note="running")
        self.progress.start_task(self.tasks[name])

    def waiting(self, name: str, why: str) -> None:
        self.progress.update(self.tasks[name], note=f"[yellow]{why}")

    def update(self, name: str, prog: dict | None) -> None:
        if prog and prog.get("total"):
            unit = prog.get("unit", "steps")
            self.progress.update(
                self.tasks[name], completed=prog["step"], total=prog["total"], note=f"running ({unit})"
            )

    def finish(self, name: str, state: str, detail) -> None:
        task = self.tasks[name]
        if state == "complete":
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, completed=total, total=total, note="[green]complete")
        else:
            self.progress.update(task, note=f"[red]{state}")
            if not self.quiet:
                self.console.print(f"[red]{name} {state}:[/red] {detail}", highlight=False)

    def note(self, text: str) -> None:
        """A line worth knowing that changes nothing (an artifact adopted, a stage's code edited)."""
        if not self.quiet:
            self.console.print(f"[yellow]note:[/yellow] {text}", highlight=False)

    def interrupted(self) -> None:
        self.console.print(
            "[yellow]Interrupted: running stages were stopped. No artifact was half-written; "
            "in-stage checkpoints are kept, and the next `run` resumes from them."
        )

    def stop(self) -> None:
        self.progress.stop()


def summary_table(plan, outcome, headline: dict[str, str], run_dir: str = "") -> Table:
    """One row per stage; the artifact is `<run_dir>/<stage>-<fingerprint>` (its fingerprint shown)."""
    table = Table(title=f"kiln run: {run_dir}" if run_dir else "kiln run", box=box.SIMPLE_HEAD)
    for col in ("stage", "state", "time", "headline", "artifact"):
        table.add_column(col, overflow="fold")
    for p in plan:
        if p.action == "unselected" and p.state != "complete":
            state = f"[dim]{p.state} (not selected)"
        elif p.name in outcome.errors:
            state = "[red]failed"
        elif p.name in outcome.blocked:
            state = "[red]blocked"
        elif p.name in outcome.stopped:
            state = f"[yellow]stopped at step {outcome.stopped[p.name]}"
        elif p.name in outcome.results:
            state = "[green]complete"
        elif p.action == "run":
            state = "[yellow]interrupted" if outcome.interrupted else "[yellow]not run"
        else:
            state = "[green]complete (reused)" if p.state == "complete" else p.state
        result = outcome.results.get(p.name)
        metrics = result["metrics"] if result else (p.manifest or {}).get("metrics", {})
        seconds = result["seconds"] if result else (p.manifest or {}).get("seconds")
        key = headline.get(p.name)
        value = metrics.get(key) if key else None
        shown = (
            f"{key}={value:.4g}"
            if isinstance(value, float)
            else (f"{key}={value}" if value is not None else "")
        )
        table.add_row(p.name, state, f"{seconds:.1f}s" if seconds is not None else "", shown, p.fingerprint)
    return table
