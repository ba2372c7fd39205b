"""The results: medians over rounds, the stdout table, latest.json and latest.png."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.scenarios import Comparison, Scenario
from bench.serve import LagSummary
from bench.wrk_runner import WrkResult

RESULTS_DIR = Path(__file__).parent / "results"
# Rounds whose req/s differ by more than this (of the median) make a ratio worth doubting.
NOISY = 0.5
# Other work taking more than this many cores during a scenario (median round) is noted.
BUSY = 0.25
# The scenarios whose tails are shown round by round (issue 18: explain the cached GET's).
TAIL_SCENARIOS = {
    "bare_json": "bare JSON (reference)",
    "order_cached": "cached GET",
    "raw_insert": "raw INSERT (reference)",
    "order_create": "POST /v1/orders",
}


@dataclass
class ScenarioResult:
    scenario: Scenario
    rounds: list[WrkResult] = field(default_factory=list)
    # What a probe or a check after the rounds found wrong; any entry invalidates the figure.
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Per round: the 1-minute load average after it, and the cores' worth of CPU that
    # other work on the machine took meanwhile (with its biggest consumers).
    loads: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)
    other_top: list[list[str]] = field(default_factory=list)
    # Per round: the serving processes' loop lag and GC pauses (None: not sampled).
    lags: list[LagSummary | None] = field(default_factory=list)
    probed: bool = False

    def _median(self, attribute: str) -> float:
        values = [getattr(result, attribute) for result in self.rounds]
        return statistics.median(values) if values else 0.0

    @property
    def rps(self) -> float:
        return self._median("rps")

    @property
    def p50_ms(self) -> float:
        return self._median("p50_ms")

    @property
    def p99_ms(self) -> float:
        return self._median("p99_ms")

    @property
    def others(self) -> float:
        return statistics.median(self.other_cores) if self.other_cores else 0.0

    @property
    def spread(self) -> float:
        """(max - min) / median of the rounds' req/s: how far to trust the median."""
        values = [result.rps for result in self.rounds]
        return (max(values) - min(values)) / self.rps if len(values) > 1 and self.rps else 0.0

    @property
    def errors(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for result in self.rounds:
            for name, count in result.errors.items():
                totals[name] = totals.get(name, 0) + count
        return totals

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def valid(self) -> bool:
        return bool(self.rounds) and self.error_count == 0 and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.scenario.key,
            "title": self.scenario.title,
            "server": self.scenario.server,
            "connections": self.scenario.connections,
            "requests_per_second": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "spread": round(self.spread, 3),
            "other_work_cores": round(self.others, 2),
            "errors": self.errors,
            "valid": self.valid,
            "problems": self.problems,
            "notes": self.notes,
            "rounds": [
                {
                    **asdict(result),
                    "requests_per_second": round(result.rps, 1),
                    "load_average": load,
                    "other_work_cores": others,
                    "other_work_top": top,
                    "loop_lag": asdict(lag) if lag else None,
                }
                for result, load, others, top, lag in zip(
                    self.rounds,
                    self.loads,
                    self.other_cores,
                    self.other_top,
                    self.lags,
                    strict=False,
                )
            ],
        }


@dataclass(frozen=True, slots=True)
class ComparisonResult:
    comparison: Comparison
    ratio: float | None
    valid: bool
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.ratio is None or not self.comparison.target:
            return None
        return self.comparison.met(self.ratio)

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "n/a"
        if not self.valid:
            return "INVALID"
        if self.met is None:
            return "-"
        return "met" if self.met else "NOT MET"

    def to_json(self) -> dict[str, Any]:
        comparison = self.comparison
        return {
            "key": comparison.key,
            "title": comparison.title,
            "group": comparison.group,
            "metric": comparison.metric,
            "subject": comparison.subject,
            "reference": comparison.reference,
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "target": comparison.target or None,
            "op": comparison.op,
            "goal": comparison.goal or None,
            "met": self.met,
            "valid": self.valid,
            "detail": self.detail,
        }


