"""`atomo bench`'s report: docs/benchmarks.md and its PNG plots, generated from a results folder.

The results folder (services/bench/runner.py writes it): bench.json (the command, machine, network, targets,
learning rates), runs/<case_id>/ with case.json and the PS's spec.json, metrics.jsonl and summary.json, and
gradients.json (services/bench/gradients.py). Everything is recomputed from the per-step records with
services.report's summaries: time to a target is from the end of step 1 to the first evaluation at or above it.

Measured and projected figures: "main" runs are real end-to-end runs at the headline profile. A time to
accuracy anywhere else is PROJECTED, and labelled so: steps to the target (of the main run, or of the
momentum-off run) x (step) the codec's mean measured seconds per step at that profile (its main or timing run),
counted, as measured times are, from the end of step 1.

Partial results never stop the report: a missing file, a failed run, a codec or profile without runs, a quick
run with a few codecs each become a sentence saying what is missing.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from services import report as run_report
from services.bench import scale
from services.bench.scale import step_time

PARTS = (
    ("compute_s", "compute"),
    ("encode_s", "encode"),
    ("communication_s", "communication"),
    ("decode_s", "PS decode"),
    ("update_s", "PS update"),
)
FAMILY_ORDER = ("dense", "svd", "qsgd", "terngrad", "lq", "entrywise", "fourier", "topk", "powersgd")
SCALE_CODECS = ("dense", "svd s=3", "svd s=3 paper", "qsgd b=4", "qsgd b=8", "terngrad", "topk k=3000", "powersgd r=4")
MODEL_LINE = (
    "T = C(n) + E + 2 L + n U / R_up + W / R_down + n d + P + A + o: a worker's compute and encode, the latency "
    "both ways, the bytes up (n U, at rate R_up) and down (W, at rate R_down) through the PS's link, the PS "
    "decoding n messages and its update, "
    "the worker applying the update (A) and a fixed overhead (services/bench/scale.py)."
)
TARGET_SPEEDUP_DENSE = 5.0
TARGET_SPEEDUP_QSGD = 2.0
TARGET_ACCURACY_GAP = 0.01
TARGET_ENCODE_SHARE = 0.15


@dataclass
class Case:
    """One run of the suite: its case.json, its per-step records (step order) and its folder."""

    case: dict
    records: list[dict]

    @property
    def label(self) -> str:
        return self.case.get("label", self.case.get("case_id", "?"))

    @property
    def phase(self) -> str:
        return self.case.get("phase", "")

    @property
    def profile(self) -> str:
        return self.case.get("profile") or "loopback"

    @property
    def ok(self) -> bool:
        return self.case.get("state") == "succeeded" and len(self.records) >= 2


@dataclass
class Results:
    bench: dict
    cases: list[Case]
    gradients: dict | None
    notes: list[str]

    def runs(self, phase: str, profile: str | None = None) -> dict[str, Case]:
        """The finished runs of `phase` (at `profile`), by label, in codec-family order."""
        found = [c for c in self.cases if c.ok and c.phase == phase and (profile is None or c.profile == profile)]
        return {c.label: c for c in sorted(found, key=lambda c: (_family_rank(c.label), c.label))}


def _family_rank(label: str) -> int:
    family = label.split()[0]
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        notes.append(f"`{path.name}` is missing from the results folder.")
    except (OSError, ValueError) as exc:
        notes.append(f"`{path}` could not be read ({type(exc).__name__}: {exc}).")
    return None


def load_results(results: Path) -> Results:
    """Everything the report reads from a results folder; what is missing or unreadable becomes a note."""
    results = Path(results)
    notes: list[str] = []
    bench = _read_json(results / "bench.json", notes) or {}
    gradients = _read_json(results / "gradients.json", notes)
    cases = []
    runs = results / "runs"
    for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
        case = _read_json(folder / "case.json", notes)
        if case is None:
            continue
        case.setdefault("case_id", folder.name)
        metrics = folder / "metrics.jsonl"
        try:
            records = run_report.load_metrics(metrics) if metrics.exists() else []
        except (OSError, ValueError, KeyError) as exc:
            notes.append(f"run `{folder.name}`: metrics.jsonl could not be read ({exc}).")
            records = []
        cases.append(Case(case, records))
    if not cases:
        notes.append("No run was found under `runs/`.")
    return Results(bench, cases, gradients, notes)


# Figures from the records -------------------------------------------------------------------------------------


def reached(records: list[dict], target: float) -> dict:
    """services.report.summarize against `target`: time, step and bytes to it (None where not reached)."""
    return run_report.summarize(records, target)


def projected_time(steps_to_target: int | None, first_step: int, seconds_per_step: float | None) -> float | None:
    """(steps to the target - the first step) x seconds per step: the PROJECTED time from the end of step 1."""
    if steps_to_target is None or seconds_per_step is None:
        return None
    return (steps_to_target - first_step) * seconds_per_step


def mean_parts(records: list[dict]) -> dict[str, float]:
    """Mean seconds per step of each part of PARTS, and "other" (the rest of the wall-clock step time)."""
    rows = records[1:] or records
    parts = {}
    for key, _ in PARTS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        parts[key] = statistics.fmean(values) if values else 0.0
    total = step_time(records) or 0.0
    parts["other_s"] = max(0.0, total - sum(parts.values()))
    return parts


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


def _fmt_x(ratio: float | None) -> str:
    return "-" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}x"


def _fmt_mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.3g}"


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# The speed-up tables -------------------------------------------------------------------------------------------


def time_to_targets(runs: dict[str, Case], targets: list[float]) -> dict[str, dict[float, dict]]:
    """{label: {target: services.report.summarize(records, target)}} of measured runs."""
    return {label: {t: reached(c.records, t) for t in targets} for label, c in runs.items()}


def speedup(dense_time: float | None, time_s: float | None) -> float | None:
    """dense's time to a target over the codec's (None unless both reached it and the codec took time)."""
    if dense_time is None or time_s is None or time_s <= 0:
        return None
    return dense_time / time_s


def _speedup_table(times: dict[str, dict[float, float | None]], targets: list[float]) -> list[str]:
    """The paper's Tables 3, 4 and 6: rows = target accuracies, columns = codecs, cells = time (speed-up)."""
    labels = list(times)
    rows = []
    for t in targets:
        dense = times.get("dense", {}).get(t)
        rows.append(
            [_fmt_acc(t)] + [f"{_fmt_s(times[lb][t])} ({_fmt_x(speedup(dense, times[lb][t]))})" for lb in labels]
        )
    return _table(["test accuracy", *labels], rows)


