"""Results of finished runs: the summary of a run's per-step metrics, the side-by-side table and the plots.

Reads only the run directory's `metrics.jsonl` (one record per step, docs/architecture.md), so it works on
runs that were interrupted as well as finished ones. The plots follow the paper's evaluation (Section 5):
test accuracy against wall-clock training time and against bytes sent, and the per-step time split into
computation, encoding and communication (Figure 2).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

PLOT_FILES = ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "step_time_split.png")
SPLIT = (("compute_s", "compute"), ("encode_s", "encode"), ("communication_s", "communication"))
RELATIVE_TARGET = 0.9  # default target accuracy: this fraction of the best final test accuracy


def load_metrics(path: str | Path) -> list[dict]:
    """The per-step records of `metrics.jsonl`, in step order; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return sorted(records, key=lambda r: r["step"])


def evaluations(records: list[dict]) -> list[dict]:
    """The records of evaluation steps (those that carry a test accuracy)."""
    return [r for r in records if r.get("test_accuracy") is not None]


def default_target(summaries: list[dict]) -> float | None:
    """RELATIVE_TARGET times the best final test accuracy among `summaries` (None if none evaluated)."""
    finals = [s["final_test_accuracy"] for s in summaries if s["final_test_accuracy"] is not None]
    return RELATIVE_TARGET * max(finals) if finals else None


def summarize_runs(runs: dict[str, list[dict]], target_accuracy: float | None = None) -> dict[str, dict]:
    """`summarize` each labelled run against one target: `target_accuracy`, or by default RELATIVE_TARGET
    times the best final test accuracy among the runs."""
    if target_accuracy is None:
        target_accuracy = default_target([summarize(records) for records in runs.values()])
    return {label: {"label": label, **summarize(records, target_accuracy)} for label, records in runs.items()}


def summarize(records: list[dict], target_accuracy: float | None = None) -> dict:
    """Totals and means of a run: accuracy, time and bytes to `target_accuracy`, traffic, step-time split."""
    evals = evaluations(records)
    bytes_up = sum(r["bytes_up"] for r in records)
    bytes_down = sum(r["bytes_down"] for r in records)
    dense_bytes = sum(r["dense_bytes"] for r in records)
    reached = next((r for r in evals if target_accuracy is not None and r["test_accuracy"] >= target_accuracy), None)
    summary = {
        "steps": len(records),
        "time_s": training_time(records, records[-1]) if records else 0.0,
        "final_loss": records[-1]["loss"] if records else None,
        "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "best_test_accuracy": max((r["test_accuracy"] for r in evals), default=None),
        "target_accuracy": target_accuracy,
        "time_to_target_s": training_time(records, reached) if reached else None,
        "step_to_target": reached["step"] if reached else None,
        "bytes_to_target": _bytes_through(records, reached["step"]) if reached else None,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "dense_bytes": dense_bytes,
        "compression_ratio": dense_bytes / bytes_up if bytes_up else None,
    }
    for key, _ in SPLIT:
        summary[f"mean_{key}"] = _mean(r[key] for r in records)
    return summary


def training_time(records: list[dict], record: dict) -> float:
    """Seconds from the end of the run's first step to the end of `record`'s step.

    The first step also holds the workers' start-up (loading data, receiving the model), which in a comparison
    only the first run pays: counting from its end keeps the runs comparable.
    """
    return record["wall_s"] - records[0]["wall_s"]


def _bytes_through(records: list[dict], step: int) -> int:
    return sum(r["bytes_up"] + r["bytes_down"] for r in records if r["step"] <= step)


def _mean(values) -> float | None:
    """The mean of the values given (a worker's first step has no communication time: None is skipped)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_csv(records: list[dict], path: str | Path) -> None:
    """A CSV copy of the records; columns are the union of their keys, first-seen order."""
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)


def plot(runs: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """Write the three PLOT_FILES for one run or several (one line or bar per label); return their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in PLOT_FILES]
    curves = {label: accuracy_curve(records) for label, records in runs.items()}
    _accuracy_plot(
        curves, "time_s", "training time (s), from the end of step 1", "Test accuracy against time", paths[0]
    )
    _accuracy_plot(
        curves,
        "mb_sent",
        "MB sent, workers to PS plus PS to workers (log scale)",
        "Test accuracy against bytes sent",
        paths[1],
        log_x=True,
    )
    _split_plot(runs, paths[2])
    return paths


def accuracy_curve(records: list[dict]) -> dict[str, list[float]]:
    """At each evaluation: training time, MB sent so far (both directions) and test accuracy."""
    curve: dict[str, list[float]] = {"time_s": [], "mb_sent": [], "test_accuracy": []}
    sent = 0
    for r in records:
        sent += r["bytes_up"] + r["bytes_down"]
        if r.get("test_accuracy") is not None:
            curve["time_s"].append(training_time(records, r))
            curve["mb_sent"].append(sent / 1e6)
            curve["test_accuracy"].append(r["test_accuracy"])
    return curve


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display needed); imported here, as it takes about a second."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _accuracy_plot(
    curves: dict[str, dict], x_key: str, x_label: str, title: str, path: Path, log_x: bool = False
) -> None:
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot(curve[x_key], curve["test_accuracy"], marker="o", markersize=3, label=label)
    if log_x:
        ax.set_xscale("log")  # codecs differ by orders of magnitude in bytes
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def _split_plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Stacked bars of the mean per-step compute, encode and communication time (the paper's Figure 2)."""
    fig = _figure(max(4, 1.5 * len(runs) + 2), 4)
    ax = fig.add_subplot()
    labels = list(runs)
    bottom = [0.0] * len(labels)
    for key, name in SPLIT:
        heights = [_mean(r[key] for r in runs[label]) or 0.0 for label in labels]
        ax.bar(labels, heights, bottom=bottom, label=name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("mean time per step (s)")
    ax.set_title("Per-step time: computation, encoding, communication")
    ax.set_ylim(0, 1.3 * max(bottom, default=0) or 1)
    ax.legend(ncols=3, loc="upper center")
    fig.savefig(path, dpi=100)


COLUMNS = (
    ("final test acc", "final_test_accuracy", "{:.4f}"),
    ("best test acc", "best_test_accuracy", "{:.4f}"),
    ("time to acc {target} (s)", "time_to_target_s", "{:.1f}"),
    ("MB to acc {target}", "bytes_to_target", "mb"),
    ("training time (s)", "time_s", "{:.1f}"),
    ("steps", "steps", "{}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("MB up", "bytes_up", "mb"),
    ("MB down", "bytes_down", "mb"),
    ("compression ratio", "compression_ratio", "{:.1f}x"),
    ("compute / step (ms)", "mean_compute_s", "ms"),
    ("encode / step (ms)", "mean_encode_s", "ms"),
    ("communication / step (ms)", "mean_communication_s", "ms"),
)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    if fmt == "ms":
        return f"{value * 1e3:.1f}"
    return fmt.format(value)


def format_table(summaries: dict[str, dict]) -> str:
    """The summaries side by side: one column per run label, one row per quantity."""
    labels = list(summaries)
    target = next((s["target_accuracy"] for s in summaries.values() if s["target_accuracy"] is not None), None)
    target = f"{target:.3f}" if target is not None else "-"
    rows = [["", *labels]]
    for title, key, fmt in COLUMNS:
        rows.append([title.format(target=target), *(_cell(summaries[label][key], fmt) for label in labels)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