def compare(comparison: Comparison, results: dict[str, ScenarioResult]) -> ComparisonResult:
    subject, reference = results.get(comparison.subject), results.get(comparison.reference)
    if subject is None or reference is None or not reference.rounds:
        return ComparisonResult(comparison, None, False, "not measured")
    pair = (subject, reference)
    if comparison.metric == "p99":
        values = (subject.p99_ms, reference.p99_ms)
        details = [f"{values[0]:,.1f} vs {values[1]:,.1f} ms"]
    else:
        values = (subject.rps, reference.rps)
        details = [f"{values[0]:,.0f} vs {values[1]:,.0f} req/s"]
    invalid = [result.scenario.key for result in pair if not result.valid]
    noisy = [
        f"{result.scenario.key} {result.spread:.0%}" for result in pair if result.spread > NOISY
    ]
    busy = [f"{result.scenario.key} {result.others:.2f}" for result in pair if result.others > BUSY]
    if invalid:
        details.append(f"invalid: {', '.join(invalid)}")
    if noisy:
        details.append(f"noisy rounds: {', '.join(noisy)}")
    if busy:
        details.append(f"other work (cores): {', '.join(busy)}")
    ratio = values[0] / values[1] if values[1] else None
    return ComparisonResult(comparison, ratio, not invalid, "; ".join(details))


def _target_text(comparison: Comparison) -> str:
    if not comparison.target:
        return "-"
    text = f"{comparison.op} {comparison.target:.2f}"
    return f"{text} ({comparison.goal})" if comparison.goal else text


def render_table(
    results: list[ScenarioResult], comparisons: list[ComparisonResult], machine: dict[str, Any]
) -> str:
    """What stdout shows: the scenarios, the ratios against their targets, the tails."""
    width = max(len(result.scenario.title) for result in results) + 2
    lines = [
        f"machine: {machine.get('cpu_model')} x{machine.get('nproc')}, "
        f"python {machine.get('python')}, {machine.get('date')}, "
        f"load average {machine.get('load_average')} -> {machine.get('load_average_end')}",
        "req/s, p50, p99: median of the rounds; spread: (max - min) / median of req/s;",
        "others: cores of CPU other work on the machine took meanwhile (median round)",
        "",
        f"{'scenario':<{width}}{'conns':>6}{'req/s':>10}{'spread':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'others':>8}  notes",
    ]
    for result in results:
        flags = "; ".join(
            [
                *(f"{name}={count}" for name, count in result.errors.items() if count),
                *result.problems,
            ]
        )
        lines.append(
            f"{result.scenario.title:<{width}}{result.scenario.connections:>6}"
            f"{result.rps:>10.0f}{result.spread:>8.0%}{result.p50_ms:>9.2f}{result.p99_ms:>9.2f}"
            f"{result.error_count:>8}{result.others:>8.2f}  {flags or 'ok'}"
        )
    title_width = max(len(item.comparison.title) for item in comparisons) + 2
    target_width = max(len(_target_text(item.comparison)) for item in comparisons) + 2
    for group in dict.fromkeys(item.comparison.group for item in comparisons):
        lines += ["", f"{group:<{title_width}}{'value':>8}  {'target':<{target_width}}{'met':<9}"]
        for item in (entry for entry in comparisons if entry.comparison.group == group):
            value = "-" if item.ratio is None else _ratio_text(item)
            lines.append(
                f"{item.comparison.title:<{title_width}}{value:>8}  "
                f"{_target_text(item.comparison):<{target_width}}{item.verdict:<9}{item.detail}"
            )
    lines += render_tails(results)
    return "\n".join(lines)


def _ratio_text(item: ComparisonResult) -> str:
    """Two decimals, or three where two would round across the target (0.897 vs >= 0.90)."""
    assert item.ratio is not None
    rounded = round(item.ratio, 2)
    if item.comparison.target and item.comparison.met(rounded) != item.comparison.met(item.ratio):
        return f"{item.ratio:.3f}"
    return f"{item.ratio:.2f}"


