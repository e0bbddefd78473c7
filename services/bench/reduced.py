"""A results folder reduced to one JSON file that the report regenerates from, number for number.

`atomo bench` writes one record per step and run (tens of MB for the default suite); the report uses of them
only: the first record, the records at evaluation steps and the last (wall clock, step, accuracy, loss), the
bytes summed up to each of those, and the means over the steps after the first of every timing field. So
`reduce` keeps exactly that per run, with bench.json and gradients.json, and `expand` rebuilds a record list
of the run's length from it on which every statistic of services.bench.report (means after step 1, sums of
bytes to an evaluation, wall-clock times to an evaluation, mean seconds per step) equals the original's.
Per-step distributions (medians, percentiles) are not kept; the report uses none of a run's records beyond
those (the regime's medians are stored in bench.json itself).

    python -m services.bench.reduced RESULTS_DIR [OUT_JSON]   (default OUT_JSON: docs/benchmarks/bench.json)
    atomo bench --report-from docs/benchmarks/bench.json     regenerates docs/benchmarks.md from it
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from services.report import load_metrics

SUMMED = ("bytes_up", "bytes_down", "dense_bytes")  # summed to each kept record
KEPT = ("step", "wall_s", "loss", "test_accuracy", "test_loss")  # as they are, at each kept record
FORMAT = "atomo-bench-reduced/1"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def reduce_run(records: list[dict]) -> dict:
    """One run's records (step order) reduced: "first" (the first record whole), "kept" (the evaluation records
    and the last: KEPT fields and SUMMED fields summed since the previous kept record, inclusive), "means" (the
    mean of every other numeric field over the records after the first, over those that have it) and "n"."""
    if not records:
        return {"n": 0, "first": None, "kept": [], "means": {}}
    first, rest = records[0], records[1:]
    kept, sums = [], dict.fromkeys(SUMMED, 0)
    for i, r in enumerate(rest):
        for key in SUMMED:
            sums[key] += r.get(key) or 0
        if r.get("test_accuracy") is not None or i == len(rest) - 1:
            kept.append({**{k: r.get(k) for k in KEPT if k in r}, **sums})
            sums = dict.fromkeys(SUMMED, 0)
    fields = {k for r in rest for k, v in r.items() if _number(v)} - set(KEPT) - set(SUMMED)
    means = {}
    for key in sorted(fields):
        values = [r[key] for r in rest if _number(r.get(key))]
        means[key] = {"mean": sum(values) / len(values), "count": len(values)}
    return {"n": len(records), "first": first, "kept": kept, "means": means}


def expand(run: dict) -> list[dict]:
    """The record list of a reduced run: the first record as it was; then one record per step to the last,
    each kept record's step with its wall clock, accuracy and loss; the steps between interpolate the wall
    clock linearly and split the block's summed bytes evenly; every mean field holds the run's mean on as many
    records as had it (the first ones)."""
    first = run.get("first")
    if not first:
        return []
    out = [dict(first)]
    previous_step, previous_wall = first["step"], first["wall_s"]
    for kept in run["kept"]:
        span = kept["step"] - previous_step
        for j in range(1, span + 1):
            r = {"step": previous_step + j}
            r["wall_s"] = previous_wall + (kept["wall_s"] - previous_wall) * j / span
            for key in SUMMED:
                r[key] = kept[key] / span
            if j == span:
                r.update({k: kept[k] for k in KEPT if k in kept})
            out.append(r)
        previous_step, previous_wall = kept["step"], kept["wall_s"]
    rest = out[1:]
    for key, m in run["means"].items():
        for r in rest[: m["count"]]:
            r[key] = m["mean"]
    return out


def reduce(results: Path) -> dict:
    """The reduced form of a results folder: bench.json's fields, "format", "gradients" (gradients.json or
    None) and "runs": [{"case": case.json, "records": reduce_run(...)}] in case_id order."""
    results = Path(results)
    bench = json.loads((results / "bench.json").read_text(encoding="utf-8"))
    gradients_path = results / "gradients.json"
    gradients = json.loads(gradients_path.read_text(encoding="utf-8")) if gradients_path.exists() else None
    runs = []
    for folder in sorted((results / "runs").iterdir()) if (results / "runs").is_dir() else []:
        case_path = folder / "case.json"
        if not case_path.exists():
            continue
        case = json.loads(case_path.read_text(encoding="utf-8"))
        metrics = folder / "metrics.jsonl"
        records = load_metrics(metrics) if metrics.exists() else []
        runs.append({"case": case, "records": reduce_run(records)})
    return {**bench, "format": FORMAT, "gradients": gradients, "runs": runs}


def write(results: Path, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(reduce(results), separators=(",", ":")) + "\n", encoding="utf-8")
    return out


def is_reduced(path: Path) -> bool:
    """Whether `path` is a reduced results file (not a results folder)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(write(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks/bench.json")))
