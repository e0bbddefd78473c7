"""`atomo train`: run one spec (or compare codecs on it) on a local PS and N workers, then write the results.

The spec comes from an optional YAML file (a RunSpec, docs/architecture.md) and flags, which override the
file: one flag per RunSpec field (`--batch-size`, `--lr`, ...) and per codec field (`--codec` for its name,
`--budget`, `--bits`, ...). If `--codec` names another codec than the file, the file's codec parameters are
dropped. `--compare svd:budget=3 qsgd:bits=4 dense` runs the same spec and seed once per codec, one after
another; each entry is a whole codec, `NAME[:KEY=VALUE,...]` with CodecSpec's fields as keys.

Results go to `<out>/<run id>/` (default `./atomo-runs`, which atomo creates with a `.gitignore` of `*`, so
git leaves it out of commits: services.common.folders): spec.json, metrics.jsonl and metrics.csv (a
header row alone when no step ran), events.jsonl, checkpoint.pt, the PS's summary.json, report.json
(`services.report.summarize`), the plots (none when no step ran) and logs/ (one log per process). A
comparison writes one such folder per codec under its own folder, with comparison.json and the comparison
plots beside them. The PS writes its files straight into that folder
(its run directory is a link to it), so what was written is there even if `atomo train` itself is killed;
its processes then stop by themselves within seconds (services.common.launch.watch_parent).

Workers: a worker that exits is reported on stderr (and the PS records `worker_lost` in events.jsonl); the
run goes on while at least `min_workers` worker processes remain. Only the PS exiting, or the run failing,
ends it early. `--metrics` serves Prometheus metrics from every process and prints where.

Time to target accuracy: the first evaluation at or above `--target-accuracy`; by default 0.9 times the
best final test accuracy among the runs shown (`services.report.RELATIVE_TARGET`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import time
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from services import report
from services.common.argtypes import fraction, port
from services.common.folders import RESULTS_DIR, make_default_folder
from services.common.launch import ClusterError, LocalCluster
from services.common.ps_client import PSError, PSUnavailable
from services.common.spec import CodecSpec, RunSpec

EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
LOG_TAIL_LINES = 30
PLAIN_PROGRESS_EVERY_S = 5.0
CONTROL_TIMEOUT_S = 10.0
FINAL_STATES = ("succeeded", "failed", "cancelled")


class SpecError(ValueError):
    """An invalid spec, file or flag; the message names the field."""


def _fields(model: type[BaseModel], skip: set[str]) -> list[tuple[str, str, typing.Any]]:
    """(field name, flag, FieldInfo) of `model`'s scalar fields."""
    return [
        (name, "--" + name.replace("_", "-"), info) for name, info in model.model_fields.items() if name not in skip
    ]


RUN_FLAGS = _fields(RunSpec, skip={"codec"})
CODEC_FLAGS = [("name", "--codec", CodecSpec.model_fields["name"])] + _fields(CodecSpec, skip={"name"})
FLAG_OF_FIELD = {name: flag for name, flag, _ in RUN_FLAGS} | {f"codec.{name}": flag for name, flag, _ in CODEC_FLAGS}


def _add_field_flag(group, dest: str, flag: str, info) -> None:
    """A string flag for a spec field: pydantic converts and validates it, so errors name the field."""
    choices = _literal_choices(info.annotation)
    if info.annotation is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=info.description)
        return
    default = info.get_default(call_default_factory=True)
    help_text = info.description or ""
    if typing.get_origin(info.annotation) is list:
        help_text += " (comma-separated)"
    if "default" not in help_text:
        help_text += f"{'; ' if help_text else ''}default {default!r}"
    metavar = None if choices else dest.split(".")[-1].upper()
    group.add_argument(flag, dest=dest, choices=choices, default=None, metavar=metavar, help=help_text)


def _literal_choices(annotation) -> tuple | None:
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec_file", nargs="?", type=Path, help="a RunSpec in YAML (flags override it)")
    run = parser.add_argument_group("run spec (RunSpec fields)")
    for name, flag, info in RUN_FLAGS:
        _add_field_flag(run, f"run.{name}", flag, info)
    codec = parser.add_argument_group("codec (CodecSpec fields)")
    for name, flag, info in CODEC_FLAGS:
        _add_field_flag(codec, f"codec.{name}", flag, info)
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="CODEC",
        help="run once per codec and compare, e.g. --compare svd:budget=3 qsgd:bits=4 dense",
    )
    parser.add_argument(
        "--target-accuracy",
        type=fraction,
        default=None,
        help=f"for 'time to target' (default {report.RELATIVE_TARGET} x the best final test accuracy)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help=f"results root (default ./{RESULTS_DIR}, made with a .gitignore of '*' so that git leaves it out)",
    )
    parser.add_argument(
        "--metrics",
        nargs="?",
        type=port,
        const=0,
        default=None,
        metavar="BASE_PORT",
        help="serve Prometheus metrics: the PS on BASE_PORT, worker i on BASE_PORT + 1 + i (no value: free ports); "
        "the endpoints are printed",
    )


