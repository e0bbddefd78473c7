"""Results of runs: the summary of a run's per-step metrics, the side-by-side table, the CSV and the plots.

Reads only per-step records (`metrics.jsonl` in a run directory, docs/architecture.md, or the control service's
store), so it works on runs that are still going or were interrupted as well as finished ones. The plots
follow the paper's evaluation (Section 5): test accuracy against wall-clock training time and against bytes
sent, the training loss, and the per-step time split into computation, encoding and communication (Figure 2).

Bytes have a direction: "up" is the workers' gradients to the PS, "down" the PS's updates to the workers,
"total" both; every byte figure (report.json's keys, the table's rows, the plots' axes) says which.

Every function reads its records in one pass (the summary with its default target, two), so `records` may
be a list or any iterable that can be iterated again: the control service streams them from its store, and
the curves behind the plots keep at most MAX_POINTS points per run, whatever the run's length.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SPLIT = (("compute_s", "compute"), ("encode_s", "encode"), ("communication_s", "communication"))
RELATIVE_TARGET = 0.9  # default target accuracy: this fraction of the best final test accuracy
MAX_POINTS = 2000  # per curve of a run: longer runs are thinned evenly (plots are 600-1000 pixels wide)
DPI = 100


def load_metrics(path: str | Path) -> list[dict]:
    """The per-step records of `metrics.jsonl`, in step order; a torn last line (a run killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return sorted(records, key=lambda r: r["step"])


def evaluations(records: Iterable[dict]) -> list[dict]:
    """The records of evaluation steps (those that carry a test accuracy)."""
    return [r for r in records if r.get("test_accuracy") is not None]


def default_target(summaries: list[dict]) -> float | None:
    """RELATIVE_TARGET times the best final test accuracy among `summaries` (None if none evaluated)."""
    finals = [s["final_test_accuracy"] for s in summaries if s["final_test_accuracy"] is not None]
    return RELATIVE_TARGET * max(finals) if finals else None


def summarize_runs(runs: dict[str, Iterable[dict]], target_accuracy: float | None = None) -> dict[str, dict]:
    """`summarize` each labelled run against one target: `target_accuracy`, or by default RELATIVE_TARGET
    times the best final test accuracy among the runs (which reads each run twice)."""
    if target_accuracy is None:
        target_accuracy = default_target([summarize(records) for records in runs.values()])
    return {label: {"label": label, **summarize(records, target_accuracy)} for label, records in runs.items()}


def summarize(records: Iterable[dict], target_accuracy: float | None = None) -> dict:
    """Totals and means of a run (records in step order): accuracy, time and bytes to `target_accuracy`,
    bytes up, down and total, the uplink compression ratio, and the mean step-time split."""
    steps, first, last = 0, None, None
    up = down = dense_up = 0
    final_accuracy = best_accuracy = reached = None
    up_to_target = down_to_target = None
    split = {key: _Mean() for key, _ in SPLIT}
    for r in records:
        steps += 1
        first = first or r
        last = r
        up += r["bytes_up"]
        down += r["bytes_down"]
        dense_up += r["dense_bytes"]
        for key, mean in split.items():
            mean.add(r.get(key))
        accuracy = r.get("test_accuracy")
        if accuracy is not None:
            final_accuracy = accuracy
            best_accuracy = accuracy if best_accuracy is None else max(best_accuracy, accuracy)
            if reached is None and target_accuracy is not None and accuracy >= target_accuracy:
                reached, up_to_target, down_to_target = r, up, down
    summary = {
        "steps": steps,
        "time_s": training_time(first, last) if steps else 0.0,
        "final_loss": last["loss"] if steps else None,
        "final_test_accuracy": final_accuracy,
        "best_test_accuracy": best_accuracy,
        "target_accuracy": target_accuracy,
        "time_to_target_s": training_time(first, reached) if reached else None,
        "step_to_target": reached["step"] if reached else None,
        "bytes_up_to_target": up_to_target,
        "bytes_down_to_target": down_to_target,
        "bytes_total_to_target": up_to_target + down_to_target if reached else None,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_total": up + down,
        "dense_bytes_up": dense_up,
        "compression_ratio": dense_up / up if up else None,  # of the uplink: dense fp32 bytes / bytes up
    }
    for key, mean in split.items():
        summary[f"mean_{key}"] = mean.value()
    return summary


def training_time(first: dict, record: dict) -> float:
    """Seconds from the end of the run's first step (record `first`) to the end of `record`'s step.

    The first step also holds the workers' start-up (loading data, receiving the model), which in a comparison
    only the first run pays: counting from its end keeps the runs comparable.
    """
    return record["wall_s"] - first["wall_s"]


class _Mean:
    """A running mean that skips None (a worker's first step has no communication time) and non-finite values."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value) -> None:
        if value is not None and math.isfinite(value):
            self.total += value
            self.count += 1

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


# The CSV ----------------------------------------------------------------------------------------------------


# The columns of a PS's per-step record (services/ps/training.py), in its order, then the evaluation's: the
# header of a CSV with no records, and the first columns of any other.
CSV_COLUMNS = (
    "step",
    "time",
    "wall_s",
    "loss",
    "lr",
    "k",
    "workers",
    "bytes_up",
    "bytes_down",
    "dense_bytes",
    "encode_s",
    "compute_s",
    "communication_s",
    "wait_s",
    "decode_s",
    "update_s",
    "step_s",
    "test_accuracy",
    "test_loss",
)


def csv_chunks(records: Iterable[dict], rows_per_chunk: int = 1000) -> Iterator[str]:
    """The records as CSV text, a header row and then a chunk of rows at a time; without records, the header
    row alone. Columns: CSV_COLUMNS, then any other key of the records in first-seen order (one pass to find
    them, one to write); a record without a column has an empty cell there."""
    columns: dict[str, None] = dict.fromkeys(CSV_COLUMNS)
    for r in records:
        columns.update(dict.fromkeys(r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for i, r in enumerate(records, 1):
        writer.writerow(r)
        if i % rows_per_chunk == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def write_csv(records: Iterable[dict], path: str | Path) -> None:
    """A CSV copy of the records (`csv_chunks`)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.writelines(csv_chunks(records))


# Curves: what the plots draw, at most MAX_POINTS points per run -----------------------------------------------


class _Thinned:
    """At most `max_points` points of a series of unknown length: once full, every other point is dropped and
    from then on only every `stride`-th point is kept (the stride doubles). The last point is always kept."""

    def __init__(self, max_points: int = MAX_POINTS):
        self.max_points, self.stride, self.seen = max_points, 1, 0
        self.points: list[tuple] = []
        self.last: tuple | None = None

    def add(self, point: tuple) -> None:
        if self.seen % self.stride == 0:
            self.points.append(point)
            if len(self.points) > self.max_points:
                self.points, self.stride = self.points[::2], 2 * self.stride
        self.seen += 1
        self.last = point

    def columns(self, n: int) -> list[list[float]]:
        points = self.points + ([self.last] if self.points and self.points[-1] is not self.last else [])
        return [[p[i] for p in points] for i in range(n)]


@dataclass
class Curves:
    """One run's plotted series: training loss by step and time, test accuracy by time and MB sent (both
    ways) at each evaluation, and the mean seconds per step of each part of SPLIT."""

    loss_step: list[float] = field(default_factory=list)
    loss_time_s: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_time_s: list[float] = field(default_factory=list)
    eval_mb_total: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    split_s: dict[str, float | None] = field(default_factory=dict)


def curves(records: Iterable[dict], max_points: int = MAX_POINTS) -> Curves:
    """A run's Curves in one pass over its records; non-finite values (a diverging run) are left out."""
    losses, evals = _Thinned(max_points), _Thinned(max_points)
    split = {key: _Mean() for key, _ in SPLIT}
    first, sent = None, 0
    for r in records:
        first = first or r
        sent += r["bytes_up"] + r["bytes_down"]
        time_s = training_time(first, r)
        if _finite(r.get("loss")):
            losses.add((r["step"], time_s, r["loss"]))
        if _finite(r.get("test_accuracy")):
            evals.add((time_s, sent / 1e6, r["test_accuracy"]))
        for key, mean in split.items():
            mean.add(r.get(key))
    c = Curves(split_s={key: mean.value() for key, mean in split.items()})
    c.loss_step, c.loss_time_s, c.loss = losses.columns(3)
    c.eval_time_s, c.eval_mb_total, c.test_accuracy = evals.columns(3)
    return c


def accuracy_curve(records: Iterable[dict]) -> dict[str, list[float]]:
    """At each evaluation: training time, MB sent so far (both directions) and test accuracy."""
    c = curves(records)
    return {"time_s": c.eval_time_s, "mb_sent": c.eval_mb_total, "test_accuracy": c.test_accuracy}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# Plots -----------------------------------------------------------------------------------------------------


def plot(runs: dict[str, Iterable[dict]], out_dir: str | Path) -> list[Path]:
    """Write the PLOT_FILES for one run or several (one line or bar per label); return their paths."""
    out_dir = Path(out_dir)
    drawn = {label: curves(records) for label, records in runs.items()}
    paths = []
    for name in PLOT_FILES:
        path = out_dir / name
        path.write_bytes(render(drawn, name))
        paths.append(path)
    return paths


def render(runs: dict[str, Curves], name: str) -> bytes:
    """The PNG bytes of plot `name` (one of PLOT_FILES) for the labelled runs' Curves."""
    if name not in _PLOTS:
        raise ValueError(f"no plot named {name!r}; plots: {', '.join(PLOT_FILES)}")
    fig = _PLOTS[name](runs)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1)
    return out.getvalue()


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display, no global state); imported here, as it takes a second."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _no_data(axes, what: str) -> None:
    """An empty plot says why, without a meaningless scale."""
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].text(0.5, 0.5, what, transform=axes[0].transAxes, ha="center", va="center", color="0.4")