def _headline_section(res: Results, targets: list[float], headline: str, plots: Path, stem: str) -> list[str]:
    runs = res.runs("main", headline)
    out = [f"## Time to accuracy at the headline profile `{headline}` (measured)", ""]
    if not runs:
        return out + [f"No finished main run at `{headline}`.", ""]
    summaries = time_to_targets(runs, targets)
    out += ["Time from the end of step 1 to the first evaluation at or above each accuracy, and in brackets the "]
    out += ["speed-up over dense (dense's time / the codec's); `-`: not reached within the run.", ""]
    out += _speedup_table({lb: {t: s[t]["time_to_target_s"] for t in targets} for lb, s in summaries.items()}, targets)
    rows = []
    for label, c in runs.items():
        s = summaries[label][targets[0]] if targets else reached(c.records, 1.0)
        mb = [_fmt_mb(summaries[label][t]["bytes_up_to_target"]) for t in targets]
        step = step_time(c.records)
        rows.append(
            [label, _fmt_acc(s["final_test_accuracy"]), str(s["steps"]), f"{1e3 * step:.1f}" if step else "-", *mb]
        )
    head = ["codec", "final test accuracy", "steps", "ms / step", *(f"MB up to {_fmt_acc(t)}" for t in targets)]
    out += _table(head, rows)
    name = f"accuracy_vs_time_{_slug(headline)}.png"
    curves = {label: run_report.curves(c.records) for label, c in runs.items()}
    _save(
        run_report.accuracy_plot(
            curves,
            "eval_time_s",
            "training time (s) from the end of step 1, measured",
            f"Test accuracy against time at {headline} (measured)",
        ),
        plots / name,
    )
    out += [f"![test accuracy against measured time at {headline}]({stem}/{name})", ""]
    return out


def profile_step_times(res: Results, profile: str) -> dict[str, float]:
    """Mean seconds per step of each codec at `profile`, from its main run there, else its timing run."""
    out = {}
    for phase in ("timing", "main"):
        for label, c in res.runs(phase, profile).items():
            step = step_time(c.records)
            if step is not None:
                out[label] = step
    return out


def _projected_section(res: Results, targets: list[float], headline: str, plots: Path, stem: str) -> list[str]:
    main = res.runs("main", headline)
    profiles = sorted({c.profile for c in res.cases if c.ok and c.phase == "timing" and c.profile != headline})
    out = ["## Time to accuracy at the other profiles (PROJECTED)", ""]
    if not profiles:
        return out + ["No timing run at another profile: nothing to project.", ""]
    if not main:
        return out + [f"No main run at `{headline}` gives the steps to each target: nothing to project.", ""]
    out += ["PROJECTED: steps to the target of the codec's main run at the headline profile x its mean measured "]
    out += ["seconds per step at the profile (its timing run).", ""]
    for profile in profiles:
        steps = profile_step_times(res, profile)
        labels = [lb for lb in main if lb in steps]
        times = {}
        for label in labels:
            records = main[label].records
            times[label] = {
                t: projected_time(reached(records, t)["step_to_target"], records[0]["step"], steps[label])
                for t in targets
            }
        out += [f"### `{profile}` (projected)", ""] + _speedup_table(times, targets)
        missing = [lb for lb in main if lb not in steps]
        if missing:
            out += [f"No timing run at `{profile}` for: {', '.join(missing)}.", ""]
        curves = {}
        for label in labels:
            c = run_report.curves(main[label].records)
            first = main[label].records[0]["step"]
            evals = [r for r in main[label].records if r.get("test_accuracy") is not None]
            c.eval_time_s = [(r["step"] - first) * steps[label] for r in evals]
            c.test_accuracy = [r["test_accuracy"] for r in evals]
            curves[label] = c
        name = f"accuracy_vs_time_{_slug(profile)}_projected.png"
        _save(
            run_report.accuracy_plot(
                curves,
                "eval_time_s",
                "training time (s), PROJECTED: step x measured s/step",
                f"Test accuracy against PROJECTED time at {profile}",
            ),
            plots / name,
        )
        out += [f"![test accuracy against projected time at {profile}]({stem}/{name})", ""]
    return out


def _momentum_section(res: Results, targets: list[float], headline: str) -> list[str]:
    on, off = res.runs("main", headline), res.runs("momentum_off")
    out = ["## Momentum on (0.9) and off (0, the paper's setting)", ""]
    if not off:
        return out + ["No momentum-off run.", ""]
    steps = {label: step_time(c.records) for label, c in on.items()}
    out += ["Momentum on: measured (main runs). Momentum off: PROJECTED, the momentum-off run's steps to the target "]
    out += [f"x the codec's mean measured seconds per step at `{headline}` (its main run).", ""]
    rows = []
    for label, c in off.items():
        for t in targets:
            s_off = reached(c.records, t)
            s_on = reached(on[label].records, t) if label in on else None
            proj = projected_time(s_off["step_to_target"], c.records[0]["step"], steps.get(label))
            rows.append(
                [
                    label,
                    _fmt_acc(t),
                    str(s_on["step_to_target"] or "-") if s_on else "no run",
                    _fmt_s(s_on["time_to_target_s"]) if s_on else "-",
                    str(s_off["step_to_target"] or "-"),
                    _fmt_s(proj),
                ]
            )
        rows.append(
            [
                label,
                "final",
                _fmt_acc(reached(on[label].records, 1.0)["final_test_accuracy"]) if label in on else "-",
                "",
                _fmt_acc(reached(c.records, 1.0)["final_test_accuracy"]),
                "",
            ]
        )
    head = ["codec", "target", "steps (on)", "time (on, measured)", "steps (off)", "time (off, PROJECTED)"]
    return out + _table(head, rows)


# The time split and the bytes ------------------------------------------------------------------------------------


