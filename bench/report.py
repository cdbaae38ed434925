"""What a benchmark reports and how: metrics beside their raw limits, as a table or JSON.

A ``Metric`` is one measured figure, the raw limit it is judged against (measured
in the same run) and a ``Target``. The ratio is always ``measured / limit`` in the
metric's own unit, so for a rate higher is better and for a latency lower is.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Target:
    """``ratio >= 0.6``, ``ratio <= 3`` or ``measured <= 300`` (in the metric's unit)."""

    op: str  # ">=" or "<="
    value: float
    on: str = "ratio"  # "ratio" or "measured"

    def met(self, measured: float, ratio: float) -> bool:
        x = ratio if self.on == "ratio" else measured
        return x >= self.value if self.op == ">=" else x <= self.value

    def text(self, unit: str) -> str:
        if self.on == "ratio":
            return f"{self.op} {self.value:g}x"
        return f"{self.op} {self.value:g} {unit.strip('/')}"


@dataclass
class Metric:
    key: str  # stable machine name (the JSON key; tests look for it)
    label: str  # what the table shows
    measured: float
    unit: str  # "/s", "us" or "ms"
    limit: float
    limit_key: str  # which raw measurement the limit is
    target: Target | None = None  # None: reported for context, judged by nobody

    @property
    def ratio(self) -> float:
        return self.measured / self.limit if self.limit else float("nan")

    @property
    def result(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.target.met(self.measured, self.ratio) else "MISS"


@dataclass
class Report:
    benchmark: str
    quick: bool
    raw: dict[str, float] = field(default_factory=dict)  # raw limit key -> value
    raw_units: dict[str, str] = field(default_factory=dict)
    raw_reference: dict[str, str] = field(default_factory=dict)  # SPEC §7's figure, for context
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add_raw(self, key: str, value: float, unit: str, reference: str = "") -> float:
        self.raw[key], self.raw_units[key], self.raw_reference[key] = value, unit, reference
        return value

    def add(self, metric: Metric) -> Metric:
        self.metrics.append(metric)
        return metric

    def to_json(self) -> dict:
        metrics = []
        for m in self.metrics:
            row = asdict(m)
            row.update(ratio=m.ratio, result=m.result)
            metrics.append(row)
        return {
            "benchmark": self.benchmark,
            "quick": self.quick,
            "seconds": round(self.seconds, 2),
            "raw": self.raw,
            "raw_units": self.raw_units,
            "metrics": metrics,
            "notes": self.notes,
        }

    def print(self, as_json: bool, out=sys.stdout) -> None:
        if as_json:
            json.dump(self.to_json(), out, indent=2)
            out.write("\n")
            return
        out.write(self.table() + "\n")

    def table(self) -> str:
        lines = [
            f"bench {self.benchmark}{' --quick' if self.quick else ''}  ({self.seconds:.0f} s)",
            "",
        ]
        raw_rows = [("raw limit (this run)", "measured", "SPEC §7 ref")]
        raw_rows += [
            (k, fmt(v, self.raw_units[k]), self.raw_reference[k]) for k, v in self.raw.items()
        ]
        lines += _grid(raw_rows) + [""]
        rows = [("metric", "measured", "raw limit", "ratio", "target", "")]
        for m in self.metrics:
            target = m.target.text(m.unit) if m.target else "-"
            rows.append(
                (
                    m.label,
                    fmt(m.measured, m.unit),
                    f"{fmt(m.limit, m.unit)} {m.limit_key}",
                    f"{m.ratio:.2f}x",
                    target,
                    m.result,
                )
            )
        lines += _grid(rows)
        if self.notes:
            lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit in ("us", "ms"):
        return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"
    if unit.strip() == "kB":
        return f"{value:,.0f} kB"
    return f"{value:,.3g} {unit}"


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        # Text left, numbers right, so the figures line up by magnitude.
        cells = [
            c.ljust(w) if i == 0 or n == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append(" | ".join(cells).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def progress(text: str) -> None:
    """Progress goes to stderr, so stdout stays the table (or the JSON) alone."""
    print(f"  .. {text}", file=sys.stderr, flush=True)