# ---------------------------------------------------------------------------------------------- the spec


def build_spec(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of the file `args.spec_file` (if any) with the flags given applied over it."""
    data = _read_spec_file(args.spec_file) if args.spec_file else {}
    values = vars(args)
    flags = {name: values[f"run.{name}"] for name, _, _ in RUN_FLAGS if values[f"run.{name}"] is not None}
    codec_flags = {name: values[f"codec.{name}"] for name, _, _ in CODEC_FLAGS if values[f"codec.{name}"] is not None}
    for name, value in flags.items():
        if typing.get_origin(RunSpec.model_fields[name].annotation) is list:
            flags[name] = [v.strip() for v in value.split(",") if v.strip()]
    data.update(flags)
    if codec_flags:
        codec = data.get("codec") or {}
        if not isinstance(codec, dict):
            raise SpecError(f"codec: expected a mapping of CodecSpec fields, got {codec!r}")
        if "name" in codec_flags and codec_flags["name"] != codec.get("name", CodecSpec().name):
            codec = {}
        data["codec"] = {**codec, **codec_flags}
    return validate(RunSpec, data, FLAG_OF_FIELD)


def _read_spec_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"cannot read spec file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a mapping of RunSpec fields, not {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict, flags: dict[str, str] | None = None):
    """`model.model_validate(data)`, with every error turned into one 'field (--flag): message' line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(part) for part in err["loc"]) or "spec"
            if flags and field in flags:
                field = f"{field} ({flags[field]})"
            message = err["msg"].removeprefix("Value error, ")
            got = (
                f" (got {err['input']!r})"
                if err["type"] != "value_error" and not isinstance(err["input"], dict)
                else ""
            )
            lines.append(f"{field}: {message}{got}")
        raise SpecError("\n".join(lines)) from e


def parse_codec(entry: str) -> tuple[str, CodecSpec]:
    """'NAME[:KEY=VALUE,...]' -> (label, CodecSpec); keys are CodecSpec fields (dashes or underscores)."""
    name, _, params = entry.partition(":")
    data: dict = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--compare {entry}: expected KEY=VALUE, got {item!r}")
        data[key.strip().replace("-", "_")] = value.strip()
    try:
        return entry, validate(CodecSpec, data)
    except SpecError as e:
        raise SpecError(f"--compare {entry}: {e}") from e


# -------------------------------------------------------------------------------------------- progress


