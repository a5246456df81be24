"""Metrics in Prometheus text exposition format 0.0.4 -- pure: no clocks, sockets or threads.

How it works. A scrape builds a list of `Family` values (name, help text, type, samples) from the
node's state (runtime/node_metrics.py) and `render` turns them into text: per family one
`# HELP` and one `# TYPE` line, then its samples `name{label="value",...} value`. Label values
are escaped as the format asks (backslash, double quote, newline), help texts too (backslash,
newline). Counter families are named `..._total`, their samples carry that name; durations are
in seconds, sizes in bytes (Prometheus' base units).

`Histogram` counts observations into fixed buckets (upper bounds, seconds); `family()` renders
it as a histogram family: cumulative `_bucket{le=...}` samples ending with `+Inf`, `_sum` and
`_count` (equal to the `+Inf` bucket). Observing is an index search and two additions, cheap
enough for every write.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# Bucket bounds (seconds) for latencies from a local commit (sub-millisecond) to a write that
# waits for a slow disk or a ring re-forming (seconds).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Bucket bounds (seconds) for a sync after a membership change.
SYNC_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Sample:
    """One line: the family's name plus `suffix` (`_bucket`, `_sum`, ...), labels, value."""

    labels: Mapping[str, str]
    value: float
    suffix: str = ""


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    kind: Kind
    samples: Sequence[Sample] = field(default_factory=tuple)


def counter(name: str, help_text: str, value: float,
            labels: Mapping[str, str] | None = None) -> Family:
    """A counter family with one sample; `name` must end in `_total`."""
    assert name.endswith("_total"), name
    return Family(name, help_text, "counter", (Sample(labels or {}, value),))


def gauge(name: str, help_text: str, value: float,
          labels: Mapping[str, str] | None = None) -> Family:
    """A gauge family with one sample."""
    return Family(name, help_text, "gauge", (Sample(labels or {}, value),))


def labelled(name: str, help_text: str, kind: Kind,
             values: Iterable[tuple[Mapping[str, str], float]]) -> Family:
    """A family with one sample per (labels, value)."""
    assert kind != "counter" or name.endswith("_total"), name
    return Family(name, help_text, kind, tuple(Sample(lab, v) for lab, v in values))


class Histogram:
    """Observations counted into buckets with upper bounds `bounds` (increasing)."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        assert bounds, bounds
        assert list(bounds) == sorted(set(bounds)), bounds
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), ending with (inf, count)."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def family(self, name: str, help_text: str,
               labels: Mapping[str, str] | None = None) -> Family:
        base = dict(labels or {})
        samples = [Sample({**base, "le": _number(bound)}, n, "_bucket")
                   for bound, n in self.cumulative()]
        samples += [Sample(base, self.sum, "_sum"), Sample(base, self.count, "_count")]
        return Family(name, help_text, "histogram", tuple(samples))


def render(families: Iterable[Family]) -> str:
    """The text exposition (format 0.0.4) of `families`; each name must appear once."""
    lines: list[str] = []
    seen: set[str] = set()
    for fam in families:
        assert fam.name not in seen, fam.name
        seen.add(fam.name)
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for s in fam.samples:
            lines.append(f"{fam.name}{s.suffix}{_labels(s.labels)} {_number(s.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
