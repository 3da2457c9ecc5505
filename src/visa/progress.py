"""Progress bars (count, rate, ETA) and the one-screen summary, with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", self.unit)
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def make_progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class RunProgress:
    """One bar for records (with total and ETA) and one counter per agent (items done, rate)."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self._agents: dict[str, TaskID] = {}
        self._records: TaskID | None = None

    def stage(self, description: str, total: int | None, unit: str) -> TaskID | None:
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, unit=unit)

    def start_records(self, total: int | None) -> None:
        self._records = self.stage("records", total, "rec")

    def records(self, n: int) -> None:
        if self.progress is not None and self._records is not None:
            self.progress.advance(self._records, n)

    def items(self, column: str, n: int) -> None:
        if self.progress is None:
            return
        if column not in self._agents:
            self._agents[column] = self.progress.add_task(f"  {column}", total=None, unit="item")
        self.progress.advance(self._agents[column], n)


def summary_table(record: dict[str, Any]) -> Table:
    counts = record["counts"]
    table = Table(title=f"visa score: {record['run_dir']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("input", f"{record['input']['path']} ({record['input']['format']})")
    table.add_row("recipe", record["recipe"]["name"])
    table.add_row("records", f"{counts['records']:,}")
    table.add_row("scored samples", f"{counts['ok']:,}")
    table.add_row("unique images", f"{counts['unique_images']:,}")
    table.add_row("text-only samples", f"{counts['text_only']:,}")
    errors = counts["errors"]
    table.add_row(
        "error rows",
        f"{sum(errors.values()):,}" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")" if errors else ""),
    )
    if counts["malformed"]:
        lines = counts["malformed_lines"]
        shown = ", ".join(map(str, lines[:8])) + (" ..." if len(lines) > 8 else "")
        table.add_row("malformed records", f"{counts['malformed']:,} at line(s) {shown}")
    for column, info in record["timings"]["agents"].items():
        rate = info["items"] / info["seconds"] if info["seconds"] else 0.0
        table.add_row(
            f"  {column}",
            f"{info['items']:,} items in {info['seconds']:.1f} s ({rate:,.1f}/s), {info['errors']} failed",
        )
    table.add_row("shards", f"{record['shards']['total']} ({record['shards']['resumed']} already done)")
    probes = record.get("probes")
    if probes:
        ladders = ", ".join(f"{k} {v}" for k, v in probes["ladders"].items() if v)
        table.add_row("probes", f"{probes['rows']:,} rows ({ladders} ladders) in {probes['seconds']:.1f} s")
    for family, report in (record.get("shapley") or {}).items():
        weights = ", ".join(f"{a.split('.', 1)[-1]} {w:.2f}" for a, w in report.get("weights", {}).items())
        table.add_row(f"  {family} weights", f"{weights} ({report.get('value', 'consensus')})")
        for warning in report.get("warnings", []):
            table.add_row("  warning", f"{family}: {warning}")
    table.add_row("wall time", f"{record['timings']['total_seconds']:.1f} s")
    table.add_row("score table", record["outputs"]["scores"])
    for note in record.get("notes") or []:
        table.add_row("note", note)
    return table


def selection_table(summary: dict[str, Any]) -> Table:
    table = Table(title="visa select", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("pool", f"{summary['pool']:,} records")
    table.add_row("budget", f"{summary['budget']} -> {summary['budget_rows']:,}" if summary.get("budget_rows") is not None
                  else str(summary.get("budget")))
    table.add_row("selected", f"{summary['selected']:,}")
    images = summary.get("images") or {}
    if images:
        table.add_row("images kept", f"{images.get('kept', 0):,} of {images.get('unique', 0):,}")
    for reason, n in (summary.get("dropped") or {}).items():
        if n:
            table.add_row(f"  dropped: {reason}", f"{n:,}")
    if summary.get("ranked_by"):
        table.add_row("ranked by", str(summary["ranked_by"]))
    for note in summary.get("notes") or []:
        table.add_row("note", str(note))
    for name, path in (summary.get("outputs") or {}).items():
        table.add_row(name, str(path))
    return table
