"""How the benchmark report writes a figure: thousands separators, units, ratios, durations,
and "n/a" or "—" for a figure that was not measured (None, NaN, missing)."""

from __future__ import annotations

from typing import Any

from bench import charts

Doc = dict[str, Any]  # one benchmark's --json output, or a part of it
num = charts.num
finite = charts.finite


def f_int(v: float) -> str:
    return f"{v:,.0f}" if finite(v) else "n/a"


def f_num(v: float, digits: int = 2, unit: str = "") -> str:
    if not finite(v):
        return "n/a"
    return f"{v:,.{digits}f}" + (f" {unit}" if unit else "")


def f_us(v: float) -> str:
    return f_num(v, 2, "µs")


def f_ratio(v: float) -> str:
    return f"{v:.2f}x" if finite(v) else "n/a"


def fmt(pattern: str, value: Any) -> str:
    """`pattern` (a str.format pattern) of a figure, or "—" when it was not measured."""
    v = num(value)
    return pattern.format(v) if finite(v) else "—"


def duration(value: float) -> str:
    if not finite(value):
        return "?"
    seconds = max(0, round(value))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