def _split_section(res: Results, plots: Path, stem: str) -> list[str]:
    out = ["## The time split per step (the paper's Figures 2 and 4) and bytes per message", ""]
    profiles = sorted({c.profile for c in res.cases if c.ok and c.phase in ("main", "timing")})
    if not profiles:
        return out + ["No main or timing run.", ""]
    out += ["Means per step after step 1 (ms): compute, encode and communication as the workers report them, the PS's "]
    out += ["decoding and optimizer step, and `other`: the rest of the wall-clock step (waiting, the worker applying "]
    out += ["the update, the protocol).", ""]
    for profile in profiles:
        merged = {**res.runs("timing", profile), **res.runs("main", profile)}
        runs = {lb: merged[lb] for lb in sorted(merged, key=lambda lb: (_family_rank(lb), lb))}
        parts = {label: mean_parts(c.records) for label, c in runs.items()}
        rows = []
        for label, p in parts.items():
            total = sum(p.values())
            rows.append(
                [
                    label,
                    *(f"{1e3 * p[k]:.1f}" for k, _ in PARTS),
                    f"{1e3 * p['other_s']:.1f}",
                    f"{1e3 * total:.1f}",
                    f"{100 * p['encode_s'] / total:.0f}%" if total else "-",
                ]
            )
        head = ["codec", *(n for _, n in PARTS), "other", "step", "encode share"]
        out += [f"### `{profile}`", ""] + _table(head, rows)
        name = f"time_split_{_slug(profile)}.png"
        _save(_split_plot(parts, f"Mean time per step at {profile}"), plots / name)
        out += [f"![time split at {profile}]({stem}/{name})", ""]
    rows, per_message = [], {}
    for c in sorted((c for c in res.cases if c.ok), key=lambda c: (c.phase, _family_rank(c.label))):
        rs = c.records[1:] or c.records
        k = statistics.fmean(r.get("k") or c.case.get("workers") or 1 for r in rs)
        workers = c.case.get("workers") or 1
        up = statistics.fmean(r["bytes_up"] for r in rs) / k
        down = statistics.fmean(r["bytes_down"] for r in rs) / workers
        dense = statistics.fmean(r["dense_bytes"] for r in rs) / k
        rows.append(
            [
                c.case["case_id"],
                c.label,
                c.case.get("downlink", "atoms"),
                str(workers),
                _fmt_mb(up),
                _fmt_mb(down),
                _fmt_x(dense / up if up else None),
            ]
        )
        if c.phase == "main":
            per_message[c.label] = (up, down)
    out += [
        "### Bytes per message",
        "",
        "Per worker and step: up, its gradient's messages; down, what the PS sends it ",
    ]
    out += ["(the k messages with the `atoms` downlink, the model with `model`).", ""]
    out += _table(["run", "codec", "downlink", "workers", "MB up", "MB down", "compression (up)"], rows)
    if per_message:
        _save(_bytes_plot(per_message), plots / "bytes_per_message.png")
        out += [f"![bytes per message]({stem}/bytes_per_message.png)", ""]
    return out


