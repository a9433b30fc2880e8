"""The Markdown building blocks of the benchmark report, for bench/report_render.py and for a
section kept in a module of its own: a table, the report being written, one row per run, and
what a section says when its benchmark did not run or stopped early."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.report_format import Doc


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("| " + " | ".join("---" for _ in headers) + " |")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    out: Path
    parts: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        self.parts.append(text)

    def chart(self, made: bool, name: str, alt: str) -> None:
        if made:
            self.add(f"![{alt}](charts/{name})\n")

    def text(self) -> str:
        return "\n".join(self.parts).rstrip() + "\n"


def per_run_rows(
    runs: Doc, labels: Sequence[str], n_runs: int, cell: Callable[[Doc], str]
) -> list[list[str]]:
    """One row per run: its number, then `cell` of each label's figures in that run."""
    rows = []
    for i in range(n_runs):
        row = [str(i + 1)]
        for label in labels:
            figures = runs.get(label) or []
            row.append(cell(figures[i] if i < len(figures) else {}))
        rows.append(row)
    return rows


def missing(r: Report, step: str, run: Doc) -> None:
    """The benchmark left no figures: the step's status and log if it ran."""
    rec = next((s for s in run.get("steps") or [] if s.get("name") == step), None)
    if rec:
        r.add(f"Not measured: the step {rec.get('status', '?')} (see `{rec.get('log')}`).\n")
    else:
        r.add(f"Not measured (no `results/{step}.json`).\n")


def partial(r: Report, doc: Doc) -> None:
    """A note when the benchmark saved its figures before its end."""
    if doc.get("complete") is False:
        r.add("> The benchmark stopped before its end: these are the figures it had saved.\n")


def not_run(r: Report, step: str, run: Doc, minutes: str) -> None:
    """An optional step never run: the command that runs it; a step that ran and failed:
    `missing`."""
    if any(s.get("name") == step for s in run.get("steps") or []):
        missing(r, step, run)
    else:
        r.add(
            f"Not run (no `results/{step}.json`): `.venv/bin/python -m bench.report --only "
            f"{step}` runs it ({minutes}).\n"
        )