def _accuracy_by_time(runs: dict[str, Curves]):
    return accuracy_plot(
        runs, "eval_time_s", "training time (s), from the end of step 1", "Test accuracy against training time"
    )


def _accuracy_by_bytes(runs: dict[str, Curves]):
    return accuracy_plot(
        runs,
        "eval_mb_total",
        "MB sent, total of both directions (workers->PS + PS->workers), log scale",
        "Test accuracy against bytes sent",
        log_x=True,  # codecs differ by orders of magnitude in bytes
    )


def accuracy_plot(runs: dict[str, Curves], x: str, x_label: str, title: str, log_x: bool = False):
    """Test accuracy of every run against the curve field `x` (wall time, bytes, step): one line per run."""
    fig = figure(7, 4.5)
    ax = fig.add_subplot()
    styles = ("-", "--", ":")  # matplotlib's color cycle has 10 colors: runs beyond it change line style
    for i, (label, c) in enumerate(runs.items()):
        style = styles[(i // 10) % len(styles)]
        ax.plot(getattr(c, x), c.test_accuracy, style, marker="o", markersize=3, label=label)
    if not any(c.test_accuracy for c in runs.values()):
        _no_data([ax], "no evaluation yet")
    elif log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 1, 2, 5, 10, 20, ... MB: plain numbers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(c.test_accuracy for c in runs.values()):
        ax.legend(loc="lower right", fontsize="small" if len(runs) > 10 else None)
    return fig


def _training_loss(runs: dict[str, Curves]):
    """The training loss against step and against time: each step's loss faint, a moving average over it bold."""
    fig = figure(11, 4.5)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    drawn = any(c.loss for c in runs.values())
    positive = drawn and all(v > 0 for c in runs.values() for v in c.loss)
    for i, (label, c) in enumerate(runs.items()):
        color = f"C{i}"
        smooth = _moving_average(c.loss, max(1, len(c.loss) // 30))
        for ax, x in ((by_step, c.loss_step), (by_time, c.loss_time_s)):
            ax.plot(x, c.loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, smooth, color=color, linewidth=1.8, label=label)
    for ax, x_label in ((by_step, "step"), (by_time, "training time (s), from the end of step 1")):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if positive:
            ax.set_yscale("log")
    if not drawn:
        _no_data([by_step, by_time], "no step yet")
    by_step.set_ylabel("training loss" + (" (log scale)" if positive else ""))
    fig.suptitle("Training loss (faint: each step; bold: moving average)")
    if drawn:
        by_step.legend(loc="upper right")
    return fig


def _moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to `window - 1` values before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _step_time_split(runs: dict[str, Curves]):
    """Stacked bars of the mean per-step compute, encode and communication time in ms (the paper's Figure 2)."""
    labels = list(runs)
    fig = figure(max(5.0, 1.6 * len(labels) + 2.5), 4.5)
    ax = fig.add_subplot()
    bottom = [0.0] * len(labels)
    for key, name in SPLIT:
        heights = [1e3 * (runs[label].split_s.get(key) or 0.0) for label in labels]
        ax.bar(labels, heights, bottom=bottom, label=name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:.1f} ms", (x, total), xytext=(0, 3), textcoords="offset points", ha="center")
    ax.set_ylabel("mean time per step (ms)")
    ax.set_ylim(0, 1.15 * max(bottom, default=0) or 1)
    ax.set_title("Mean time per step: computation, encoding, communication", wrap=True)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncols=3)
    return fig


_PLOTS = {
    "accuracy_vs_time.png": _accuracy_by_time,
    "accuracy_vs_bytes.png": _accuracy_by_bytes,
    "training_loss.png": _training_loss,
    "step_time_split.png": _step_time_split,
}
PLOT_FILES = tuple(_PLOTS)  # the plots `plot` writes, by file name


# The table -------------------------------------------------------------------------------------------------

COLUMNS = (
    ("final test acc", "final_test_accuracy", "{:.4f}"),
    ("best test acc", "best_test_accuracy", "{:.4f}"),
    ("time to acc {target} (s)", "time_to_target_s", "{:.1f}"),
    ("MB up to acc {target}", "bytes_up_to_target", "mb"),
    ("MB total to acc {target}", "bytes_total_to_target", "mb"),
    ("training time (s)", "time_s", "{:.1f}"),
    ("steps", "steps", "{}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("MB up (workers->PS)", "bytes_up", "mb"),
    ("MB down (PS->workers)", "bytes_down", "mb"),
    ("MB total (up + down)", "bytes_total", "mb"),
    ("compression ratio (up)", "compression_ratio", "{:.1f}x"),
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
    """The summaries side by side: one column per run label, one row per quantity (COLUMNS)."""
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