def _split_plot(parts: dict[str, dict[str, float]], title: str):
    labels = list(parts)
    fig = run_report.figure(max(5.0, 1.3 * len(labels) + 2.5), 4.5)
    ax = fig.add_subplot()
    bottom = [0.0] * len(labels)
    for key, name in (*PARTS, ("other_s", "other")):
        heights = [1e3 * parts[label][key] for label in labels]
        ax.bar(labels, heights, bottom=bottom, label=name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("mean time per step (ms)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncols=6)
    return fig


def _bytes_plot(per_message: dict[str, tuple[float, float]]):
    labels = list(per_message)
    fig = run_report.figure(max(5.0, 1.2 * len(labels) + 2.5), 4.5)
    ax = fig.add_subplot()
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [per_message[lb][0] / 1e6 for lb in labels], width=0.4, label="up (worker -> PS)")
    ax.bar([i + 0.2 for i in x], [per_message[lb][1] / 1e6 for lb in labels], width=0.4, label="down (PS -> worker)")
    ax.set_xticks(list(x), labels, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("MB per worker per step (log scale)")
    ax.set_title("Bytes per message, main runs")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return fig


# The gradient study ---------------------------------------------------------------------------------------------


def _gradient_section(res: Results, targets: list[float], headline: str, plots: Path, stem: str) -> list[str]:
    out = ["## Variance per byte on real gradients", ""]
    g = res.gradients
    if not g or not g.get("models"):
        return out + ["No gradient study (`gradients.json` is missing or empty).", ""]
    config = g.get("config", {})
    out += [
        f"{', '.join(m['title'] for m in g['models'].values())} trained with plain SGD (batch "
        f"{config.get('batch_size')}, lr {config.get('lr')}) on {g.get('dataset_note', g.get('dataset'))}; "
        f"gradients captured at steps {g.get('capture_steps')}; {'QUICK mode; ' if g.get('quick') else ''}"
        f"the study took {g.get('duration_s', 0):.0f} s with {g.get('threads')} threads. Relative variance: "
        "E||g^ - g||^2 / ||g||^2 of "
        f"the whole gradient at step {max(g.get('capture_steps') or [0])} over {config.get('encodings')} independent "
        "encodings (mean +- standard error); for the BIASED codecs (top-k, PowerSGD) the squared relative error of "
        "one compression without error feedback. Bytes: the messages' lengths (1-D tensors dense, as the runtime "
        "sends them). Times: median over the encodings, this CPU.",
        "",
    ]
    for model in g["models"].values():
        rows = []
        for c in model["codecs"]:
            if c.get("error"):
                rows.append(
                    [c["label"] + (" (biased)" if c.get("biased") else ""), "failed: " + c["error"], "", "", "", ""]
                )
                continue
            rows.append(
                [
                    c["label"] + (" (biased)" if c.get("biased") else ""),
                    _fmt_variance(c.get("relative_variance"), c.get("stderr")),
                    _fmt_mb(c["bytes"]),
                    _fmt_x(model["dense_bytes"] / c["bytes"]),
                    f"{1e3 * c['encode_s']:.0f}",
                    f"{1e3 * c['decode_s']:.0f}",
                ]
            )
        out += [
            f"### {model['title']} ({model['parameters']:,} parameters, {_fmt_mb(model['dense_bytes'])} MB dense)",
            "",
        ]
        out += _table(["codec", "relative variance", "MB", "compression", "encode ms", "decode ms"], rows)
    _save(_variance_plot(g["models"]), plots / "variance_per_byte.png")
    out += [f"![variance per byte]({stem}/variance_per_byte.png)", ""]
    out += _theorem6_section(g)
    out += _spectrum_section(g, plots, stem)
    out += _reshape_section(res, g, targets, headline)
    return out


def _variance_plot(models: dict):
    fig = run_report.figure(6 * len(models), 4.8)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models.values(), strict=True):
        families: dict[str, list[dict]] = {}
        for c in model["codecs"]:
            if not c.get("error") and (c.get("relative_variance") or 0) > 0 and c.get("stderr") is not None:
                families.setdefault(c["family"], []).append(c)
        for i, (family, rows) in enumerate(families.items()):
            biased = rows[0].get("biased")
            ax.errorbar(
                [r["bytes"] / 1e6 for r in rows],
                [r["relative_variance"] for r in rows],
                yerr=[r["stderr"] for r in rows],
                marker="o",
                linestyle="-",
                color=f"C{i}",
                markerfacecolor="none" if biased else f"C{i}",
                label=family + (" (biased)" if biased else ""),
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MB per gradient (log)")
        ax.set_ylabel("E||g^-g||^2 / ||g||^2 (log)")
        ax.set_title(f"{model['title']}: variance per byte (dense: {model['dense_bytes'] / 1e6:.1f} MB)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig


def _theorem6_section(g: dict) -> list[str]:
    steps = g.get("capture_steps") or []
    out = ["## Theorem 6 per layer: when spectral beats entry-wise", ""]
    out += ["Ratio (n+m) ||X||_*^2 / ||X||_{1,1}^2 of each layer's matrix view (`rows`: [out, in*k*k]); <= 1 means "]
    out += ["spectral ATOMO has at most entry-wise ATOMO's variance at the same communication (Theorem 6). Top-3: "]
    out += ["share of ||X||_F^2 in the 3 largest singular values.", ""]
    for model in g["models"].values():
        layers = model["layers"]
        rows = []
        for layer in layers:
            rows.append(
                [
                    f"`{layer['name']}`",
                    "x".join(map(str, layer["shape"])),
                    "x".join(map(str, layer["rows"])),
                    *(_fmt_ratio(r) for r in layer["theorem6_rows"]),
                    _fmt_ratio(layer["theorem6_paper"][-1]),
                    _fmt_acc(layer["top3_energy"][-1]),
                ]
            )
        counts = []
        for i, step in enumerate(steps):
            ok = sum(1 for layer in layers if layer["theorem6_rows"][i] is not None and layer["theorem6_rows"][i] <= 1)
            counts.append(f"{ok} of {len(layers)} at step {step}")
        out += [f"### {model['title']}: ratio <= 1 on {', '.join(counts)}", ""]
        head = ["layer", "shape", "rows view", *(f"step {s}" for s in steps), f"paper view, step {steps[-1]}", "top-3"]
        out += _table(head, rows)
    return out


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"**{value:.3g}**" if value <= 1 else f"{value:.3g}"


def _spectrum_section(g: dict, plots: Path, stem: str) -> list[str]:
    models = [m for m in g["models"].values() if m.get("spectra")]
    if not models:
        return []
    columns = max(len(m["spectra"]) for m in models)
    fig = run_report.figure(4.2 * columns, 3.6 * len(models))
    axes = fig.subplots(len(models), columns, squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for ax, spectrum in zip(row, model["spectra"], strict=False):
            for step, values in zip(g["capture_steps"], spectrum["values"], strict=True):
                ax.plot(range(1, len(values) + 1), values, marker=".", label=f"step {step}")
            ax.set_yscale("log")
            ax.set_title(f"{model['title']} {spectrum['name']}\n({'x'.join(map(str, spectrum['rows']))})", fontsize=9)
            ax.set_xlabel("index i")
            ax.set_ylabel("sigma_i / sigma_1")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    _save(fig, plots / "spectrum.png")
    return [
        "## The singular value spectrum over training (the paper's Figure 1)",
        "",
        f"![normalized singular values]({stem}/spectrum.png)",
        "",
    ]


def _reshape_section(res: Results, g: dict, targets: list[float], headline: str) -> list[str]:
    out = ["## Reshape policies: `rows` against `paper`", ""]
    out += ["`rows`: [out, in*k*k]; `paper`: [out*in/2, 2k^2] (Section 6). Gradient study figures as above.", ""]
    for model in g["models"].values():
        by_label = {c["label"]: c for c in model["codecs"] if not c.get("error")}
        rows = []
        for s in (1, 2, 3, 4):
            for reshape, label in (("rows", f"svd s={s}"), ("paper", f"svd s={s} paper")):
                c = by_label.get(label)
                if c:
                    rows.append(
                        [
                            f"s={s}",
                            reshape,
                            _fmt_mb(c["bytes"]),
                            _fmt_variance(c.get("relative_variance"), c.get("stderr")),
                            f"{1e3 * c['encode_s']:.0f}",
                        ]
                    )
        out += [f"### {model['title']}", ""] + _table(
            ["budget", "reshape", "MB", "relative variance", "encode ms"], rows
        )
    main = res.runs("main", headline)
    pair = [lb for lb in ("svd s=3", "svd s=3 paper") if lb in main]
    if pair:
        rows = [
            [
                lb,
                *(_fmt_s(reached(main[lb].records, t)["time_to_target_s"]) for t in targets),
                _fmt_acc(reached(main[lb].records, 1.0)["final_test_accuracy"]),
            ]
            for lb in pair
        ]
        out += [f"Time to accuracy, main runs at `{headline}` (measured):", ""]
        out += _table(["codec", *(_fmt_acc(t) for t in targets), "final"], rows)
    else:
        out += ["No main run of `svd s=3` or `svd s=3 paper`: no time to accuracy for the reshapes.", ""]
    return out


# The scale model ------------------------------------------------------------------------------------------------


def scale_section(res: Results, plots: Path, stem: str, headline: str) -> list[str]:
    out = ["## Scale beyond this machine: a calibrated model of the step time", "", MODEL_LINE, ""]
    timings = []
    for c in res.cases:
        if c.ok and c.phase in ("main", "scale", "timing", "downlink", "momentum_off"):
            t = scale.run_timing(c.case, c.records)
            if t is not None:
                timings.append(t)
    if not timings:
        return out + ["No measured run to calibrate the model on.", ""]
    cal = scale.fit(timings)
    rows = []
    for profile, link in cal.links.items():
        cells = [f"`{profile}`"]
        for rate, eff in ((link.rate_up_bps, link.efficiency_up), (link.rate_down_bps, link.efficiency_down)):
            cells += ["not resolved" if not math.isfinite(rate) else f"{rate / 1e6:.1f}"]
            cells += ["-" if eff is None else f"{eff:.2f}"]
        rows.append([*cells, f"{1e3 * link.overhead_s:.2f}", str(link.runs)])
    out += [
        f"Fitted on {len(timings)} runs: a worker's compute C(n) = a + b / n with a = "
        f"{1e3 * cal.compute_fixed_s:.2f} ms and b = {1e3 * cal.compute_scaled_s:.2f} ms; PS update P = "
        f"{1e3 * cal.update_s:.2f} ms.",
        "",
    ]
    header = ["profile", "R_up (MB/s)", "efficiency up", "R_down (MB/s)", "efficiency down", "overhead o (ms)", "runs"]
    out += _table(header, rows)
    rows = [[lb, f"{1e3 * cal.encode_s[lb]:.2f}", f"{1e3 * cal.decode_per_message_s[lb]:.2f}"] for lb in cal.encode_s]
    out += _table(["codec", "encode E (ms)", "PS decode d per message (ms)"], rows)
    checked = [t for t in timings if 2 <= t.workers <= 4 and t.phase in ("main", "scale")]
    rows, errors = [], []
    for t in checked:
        predicted = scale.predict_run(t, cal)
        errors.append(predicted / t.step_s - 1)
        rows.append(
            [
                t.case_id,
                t.label,
                f"`{t.profile}`",
                str(t.workers),
                t.downlink,
                f"{1e3 * t.step_s:.1f}",
                f"{1e3 * predicted:.1f}",
                f"{100 * errors[-1]:+.0f}%",
            ]
        )
    out += ["### Fit residuals (in-sample): predicted against measured (main and scale runs, 2 to 4 workers)", ""]
    out += [
        "The model was fitted on these runs among others, so these errors are residuals of the fit, "
        "not an out-of-sample test.",
        "",
    ]
    out += _table(["run", "codec", "profile", "workers", "downlink", "measured ms/step", "predicted", "error"], rows)
    if errors:
        out += [
            f"Mean absolute residual (in-sample) {100 * statistics.fmean(abs(e) for e in errors):.0f}%, largest "
            f"{100 * max(abs(e) for e in errors):.0f}%.",
            "",
        ]
    out += _held_out_section(timings)
    out += _predictions(res, cal, headline, plots, stem)
    return out


def _held_out_section(timings: list[scale.RunTiming]) -> list[str]:
    """Fit on the 2- and 3-worker runs, predict the 4-worker runs: the model's out-of-sample error per codec."""
    out = ["### Held out: fitted on 2 and 3 workers, predicting 4", ""]
    try:
        _, tested = scale.held_out(timings, (2, 3), (4,))
    except ValueError as exc:
        return out + [f"Not tested: {exc}.", ""]
    rows = [
        [h.run.case_id, h.run.label, h.run.downlink, f"{1e3 * h.run.step_s:.1f}", f"{1e3 * h.predicted_s:.1f}",
         f"{100 * h.error:+.0f}%"]
        for h in tested
    ]  # fmt: skip
    out += _table(["run", "codec", "downlink", "measured ms/step", "predicted", "error"], rows)
    errors = scale.held_out_errors(tested)
    out += [
        "Mean absolute held-out error per codec: "
        + ", ".join(f"{label} {100 * e:.0f}%" for label, e in errors.items())
        + f" (all: {100 * statistics.fmean(abs(h.error) for h in tested):.0f}%).",
        "",
    ]
    return out


def _predictions(res: Results, cal: scale.Calibration, headline: str, plots: Path, stem: str) -> list[str]:
    g = res.gradients
    out = ["### Predicted speed-up over dense per step, 8 to 256 workers", ""]
    if not g or not g.get("models"):
        return out + ["No gradient study: no message sizes for ResNet-18 and VGG-11-BN.", ""]
    link = cal.links.get(headline)
    # A token bucket lets a short burst through faster than its rate, so small messages can fit an efficiency
    # above 1; the sustained transfers of the predictions cannot exceed the link's rate.
    eff_up = min(1.0, link.efficiency_up) if link and link.efficiency_up else 1.0
    eff_down = min(1.0, link.efficiency_down) if link and link.efficiency_down else 1.0
    fitted = (
        f"fitted at {headline}, capped at 1 for sustained transfers"
        if link and (link.efficiency_up or link.efficiency_down)
        else "assumed: no emulated link was fitted"
    )
    overhead = link.overhead_s if link else 0.0
    gpu = {k: m["gpu_compute_s"] for k, m in g["models"].items() if isinstance(m.get("gpu_compute_s"), (int, float))}
    out += [
        f"Each worker computes a batch of {scale.DEFAULT_BATCH_PER_WORKER} on a GPU in "
        + ", ".join(
            f"{gpu.get(k, scale.DEFAULT_GPU_COMPUTE_S[k]) * 1e3:.0f} ms ({g['models'][k]['title']}, "
            + ("measured on a GPU" if k in gpu else "an ASSUMPTION, not measured")
            + ")"
            for k in scale.DEFAULT_GPU_COMPUTE_S
            if k in g["models"]
        )
        + " (a parameter of services.bench.scale.predict); message bytes, encode and PS decode times "
        "are the gradient study's (this CPU), the PS update its measured optimizer step; link efficiency "
        f"{eff_up:.2f} up, {eff_down:.2f} down ({fitted})"
        f", per-step overhead {1e3 * overhead:.1f} ms (fitted), one-way latency "
        f"{scale.PREDICTION_LATENCY_S * 1e3:.1f} ms. Each cell uses the cheaper downlink (atoms or model). This is a "
        "speed-up PER STEP: with equal steps to the target it is the speed-up in time to accuracy.",
        "",
    ]
    fig = run_report.figure(5.5 * len(scale.PREDICTION_GBIT), 4 * len(g["models"]))
    axes = fig.subplots(len(g["models"]), len(scale.PREDICTION_GBIT), squeeze=False)
    statements = []
    paper_rows: list[list[str]] = []
    for axes_row, (key, model) in zip(axes, g["models"].items(), strict=True):
        costs = {
            c["label"]: scale.CodecCost(c["label"], c["bytes"], c["encode_s"], c["decode_s"])
            for c in model["codecs"]
            if not c.get("error") and c["label"] in SCALE_CODECS
        }
        if "dense" not in costs:
            out += [f"{model['title']}: no dense figures in the study.", ""]
            continue
        compute = gpu.get(key, scale.DEFAULT_GPU_COMPUTE_S.get(key, model.get("compute_s", 0.0)))
        update = model.get("update_s", cal.update_s)
        rates = [gbit * 1e9 / 8 * eff_up for gbit in scale.PREDICTION_GBIT]
        down_ratio = eff_down / eff_up
        table = scale.speedups(
            costs,
            "dense",
            scale.PREDICTION_WORKERS,
            rates,
            compute,
            update,
            model["dense_bytes"],
            overhead_s=overhead,
            down_ratio=down_ratio,
        )
        if key == scale.PAPER_TABLE6["model"]:
            paper_rows.append(_paper_row(model, costs, compute, key in gpu, update, eff_up, eff_down, overhead))
        labels = [lb for lb in SCALE_CODECS if lb in costs and lb != "dense"]
        for ax, gbit, rate in zip(axes_row, scale.PREDICTION_GBIT, rates, strict=True):
            rows = []
            for n in scale.PREDICTION_WORKERS:
                p = scale.predict(
                    costs.get("svd s=3", costs["dense"]),
                    n,
                    rate,
                    compute,
                    update,
                    model["dense_bytes"],
                    overhead_s=overhead,
                    down_rate_bps=rate * down_ratio,
                )
                rows.append([str(n), *(_fmt_x(table[rate][n][lb]) for lb in labels), f"{p.bottleneck} ({p.downlink})"])
            out += [f"#### {model['title']} at {gbit:g} Gbit/s", ""]
            out += _table(["workers", *labels, "svd s=3: largest part, downlink"], rows)
            for lb in labels:
                ax.plot(
                    scale.PREDICTION_WORKERS,
                    [table[rate][n][lb] for n in scale.PREDICTION_WORKERS],
                    marker="o",
                    label=lb,
                )
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="dense (y = 1)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model['title']}, {gbit:g} Gbit/s (predicted)", fontsize=9)
            ax.set_xlabel("workers")
            ax.set_ylabel("speed-up per step over dense")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            for lb in ("dense", "svd s=3"):
                if lb in costs:
                    found = scale.ps_bottleneck_workers(costs[lb], rate, compute, update, model["dense_bytes"])
                    single = scale.predict(
                        costs[lb], 256, rate, compute, update, model["dense_bytes"], overhead_s=overhead
                    )
                    gains = [
                        single.step_s
                        / scale.predict(
                            costs[lb], 256, rate, compute, update, model["dense_bytes"], overhead_s=overhead, shards=s
                        ).step_s
                        for s in (4, 16)
                    ]
                    where = (
                        f"from {found[0]} worker{'s' if found[0] > 1 else ''} on ({found[1]})"
                        if found
                        else "not up to 4096 workers"
                    )
                    statements.append(
                        f"- {model['title']}, {lb}, {gbit:g} Gbit/s: the single PS takes longer than the "
                        f"workers {where}; at 256 workers a PS sharded 4 / 16 ways would be "
                        f"{_fmt_x(gains[0])} / {_fmt_x(gains[1])} faster per step."
                    )
    _save(fig, plots / "scale_speedup.png")
    out += [f"![predicted speed-up]({stem}/scale_speedup.png)", ""]
    if paper_rows:
        cfg = scale.PAPER_TABLE6
        out += [
            "### The paper's Table 6 configuration",
            "",
            f"VGG-11-BN, {cfg['workers']} workers, the PS sending the model down (as the paper's PS does), "
            f"{cfg['gbit']:g} Gbit/s (an ASSUMPTION: EC2's 'moderate' network of g2.2xlarge); predicted speed-up "
            "PER STEP against the paper's measured speed-up in time to the target (Table 6).",
            "",
        ]
        labels = list(scale.PAPER_TABLE6_SPEEDUPS)
        header = ["configuration", "compute per worker step", *(f"{lb} predicted" for lb in labels)]
        header += [f"{lb} paper" for lb in labels]
        out += _table(header, paper_rows)
    out += ["### Where the single PS becomes the bottleneck", ""]
    return out + statements + [""]


def _paper_row(model, costs, compute, measured, update, eff_up, eff_down, overhead) -> list[str]:
    """The Table 6 row: predicted per-step speed-ups over dense with the paper's model downlink."""
    cfg = scale.PAPER_TABLE6
    rate = cfg["gbit"] * 1e9 / 8
    args = dict(overhead_s=overhead, down_rate_bps=rate * eff_down, downlinks=(cfg["downlink"],))
    step = {
        lb: scale.predict(c, cfg["workers"], rate * eff_up, compute, update, model["dense_bytes"], **args).step_s
        for lb, c in costs.items()
    }
    cells = [f"{model['title']}, {cfg['workers']} workers, {cfg['gbit']:g} Gbit/s, model downlink"]
    cells += [f"{1e3 * compute:.0f} ms ({'measured on a GPU' if measured else 'ASSUMED'})"]
    cells += [_fmt_x(step["dense"] / step[lb]) if lb in step else "-" for lb in scale.PAPER_TABLE6_SPEEDUPS]
    return cells + [f"{x:.2f}x" for x in scale.PAPER_TABLE6_SPEEDUPS.values()]


# The targets ---------------------------------------------------------------------------------------------------


def evaluate_targets(res: Results, targets: list[float], headline: str) -> list[dict]:
    """The four targets (spectral ATOMO against dense and QSGD, accuracy, encode share) at the headline profile:
    name, measured value, PASS/MISS (or n/a), blame."""
    main = res.runs("main", headline)
    dense = main.get("dense")
    spectral = {lb: c for lb, c in main.items() if lb.startswith("svd")}
    qsgd = {lb: c for lb, c in main.items() if lb.startswith("qsgd")}
    rows = []
    names = [
        f"spectral ATOMO >= {TARGET_SPEEDUP_DENSE:g}x faster than dense to the target",
        f"spectral ATOMO >= {TARGET_SPEEDUP_QSGD:g}x faster than the best QSGD",
        f"spectral ATOMO's final accuracy within {100 * TARGET_ACCURACY_GAP:g} point of dense",
        f"encode share of spectral ATOMO's step <= {100 * TARGET_ENCODE_SHARE:g}%",
    ]
    if dense is None or not spectral:
        why = "no main run of dense" if dense is None else "no main run of spectral ATOMO (svd)"
        return [{"target": n, "value": "-", "result": "n/a", "blame": why} for n in names]
    reached_by_dense = [t for t in targets if reached(dense.records, t)["time_to_target_s"] is not None]
    target = max(reached_by_dense) if reached_by_dense else None
    if target is None:
        best_label = max(spectral, key=lambda lb: reached(spectral[lb].records, 1.0)["final_test_accuracy"] or 0)
    else:
        times = {lb: reached(c.records, target)["time_to_target_s"] for lb, c in spectral.items()}
        best_label = min(spectral, key=lambda lb: math.inf if times[lb] is None else times[lb])
    best = spectral[best_label]
    parts = mean_parts(best.records)
    step = step_time(best.records) or math.nan
    blame_step = _largest_part(parts, step)
    if target is None:
        rows += [
            {"target": n, "value": "-", "result": "n/a", "blame": "dense reached none of the targets"}
            for n in names[:2]
        ]
    else:
        d, s = reached(dense.records, target), reached(best.records, target)
        value = speedup(d["time_to_target_s"], s["time_to_target_s"])
        blame = ""
        if value is None:
            blame = f"{best_label} did not reach {_fmt_acc(target)} within its run"
        elif value < TARGET_SPEEDUP_DENSE:
            steps_ratio = (d["step_to_target"] - dense.records[0]["step"]) / max(
                1, s["step_to_target"] - best.records[0]["step"]
            )
            step_ratio = (step_time(dense.records) or math.nan) / step
            blame = (
                f"{_fmt_x(value)} = {_fmt_x(steps_ratio)} (steps to target, dense / {best_label}) x "
                f"{_fmt_x(step_ratio)} (time per step); {best_label}'s step: {blame_step}"
            )
        rows.append(
            {
                "target": names[0] + f" ({_fmt_acc(target)}, {best_label})",
                "value": _fmt_x(value),
                "result": _pass(value is not None and value >= TARGET_SPEEDUP_DENSE),
                "blame": blame,
            }
        )
        q_times = {lb: reached(c.records, target)["time_to_target_s"] for lb, c in qsgd.items()}
        reached_q = {lb: t for lb, t in q_times.items() if t is not None}
        if not qsgd:
            rows.append({"target": names[1], "value": "-", "result": "n/a", "blame": "no main run of QSGD"})
        elif s["time_to_target_s"] is None:
            rows.append({"target": names[1], "value": "-", "result": "MISS", "blame": blame})
        elif reached_q:
            q_label = min(reached_q, key=reached_q.get)
            ratio = speedup(reached_q[q_label], s["time_to_target_s"])
            q_step = step_time(qsgd[q_label].records) or math.nan
            miss = (
                ""
                if ratio and ratio >= TARGET_SPEEDUP_QSGD
                else (
                    f"time per step {q_label} / {best_label} = {_fmt_x(q_step / step)}; "
                    f"{best_label}'s step: {blame_step}"
                )
            )
            rows.append(
                {
                    "target": names[1] + f" ({q_label})",
                    "value": _fmt_x(ratio),
                    "result": _pass(ratio is not None and ratio >= TARGET_SPEEDUP_QSGD),
                    "blame": miss,
                }
            )
        else:
            # No QSGD run reached the target within its length, so the shortest run's length bounds the best
            # QSGD's time from below (the longest would not).
            shortest = min(run_report.summarize(c.records)["time_s"] for c in qsgd.values())
            bound = speedup(shortest, s["time_to_target_s"])
            ok = bound is not None and bound >= TARGET_SPEEDUP_QSGD
            rows.append(
                {
                    "target": names[1],
                    "value": f"> {_fmt_x(bound)} (no QSGD run reached {_fmt_acc(target)})",
                    "result": _pass(ok),
                    "blame": "" if ok else "QSGD's runs were too short to bound the ratio",
                }
            )
    dense_final = reached(dense.records, 1.0)["final_test_accuracy"]
    best_final = reached(best.records, 1.0)["final_test_accuracy"]
    gap = None if dense_final is None or best_final is None else dense_final - best_final
    rows.append(
        {
            "target": names[2] + f" ({best_label})",
            "value": "-" if gap is None else f"{100 * -gap:+.1f} points against dense",
            "result": "n/a" if gap is None else _pass(gap <= TARGET_ACCURACY_GAP),
            "blame": ""
            if gap is None or gap <= TARGET_ACCURACY_GAP
            else "convergence: the estimate's variance at this lr and step count",
        }
    )
    share = parts["encode_s"] / step if step and math.isfinite(step) else None
    rows.append(
        {
            "target": names[3] + f" ({best_label})",
            "value": "-" if share is None else f"{100 * share:.1f}%",
            "result": "n/a" if share is None else _pass(share <= TARGET_ENCODE_SHARE),
            "blame": "" if share is None or share <= TARGET_ENCODE_SHARE else f"encoding: {blame_step}",
        }
    )
    return rows


def _pass(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _largest_part(parts: dict[str, float], step: float) -> str:
    names = {**dict(PARTS), "other_s": "other"}
    ordered = sorted(parts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{names[k]} {1e3 * v:.1f} ms ({100 * v / step:.0f}%)" for k, v in ordered[:3] if step) + (
        f" of {1e3 * step:.1f} ms" if step else ""
    )


def _targets_section(res: Results, targets: list[float], headline: str) -> list[str]:
    rows = [[r["target"], r["value"], r["result"], r["blame"] or "-"] for r in evaluate_targets(res, targets, headline)]
    out = [
        "## Targets",
        "",
        f"At the headline profile `{headline}`; the target accuracy is the highest of "
        f"{', '.join(_fmt_acc(t) for t in targets)} that dense reached; the spectral run is the fastest `svd` run "
        "to it.",
        "",
    ]
    return out + _table(["target", "measured", "result", "to blame (for a miss)"], rows)


# Downlink --------------------------------------------------------------------------------------------------------


def _downlink_section(res: Results) -> list[str]:
    out = ["## Downlink: `atoms` against `model`", ""]
    model_runs = [c for c in res.cases if c.ok and c.phase == "downlink"]
    if not model_runs:
        return out + ["No downlink run.", ""]
    rows = []
    for c in model_runs:
        atoms = [
            a
            for a in res.cases
            if a.ok
            and a.phase in ("main", "timing", "scale")
            and a.label == c.label
            and a.profile == c.profile
            and a.case.get("workers") == c.case.get("workers")
            and a.case.get("downlink", "atoms") != c.case.get("downlink")
        ]
        for run in [*atoms[:1], c]:
            rs = run.records[1:]
            rows.append(
                [
                    run.label,
                    f"`{run.profile}`",
                    run.case.get("downlink", "atoms"),
                    str(run.case.get("workers")),
                    f"{1e3 * (step_time(run.records) or 0):.1f}",
                    _fmt_mb(statistics.fmean(r["bytes_down"] for r in rs)),
                    f"{1e3 * mean_parts(run.records)['communication_s']:.1f}",
                ]
            )
    out += [
        "Measured means per step (`atoms`: the main run at the same profile and worker count, where there is one).",
        "",
    ]
    return out + _table(
        ["codec", "profile", "downlink", "workers", "ms / step", "MB down / step", "communication ms"], rows
    )


# The whole report ----------------------------------------------------------------------------------------------


def _header(res: Results, results: Path) -> list[str]:
    b = res.bench
    date = (b.get("finished") or b.get("started") or time.strftime("%Y-%m-%d")).split("T")[0]
    out = ["# atomo benchmarks", "", f"<!-- generated by `atomo bench` on {date}; do not edit by hand -->", ""]
    out += [f"Generated by `atomo bench` on {date}; do not edit by hand.", ""]
    if b.get("quick"):
        out += ["**Quick run** (`atomo bench --quick`): a first look, fewer codecs, profiles and steps.", ""]
    machine = b.get("machine") or {}
    network = b.get("network") or {}
    regime = b.get("regime") or {}
    out += ["## How it was run", ""]
    out += [f"- Command: `{b.get('command', '(unknown: bench.json is missing)')}`"]
    out += [
        f"- Started {b.get('started', '-')}, finished {b.get('finished', '-')}; phases (s): "
        + (", ".join(f"{k} {v:.0f}" for k, v in (b.get("phases") or {}).items()) or "-")
    ]
    out += ["- Machine: " + (", ".join(f"{k} {v}" for k, v in machine.items()) or "unknown")]
    out += [f"- Model {b.get('model', '-')} on {b.get('dataset', '-')}, {b.get('workers', '-')} workers"]
    if network:
        emulated = "emulated (network namespaces, tc)" if network.get("emulated") else "loopback, not emulated"
        out += [f"- Network: {emulated}" + (f": {network['reason']}" if network.get("reason") else "")]
        no_latency = network.get("emulated") and network.get("latency_emulated") is False
        if no_latency:
            out += [f"- Latency NOT emulated (bandwidth only): {network.get('latency_reason') or 'no netem qdisc'}"]
        for name, p in (network.get("profiles") or {}).items():
            latency = f"{p.get('latency_ms')} ms" + (" (not applied)" if no_latency else "")
            out += [f"  - `{name}`: {p.get('bandwidth_mbit')} Mbit/s, {latency}"]
    out += [f"- Headline profile: `{b.get('headline_profile', '-')}`"]
    if regime:
        ratios = ", ".join(
            f"`{k}` {'-' if v is None else f'{v:.3g}'}" for k, v in (regime.get("dense_comm_to_compute") or {}).items()
        )
        out += [
            f"- Regime: dense SGD's communication-to-compute ratio per step {ratios or '-'} (the paper's: "
            f"{regime.get('paper_comm_to_compute', '-')}); {regime.get('how', '')}"
        ]
    out += [
        f"- Step sizes: {b.get('lr_rule', '-')}; chosen: "
        + (", ".join(f"{k} {v:g}" for k, v in (b.get("lrs") or {}).items()) or "-")
    ]
    out += [f"- Results folder: `{results}`", ""]
    return out


def _runs_section(res: Results) -> list[str]:
    failed = [c for c in res.cases if not c.ok]
    phases: dict[str, int] = {}
    for c in res.cases:
        if c.ok:
            phases[c.phase] = phases.get(c.phase, 0) + 1
    out = [
        "## Runs",
        "",
        "Finished runs by phase: " + (", ".join(f"{k} {v}" for k, v in phases.items()) or "none") + ".",
    ]
    if failed:
        out += ["", "Runs that did not finish (left out of every table):", ""]
        out += [
            f"- `{c.case.get('case_id')}` ({c.label}, {c.phase}): state {c.case.get('state')}, "
            f"{len(c.records)} steps recorded" + (f", error: {c.case['error']}" if c.case.get("error") else "")
            for c in failed
        ]
    return out + [""]


def build_report(results: Path, plots: Path, stem: str) -> str:
    """The markdown of the report on `results`, writing its PNGs into `plots` (linked as `stem/NAME.png`)."""
    res = load_results(results)
    plots.mkdir(parents=True, exist_ok=True)
    targets = sorted(float(t) for t in res.bench.get("targets") or [])
    if not targets:
        res.notes.append(
            "bench.json names no target accuracy: the time-to-accuracy tables use 90% of the best final accuracy."
        )
        finals = [reached(c.records, 1.0)["final_test_accuracy"] for c in res.cases if c.ok]
        best = max((f for f in finals if f is not None), default=None)
        targets = [run_report.RELATIVE_TARGET * best] if best else []
    headline = res.bench.get("headline_profile") or next(
        (c.profile for c in res.cases if c.phase == "main"), "loopback"
    )
    lines = _header(res, results)
    if res.notes:
        lines += ["## What is missing", ""] + [f"- {n}" for n in res.notes] + [""]
    lines += _targets_section(res, targets, headline)
    lines += _headline_section(res, targets, headline, plots, stem)
    lines += _projected_section(res, targets, headline, plots, stem)
    lines += _momentum_section(res, targets, headline)
    lines += _split_section(res, plots, stem)
    lines += _downlink_section(res)
    lines += _gradient_section(res, targets, headline, plots, stem)
    lines += scale_section(res, plots, stem, headline)
    lines += _runs_section(res)
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: Path, report: Path = Path("docs/benchmarks.md")) -> Path:
    """Write the report on the results folder `results` to `report`, its PNGs beside it in `<report stem>/`."""
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    text = build_report(Path(results), report.parent / report.stem, report.stem)
    report.write_text(text, encoding="utf-8")
    return report


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=run_report.DPI, bbox_inches="tight", pad_inches=0.1)


def _fmt_variance(variance: float | None, stderr: float | None) -> str:
    """'0.123 +- 0.01'; '-' for a missing value (the study stored null)."""
    if variance is None:
        return "-"
    return f"{variance:.4g}" + ("" if stderr is None else f" +- {stderr:.2g}")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