class Progress:
    """Live progress from per-step records: one updating line on a TTY, a plain line every few seconds otherwise."""

    def __init__(self, total_steps: int | None, label: str, stream=sys.stdout):
        self.total_steps = total_steps
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.step = 0
        self.wall_s = 0.0
        self.loss = None
        self.test_accuracy = None
        self.bytes_up = self.bytes_down = self.dense_bytes = 0
        self._last_print = 0.0
        self._written_step = 0
        self._first: tuple[int, float] | None = None  # (step, wall_s) of the first record: the ETA's origin

    def update(self, records: list[dict]) -> None:
        for r in records:
            self.step, self.wall_s, self.loss = r["step"], r["wall_s"], r["loss"]
            self._first = self._first or (self.step, self.wall_s)
            self.bytes_up += r["bytes_up"]
            self.bytes_down += r["bytes_down"]
            self.dense_bytes += r["dense_bytes"]
            if r.get("test_accuracy") is not None:
                self.test_accuracy = r["test_accuracy"]
        now = time.monotonic()
        if records and now - self._last_print >= (0.2 if self.tty else PLAIN_PROGRESS_EVERY_S):
            self._last_print = now
            self._write()

    def line(self) -> str:
        eta = None
        if self.total_steps and self._first and self.step > self._first[0]:
            seconds_per_step = (self.wall_s - self._first[1]) / (self.step - self._first[0])
            eta = seconds_per_step * (self.total_steps - self.step)
        parts = [
            f"[{self.label}] step {self.step}/{self.total_steps or '?'}",
            f"loss {self.loss:.4f}" if self.loss is not None else "loss -",
            f"test acc {self.test_accuracy:.4f}" if self.test_accuracy is not None else "test acc -",
            f"up {self.bytes_up / 1e6:.2f} MB",
            f"down {self.bytes_down / 1e6:.2f} MB",
            f"ratio {self.dense_bytes / self.bytes_up:.1f}x" if self.bytes_up else "ratio -",
            f"ETA {_duration(eta)}" if eta is not None else "ETA -",
        ]
        return "  ".join(parts)

    def _write(self) -> None:
        self._written_step = self.step
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """The last state, on its own line."""
        if self.step != self._written_step:
            self._write()
        if self.tty and self.step:
            self.stream.write("\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}:{s:02d}"


class MetricsTail:
    """New complete lines of a growing metrics.jsonl (a torn last line waits for its end)."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- runs


class RunFailed(RuntimeError):
    """A PS or worker process failed; the message holds the tail of its log."""


def make_results_folder(out: Path, suffix: str) -> Path:
    """A new folder `out/YYYYmmdd-HHMMSS-<suffix>` (then `-2`, `-3`, ... if taken); its name is the run id."""
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    n = 1
    while True:
        folder = out / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1


def slug(text: str) -> str:
    """A folder- and run-id-safe form of a codec label ('svd:budget=3' -> 'svd-budget-3')."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def quote_log(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a process's log, framed by its path."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- the end of {path} ---\n{tail}\n---"


def write_results(folder: Path, records: list[dict], summary: dict) -> None:
    """metrics.csv (its header row alone for a run with no steps), report.json and the plots of one run's folder
    (no plots without steps)."""
    (folder / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    report.write_csv(records, folder / "metrics.csv")
    if records:
        report.plot({summary["label"]: records}, folder)


def load_records(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return report.load_metrics(path) if path.exists() else []


def describe(spec: RunSpec) -> str:
    """'lenet5 on digits, codec svd (budget=3, ...), 300 steps, batch 64, lr 0.05, seed 0'."""
    params = ", ".join(f"{k}={_number(v)}" for k, v in spec.codec.codec_params().items())
    length = f"{spec.steps} steps" if spec.steps is not None else f"{spec.epochs} epochs"
    return (
        f"{spec.model} on {spec.dataset}, codec {spec.codec.name}{f' ({params})' if params else ''}, "
        f"{length}, batch {spec.batch_size}, lr {spec.lr:g}, seed {spec.seed}"
    )


def _number(value) -> str:
    """A number as people write it (3, not 3.0; 0.001, 1e-05); anything else as it is."""
    return f"{value:g}" if isinstance(value, float) else str(value)


class Runner:
    """One local PS and `workers` workers, kept for every run of a comparison (one start-up for all).

    Each run is submitted over the PS's control port (docs/architecture.md, "PS control protocol"). The PS's
    state directory is `results/.ps-state`, but each run directory in it is a link to the run's results
    folder, made before the run is submitted: the PS writes there directly, whatever happens to this process.
    """

    def __init__(self, results: Path, workers: int, metrics_base: int | None = None):
        self.state_dir = results / ".ps-state"
        self.cluster = LocalCluster(
            self.state_dir,
            workers=workers,
            log_dir=results / "logs",
            metrics=metrics_base is not None,
            metrics_base=metrics_base or 0,
        )
        self.folders: dict[str, Path] = {}
        self.exited: set[str] = set()  # workers whose exit was reported
        self.min_workers = 1

    def start(self) -> None:
        self.cluster.start_ps()
        for i in range(self.cluster.num_workers):
            self.cluster.start_worker(f"worker-{i}")

    def execute(self, spec: RunSpec, run_id: str, folder: Path, label: str) -> None:
        """Run `spec` to its end, showing progress; raise RunFailed unless it succeeded."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.json").write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
        link = self.state_dir / "runs" / run_id
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder.resolve(), target_is_directory=True)
        self.folders[run_id] = folder
        self.min_workers = spec.min_workers
        print(f"[{label}] {describe(spec)}", flush=True)
        self._submit(run_id, spec)
        progress = Progress(spec.steps, label)
        tail = MetricsTail(self.state_dir / "runs" / run_id / "metrics.jsonl")
        run: dict = {}
        while run.get("run_id") != run_id or run.get("state") not in FINAL_STATES:
            time.sleep(0.25)
            self._check_processes()
            run = self._status() or run
            progress.total_steps = run.get("total_steps") or progress.total_steps
            progress.update(tail.read())
        progress.update(tail.read())
        progress.finish()
        if run["state"] != "succeeded":
            raise RunFailed(f"run {run_id} {run['state']}: {run.get('error')}\n{quote_log(self._log('ps'))}")

    def _status(self) -> dict:
        """The PS's current run object; {} while a busy PS is slow to answer (its exit is caught elsewhere)."""
        try:
            return self.cluster.client(timeout_s=CONTROL_TIMEOUT_S).status().get("run") or {}
        except PSUnavailable:
            return {}
        except PSError as e:
            raise RunFailed(f"the parameter server refused 'status': {e}") from e

    def _submit(self, run_id: str, spec: RunSpec) -> None:
        try:
            self.cluster.client(timeout_s=CONTROL_TIMEOUT_S).submit(run_id, spec.model_dump(mode="json"))
        except (PSUnavailable, PSError) as e:
            self._check_processes()
            raise RunFailed(f"the parameter server did not take run {run_id}: {e}\n{quote_log(self._log('ps'))}") from e

    def _check_processes(self) -> None:
        """The PS exiting fails the run; a worker exiting is reported once, and fails the run only when fewer
        than `min_workers` worker processes remain (nothing restarts them here)."""
        if self.cluster.ps.poll() is not None:
            status = self.cluster.ps.returncode
            raise RunFailed(f"the parameter server exited with status {status}\n{quote_log(self._log('ps'))}")
        for name, proc in self.cluster.workers.items():
            if proc.poll() is not None and name not in self.exited:
                self.exited.add(name)
                remaining = len(self.cluster.workers) - len(self.exited)
                print(
                    f"\natomo train: worker {name} exited with status {proc.returncode} (log: {self._log(name)}); "
                    f"{remaining} worker(s) remain, min_workers is {self.min_workers}",
                    file=sys.stderr,
                    flush=True,
                )
                if remaining < self.min_workers:
                    raise RunFailed(
                        f"fewer than min_workers={self.min_workers} workers remain: worker {name} exited with "
                        f"status {proc.returncode}\n{quote_log(self._log(name))}"
                    )

    def _log(self, name: str) -> Path:
        return self.cluster.log_dir / f"{name}.log"

    def close(self) -> None:
        """Stop the processes and remove the state directory (its run directories are only links)."""
        self.cluster.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _interrupt(*_args) -> None:
    """Ctrl-C or SIGTERM: the processes are stopped and what was written is kept."""
    raise KeyboardInterrupt


def plan_runs(args: argparse.Namespace) -> list[tuple[str, RunSpec]]:
    """(label, spec) of each run: the spec of the file and flags, once per `--compare` codec if given."""
    spec = build_spec(args)
    if not args.compare:
        return [(spec.codec.name, spec)]
    if any(vars(args)[f"codec.{name}"] is not None for name, _, _ in CODEC_FLAGS):
        raise SpecError("--compare: give each codec's parameters in its entry (svd:budget=3), not as codec flags")
    plans = []
    for label, codec in map(parse_codec, args.compare):
        plans.append((label, validate(RunSpec, {**spec.model_dump(), "codec": codec.model_dump()})))
    slugs = [slug(label) for label, _ in plans]
    if len(set(slugs)) != len(slugs):
        raise SpecError(f"--compare: the same codec is given twice ({', '.join(args.compare)})")
    return plans


def run(args: argparse.Namespace) -> int:
    try:
        plans = plan_runs(args)
    except SpecError as e:
        print(f"atomo train: invalid spec:\n{e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        make_default_folder(args.out, RESULTS_DIR)
        results = make_results_folder(args.out, "compare" if args.compare else slug(plans[0][0]))
    except OSError as e:
        print(f"atomo train: cannot create a results folder under {args.out}: {e.strerror}", file=sys.stderr)
        return 1
    folders = {label: results / slug(label) if args.compare else results for label, _ in plans}
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's background job inherits it ignored
        signal.signal(signum, _interrupt)
    workers = plans[0][1].workers
    runner = Runner(results, workers, args.metrics)
    print(f"atomo train: a PS and {workers} workers on loopback; results in {results}", flush=True)
    if runner.cluster.metrics_ports:
        endpoints = ", ".join(f"{n} http://127.0.0.1:{p}/metrics" for n, p in runner.cluster.metrics_ports.items())
        print(f"metrics: {endpoints}", flush=True)
    status = 0
    try:
        runner.start()
        for i, (label, spec) in enumerate(plans):
            run_id = f"{results.name}-{i + 1}-{slug(label)}"[:64] if args.compare else results.name
            runner.execute(spec, run_id, folders[label], label)
    except (RunFailed, ClusterError) as e:
        print(f"atomo train: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping the processes; what was written stays in {results}", file=sys.stderr)
        status = EXIT_INTERRUPTED
    finally:
        runner.close()
    runs = {label: load_records(folder) for label, folder in folders.items() if (folder / "spec.json").exists()}
    summaries = report.summarize_runs(runs, args.target_accuracy)
    for label, records in runs.items():
        write_results(folders[label], records, summaries[label])
    if args.compare:
        (results / "comparison.json").write_text(json.dumps(summaries, indent=2) + "\n", encoding="utf-8")
        if any(runs.values()):
            report.plot({label: records for label, records in runs.items() if records}, results)
    if any(runs.values()):
        print()
        print(report.format_table(summaries))
    print(f"\nresults: {results}")
    return status