def render_tails(results: list[ScenarioResult]) -> list[str]:
    """Per round of the tail scenarios: wrk's latency distribution, loop lag and GC pauses."""
    shown = [result for result in results if result.scenario.key in TAIL_SCENARIOS]
    if not shown:
        return []
    lines = [
        "",
        "tails, per round: wrk's latency distribution (ms); the serving processes' event-loop",
        "lag (a 10 ms timer's lateness, ms) and GC pauses (count, total ms, longest ms, full)",
        "in the same window",
        f"{'scenario':<28}{'round':>6}{'p50':>8}{'p75':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}"
        f"{'max':>8}  {'lag p99':>8}{'lag max':>8}{'GCs':>7}{'GC ms':>7}{'GC max':>7}{'full':>5}",
    ]
    for result in shown:
        for number, (outcome, lag) in enumerate(
            zip(result.rounds, result.lags or [None] * len(result.rounds), strict=False), 1
        ):
            sampled = (
                f"{lag.lag_p99_ms:>8.1f}{lag.lag_max_ms:>8.1f}{lag.gc_count:>7}"
                f"{lag.gc_total_ms:>7.0f}{lag.gc_max_ms:>7.1f}{lag.gc_full:>5}"
                if lag
                else f"{'(not sampled: BENCH_LOOP_LAG=0)':>42}"
            )
            lines.append(
                f"{TAIL_SCENARIOS[result.scenario.key]:<28}{number:>6}{outcome.p50_ms:>8.2f}"
                f"{outcome.p75_ms:>8.2f}{outcome.p90_ms:>8.2f}{outcome.p99_ms:>8.2f}"
                f"{outcome.p999_ms:>8.2f}{outcome.max_ms:>8.1f}  {sampled}"
            )
    return lines


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def chart_title(payload: dict[str, Any]) -> str:
    machine, config = payload["machine"], payload["config"]
    return (
        f"orders-api bench {machine['date']} - {machine['cpu_model']} x{machine['nproc']}, "
        f"{config['workers']} workers, {config['connections']} connections"
    )


def write_chart(path: Path, payload: dict[str, Any]) -> bool:
    """Ratios against targets and p50/p99 per scenario, from the `latest.json` payload.

    False when matplotlib is missing (it lives in the `bench` dependency group).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    # The p99 ratios (a few x, lower is better) would squash the others' scale; the
    # latency panel shows their p99s.
    judged = [
        item
        for item in payload["comparisons"]
        if item["ratio"] is not None and item.get("metric") != "p99"
    ]
    scenarios = payload["scenarios"]
    figure, (ratio_axes, latency_axes) = plt.subplots(
        1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1, 1.2]}
    )
    ratios = [item["ratio"] for item in judged]
    colours = [
        "#999999"
        if item["met"] is None or not item["valid"]
        else "#2e7d32"
        if item["met"]
        else "#c62828"
        for item in judged
    ]
    positions = list(range(len(judged)))
    ratio_axes.barh(positions, ratios, color=colours)
    for position, item in zip(positions, judged, strict=True):
        if item["target"]:
            ratio_axes.plot([item["target"]] * 2, [position - 0.4, position + 0.4], "k-", lw=2)
        ratio_axes.text(item["ratio"] + 0.02, position, f"{item['ratio']:.2f}", va="center")
    reach = max([*ratios, *(item["target"] or 0 for item in judged)], default=1.0)
    ratio_axes.set_xlim(0, reach * 1.15)
    ratio_axes.set_yticks(positions, [item["title"] for item in judged])
    ratio_axes.invert_yaxis()
    ratio_axes.set_xlabel("ratio (black tick: target; green met, red missed, grey invalid/none)")
    ratio_axes.set_title("Ratios to the reference, same run")

    rows = list(range(len(scenarios)))
    p50 = [max(item["p50_ms"], 0.001) for item in scenarios]
    p99 = [max(item["p99_ms"], 0.001) for item in scenarios]
    latency_axes.barh([row - 0.2 for row in rows], p50, height=0.4, label="p50")
    latency_axes.barh([row + 0.2 for row in rows], p99, height=0.4, label="p99")
    latency_axes.set_yticks(rows, [item["title"] for item in scenarios])
    latency_axes.invert_yaxis()
    latency_axes.set_xscale("log")
    latency_axes.set_xlabel("latency, ms (log scale)")
    latency_axes.set_title("Latency per scenario (median of rounds)")
    latency_axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)

    figure.suptitle(chart_title(payload))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main() -> int:
    """`python -m bench.report`: draw `latest.png` again from `latest.json`."""
    payload = json.loads((RESULTS_DIR / "latest.json").read_text())
    if not write_chart(RESULTS_DIR / "latest.png", payload):
        sys.stderr.write("matplotlib is missing: uv run --group bench python -m bench.report\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
