"""`atomo bench`: every codec on the same model and data over emulated networks; results and report.

The default suite (services.bench.suite has each phase and why) measures dense SGD's communication share of
its step at each profile and picks the headline profile, tunes the step size of the codecs the targets need on
loopback (momentum 0.9 and off), runs them end to end over the headline profile with 3 seeds, momentum 0.9 and
momentum off, each with its best downlink, times dense and svd s=3 with the other downlink, checks the scale
model with 2-4 workers, and times every codec at every profile. Then the gradient study
(services.bench.gradients) and the report (services.bench.report) if they are installed. `--quick`: one profile,
three codecs, one seed, no tuning, no gradient study: a smoke test of about a minute. The results folder's
schema is in services.bench.runner. Without root or iproute2 everything runs on loopback, and bench.json's
network.reason says why. `--report-from FILE|DIR` regenerates the report from a results folder or its reduced
form (services.bench.reduced) without running anything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from services.bench import suite
from services.bench.netem import PROFILES, LinkProfile, Network, NetworkUnavailable
from services.bench.runner import Group, comm_share, final_accuracy, high_load, load, machine, records, write_case
from services.bench.suite import Case, CodecCase
from services.common.argtypes import non_negative_float, positive_float, positive_int
from services.common.launch import ClusterError
from services.train import _interrupt

DEFAULT_REPORT = Path("docs/benchmarks.md")
LOOPBACK = "loopback"
# The duration model behind the estimates (measured here: LeNet-5 on Fashion-MNIST, 2 workers, 2 cores),
# corrected as the suite runs by the ratio of measured to estimated time of the runs done so far.
GROUP_START_S = 8.0  # namespaces, PS and workers up, workers registered, the first run's data and model
RUN_OVERHEAD_S = 1.5  # submission, the PS and both workers loading the data set, the checkpoint (the default
# suite on an idle machine: 100-step loopback tuning runs took 2.6 s on average, 1.3 s of it steps)
LOOPBACK_STEP_S = 0.013  # a step of LeNet-5 at batch 32 per worker
EVAL_S_PER_IMAGE = 2e-5  # one deferred evaluation on the PS's CPU, per test image (10,000 images: 0.2 s; the
# default suite's 160-step svd runs at 100 Mbit/s took 11.6-13 s with 32 evaluations and 2.6 s of steps)
GRADIENTS_S = {True: 60.0, False: 150.0}  # the gradient study (quick, default), for the ETA only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    profiles = ", ".join(f"{n} {p.bandwidth_mbit:g} Mbit/s {p.latency_ms:g} ms" for n, p in PROFILES.items())
    parser.description = (
        f"Benchmark codecs on LeNet-5/{suite.DATASET} with a PS and workers in network namespaces behind "
        f"tc-shaped links (profiles {profiles}). "
        "The default suite (regime, tuning, 3 seeds momentum on and off end to end at the headline profile, "
        "downlink, scale, timing at every profile; its estimate is printed at the start), then the gradient study "
        f"and the report; --quick (one profile, dense, qsgd b=4, svd s=3, {suite.QUICK_STEPS} steps, one seed, no "
        "gradient study) a smoke test of about a minute. Needs root and iproute2 for the emulated links, else runs "
        "on loopback and says so."
    )
    parser.add_argument("--quick", action="store_true", help="one profile, three codecs, no tuning (lr 0.05)")
    parser.add_argument(
        "--bandwidth", type=positive_float, metavar="MBIT", help="a custom link instead of the profiles"
    )
    parser.add_argument(
        "--latency", type=non_negative_float, default=None, metavar="MS", help="with --bandwidth (default 1 ms)"
    )
    parser.add_argument("--workers", type=int, default=2, choices=(2, 3, 4), help="workers (default 2)")
    parser.add_argument("--codecs", help="comma-separated families or labels to keep (dense,svd,'qsgd b=4')")
    parser.add_argument(
        "--steps",
        type=positive_int,
        help=f"steps of the main runs (default {suite.MAIN_STEPS}; --quick {suite.QUICK_STEPS})",
    )
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<timestamp>)")
    parser.add_argument(
        "--report",
        type=Path,
        help=f"report path (default: {DEFAULT_REPORT} for the whole default suite run from a checkout, else "
        "<out>/report.md)",
    )
    parser.add_argument("--no-netem", action="store_true", help="run on loopback, no emulated network")
    parser.add_argument("--no-gradients", action="store_true", help="skip the gradient study")
    parser.add_argument("--gradients", action="store_true", help="run the (quick) gradient study with --quick too")
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="PATH",
        help="regenerate the report from a results folder or a reduced bench.json (docs/benchmarks/bench.json) "
        "and exit; nothing runs",
    )
    parser.add_argument(
        "experiment",
        nargs=argparse.REMAINDER,
        help="`table6 [FLAGS]`: Table 6 simulated with 8 and 16 workers (services/bench/simulate.py; "
        "`atomo bench table6 --help`)",
    )


def _test_size() -> int:
    """Images in the suite's test set (the PS evaluates on all of them)."""
    from atomo_core.data import load_dataset

    return len(load_dataset(suite.DATASET)[1])


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Bench:
    """The pipeline: plans cases phase by phase, runs them in groups, prints progress, writes bench.json."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out or Path("bench/results") / time.strftime("%Y%m%d-%H%M%S")
        self.workers: int = args.workers
        if args.bandwidth is not None:
            try:
                self.profiles = {"custom": LinkProfile(args.bandwidth, 1.0 if args.latency is None else args.latency)}
            except ValueError as exc:
                raise SystemExit(f"atomo bench: --bandwidth/--latency: {exc}") from None
        elif args.latency is not None:
            raise SystemExit("atomo bench: --latency needs --bandwidth")
        else:
            self.profiles = dict(PROFILES)
        reason = "--no-netem given" if args.no_netem else Network.check()
        self.emulated = reason is None
        self.network = {
            "emulated": self.emulated,
            "reason": reason,
            "latency_emulated": self.emulated and Network.latency_unavailable() is None,
            "latency_reason": Network.latency_unavailable() if self.emulated else None,
            "profiles": {
                n: {"bandwidth_mbit": p.bandwidth_mbit, "latency_ms": p.latency_ms} for n, p in self.profiles.items()
            },
        }
        self.started = time.time()
        self.machine: dict = {}  # machine() fills it; a Ctrl-C during its torch import still writes bench.json
        self.phases: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.lrs: dict[str, float] = {}
        self.lrs_off: dict[str, float] = {}
        self.shares: dict[str, float | None] = {}
        self.seeds = suite.QUICK_SEEDS if args.quick else suite.SEEDS
        self.eval_every = suite.QUICK_EVAL_EVERY if args.quick else suite.EVAL_EVERY
        self.test_size = _test_size()
        self.load = {"start": load(), "warning": None}
        self.measured_s = 0.0  # seconds the runs done so far took, and their estimate
        self.measured_estimate_s = 0.0
        self.headline: str = LOOPBACK
        self.nbytes: dict[str, float] = {}
        self.comparable: dict = {}
        self.estimated_done = 0.0
        self.remaining: list[Case] = []
        self.steps = {
            "tune": suite.TUNE_STEPS,
            "main": args.steps or (suite.QUICK_STEPS if args.quick else suite.MAIN_STEPS),
            "timing": suite.TIMING_STEPS,
        }
        self.steps["momentum_off"] = self.steps["main"]
        self.steps["scale"] = self.steps["downlink"] = suite.TIMING_STEPS

    # -- the codecs ------------------------------------------------------------------------------------------

    def select_codecs(self) -> list[CodecCase]:
        """The suite's codecs, less those --quick or --codecs leave out and those RunSpec refuses (skipped with
        a warning). Entrywise, Fourier and top-k budgets are matched to svd s=3's bytes only when they run."""
        placeholder = {name: 1 for name in suite.BYTE_MATCHED}
        families = {c.family for c in self._filter(suite.codec_cases(placeholder))}
        self.comparable = suite.comparable_budgets() if families & set(suite.BYTE_MATCHED) else {}
        budgets = {**placeholder, **self.comparable.get("budgets", {})}
        usable = []
        for case in self._filter(suite.codec_cases(budgets)):
            why = suite.valid(case)
            if why is None:
                usable.append(case)
            else:
                self.skipped[case.label] = why
                print(f"warning: skipping {case.label}: this installation's RunSpec refuses it ({why})", flush=True)
        self.nbytes = {c.label: suite.message_nbytes(c.codec) for c in usable}
        return usable

    def _filter(self, cases: list[CodecCase]) -> list[CodecCase]:
        if self.args.quick:
            cases = [c for c in cases if c.label in suite.QUICK_LABELS]
        if self.args.codecs:
            keep = {k.strip() for k in self.args.codecs.split(",") if k.strip()}
            known = {c.family for c in cases} | {c.label for c in cases} | set(suite.BYTE_MATCHED)
            if keep - known:
                raise SystemExit(f"atomo bench: --codecs: no codec or family {', '.join(sorted(keep - known))}")
            cases = [c for c in cases if c.family in keep or c.label in keep]
        return cases

    # -- estimates and progress ------------------------------------------------------------------------------

    def step_estimate(self, case: Case) -> float:
        """Seconds per step: a loopback step plus what the PS's link carries one after the other, W messages in
        and W*W out (downlink atoms: every worker gets every message; model: W dense models)."""
        if case.bandwidth_mbit is None:
            return LOOPBACK_STEP_S
        message = self.nbytes.get(case.codec.label, 250_000)
        down = (
            self.nbytes.get("dense", 250_000) * case.workers if case.downlink == "model" else message * case.workers**2
        )
        return LOOPBACK_STEP_S + (message * case.workers + down) * 8 / (case.bandwidth_mbit * 1e6)

    def run_estimate(self, case: Case) -> float:
        """Estimated seconds of one run: its steps, its evaluations on the whole test set and the overhead."""
        evals = -(-case.steps // min(case.eval_every, case.steps))
        return RUN_OVERHEAD_S + case.steps * self.step_estimate(case) + evals * EVAL_S_PER_IMAGE * self.test_size

    def estimate(self, cases: list[Case], running: tuple[str, int] | None = None) -> float:
        """Estimated seconds for `cases`, `running` the group already up (no start-up to count for it)."""
        groups = {(c.profile, c.workers) for c in cases} - {running}
        return len(groups) * GROUP_START_S + sum(self.run_estimate(c) for c in cases)

    def correction(self) -> float:
        """Measured over estimated seconds of the runs done so far (1 before the first): the ETA's calibration."""
        return self.measured_s / self.measured_estimate_s if self.measured_estimate_s > 0 else 1.0

    def eta(self, running: tuple[str, int] | None = None) -> float:
        """Seconds left: the remaining runs' estimate calibrated on the measured ones, and the gradient study."""
        left = self.estimate(self.remaining, running) * self.correction()
        if self.gradients_enabled() and "gradients" not in self.phases:
            left += GRADIENTS_S[bool(self.args.quick)]
        return left

    def gradients_enabled(self) -> bool:
        return not self.args.no_gradients and (not self.args.quick or self.args.gradients)

    def progress(self, case: Case, record: dict, index: int, total: int) -> None:
        rows = records(self.out / "runs" / case.case_id)
        done = rows[-1]["step"] if rows else 0
        eta = self.eta((case.profile, case.workers))
        accuracy = final_accuracy(self.out / "runs" / case.case_id)
        acc = f" acc {accuracy:.3f}" if accuracy is not None else ""
        print(
            f"[{index}/{total}] {case.phase:<12} {case.codec.label:<16} {case.profile:<8} w{case.workers} "
            f"momentum {case.momentum:<3g} lr {case.lr:<6g} seed {case.seed} {done}/{case.steps} steps "
            f"{record['state']}{acc} "
            f"in {record['wall_s']:.1f}s | "
            f"elapsed {_duration(time.time() - self.started)}, suite ETA {_duration(eta)}"
            + (f"\n    error: {record['error']}" if record["error"] else ""),
            flush=True,
        )

    # -- running ---------------------------------------------------------------------------------------------

    def link(self, profile: str) -> LinkProfile | None:
        return self.profiles[profile] if self.emulated and profile != LOOPBACK else None

    def case(self, phase: str, codec: CodecCase, profile: str, lr: float, **kw) -> Case:
        link = self.link(profile)
        return Case(
            phase=phase,
            codec=codec,
            profile=profile if link is not None else LOOPBACK,
            bandwidth_mbit=link.bandwidth_mbit if link else None,
            latency_ms=link.latency_ms if link else None,
            workers=kw.pop("workers", self.workers),
            momentum=kw.pop("momentum", suite.MOMENTUM),
            lr=lr,
            steps=kw.pop("steps", self.steps[phase]),
            eval_every=kw.pop("eval_every", self.eval_every),
            **kw,
        )

    def run_phase(self, name: str, cases: list[Case], later: list[Case]) -> list[dict]:
        """Run `cases` grouped by (profile, workers), in order; `later`: what follows, for the ETA."""
        started = time.time()
        results = []
        groups: dict[tuple[str, int], list[Case]] = {}
        for case in cases:
            groups.setdefault((case.profile, case.workers), []).append(case)
        total = len(cases)
        index = 0
        for (profile, workers), members in groups.items():
            group = Group(self.out, profile, self.link(profile), workers)
            try:
                group.start()
                error = None
            except (ClusterError, NetworkUnavailable) as exc:  # its cases fail; the suite goes on
                error = f"{type(exc).__name__}: {exc}"
            try:
                for case in members:
                    index += 1
                    self.remaining = [c for c in cases[index:]] + later
                    run_started = time.time()
                    record = group.run(case) if error is None else write_case(self.out, case, "failed", error, 0.0)
                    self.measured_s += time.time() - run_started
                    self.measured_estimate_s += self.run_estimate(case)
                    results.append(record)
                    self.progress(case, record, index, total)
            finally:
                group.close()
        self.phases[name] = self.phases.get(name, 0.0) + time.time() - started
        return results

    def tune(self, cases: list[Case], later: list[Case]) -> None:
        """Run the tune `cases` (plan's), then the step sizes `suite.choose_lrs` adds above a grid's largest
        where that was the best; keep each codec's best lr, with momentum and without."""
        codecs = {(c.codec.label, c.momentum): c.codec for c in cases}
        scores: dict[tuple[str, float], dict[float, float]] = {}
        best: dict[tuple[str, float], float] = {}
        while cases:
            self.run_phase("tune", cases, later)
            for case in cases:
                accuracy = final_accuracy(self.out / "runs" / case.case_id)
                scores.setdefault((case.codec.label, case.momentum), {})[case.lr] = (
                    -1.0 if accuracy is None else accuracy
                )
            best, more = suite.choose_lrs(scores)
            cases = [
                self.case("tune", codecs[key], LOOPBACK, lr, momentum=key[1], eval_every=suite.TUNE_STEPS)
                for key, lr in more.items()
            ]
        self.lrs_tried = {key: sorted(lrs) for key, lrs in scores.items()}
        for (label, momentum), lr in best.items():
            (self.lrs if momentum else self.lrs_off)[label] = lr

    def write_bench(self, finished: float | None = None) -> None:
        data = {
            "command": shlex.join(["atomo", "bench", *self.args.argv]),
            "argv": self.args.argv,
            "started": _iso(self.started),
            "finished": _iso(finished) if finished is not None else None,
            "machine": self.machine,
            "network": self.network,
            "headline_profile": self.headline,
            "model": suite.MODEL,
            "dataset": suite.DATASET,
            "workers": self.workers,
            "targets": list(suite.TARGETS),
            "seeds": list(self.seeds),
            "eval_every": self.eval_every,
            "test_size": self.test_size,
            "main_codecs": [*suite.MAIN_LABELS, *(f"{f} (family)" for f in suite.MAIN_FAMILIES)],
            "load": self.load,
            "regime": {
                "dense_comm_share": self.shares,
                "paper_comm_share": suite.PAPER_COMM_SHARE,
                "required_comm_share": suite.REGIME_SHARE,
                "how": suite.PAPER_HOW,
            },
            "lr_rule": (
                f"no tuning: lr {suite.QUICK_LR} for every codec (--quick)"
                if self.args.quick
                else suite.LR_RULE.format(
                    steps=suite.TUNE_STEPS,
                    grid=list(suite.LR_GRID),
                    grid_off=list(suite.LR_GRID_MOMENTUM_OFF),
                    extensions=suite.LR_EXTENSIONS,
                )
            ),
            "lrs": self.lrs,
            "lrs_momentum_off": self.lrs_off,
            "lrs_tried": {f"{label} momentum {m:g}": lrs for (label, m), lrs in self.lrs_tried.items()},
            "bytes": {"comparable": self.comparable, "message_nbytes": self.nbytes},
            "steps": self.steps,
            "skipped": self.skipped,
            "phases": self.phases,
            "quick": self.args.quick,
        }
        (self.out / "bench.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def execute(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.machine = machine()
        start = self.load["start"]
        if high_load(start):
            self.load["warning"] = (
                f"the machine was busy at the start (1-minute load {start['load_1m']} on {start['cpus']} CPUs): "
                "other work slows and distorts the measured steps"
            )
            print(f"warning: {self.load['warning']}", flush=True)
        self.lrs_tried: dict[tuple[str, float], list[float]] = {}  # (label, momentum): the step sizes tuned
        if not self.emulated:
            print(f"atomo bench: no emulated network ({self.network['reason']}): every run on loopback", flush=True)
            self.profiles = {}
        elif not self.network["latency_emulated"]:
            print(f"atomo bench: links are rate-limited only: {self.network['latency_reason']}", flush=True)
        codecs = self.select_codecs()
        if not codecs:
            print("atomo bench: no codec left to run", file=sys.stderr)
            return 2
        profiles = list(self.profiles) or [LOOPBACK]
        dense = next((c for c in codecs if c.family == "dense"), None)
        if self.args.quick:
            self.headline = "custom" if "custom" in self.profiles else ("100mbit" if self.emulated else LOOPBACK)
            self.lrs = {c.label: suite.QUICK_LR for c in codecs}
            main = [
                self.case("main", c, self.headline, suite.QUICK_LR, downlink=self.downlink(c), seed=seed)
                for seed in self.seeds
                for c in codecs
            ]
            self._announce(main)
            self.run_phase("main", main, [])
            if dense is not None:
                self.shares[self.headline] = comm_share(self.out / "runs" / main[codecs.index(dense)].case_id)
        else:
            self.run_default(codecs, profiles, dense)
        self.finish()
        shutil.rmtree(self.out / ".ps-state", ignore_errors=True)
        print(f"\nresults: {self.out}  ({_duration(time.time() - self.started)})", flush=True)
        return 0

    def _announce(self, cases: list[Case]) -> None:
        self.remaining = list(cases)
        runs = self.estimate(cases)
        study = GRADIENTS_S[bool(self.args.quick)] if self.gradients_enabled() else 0.0
        print(
            f"atomo bench: {len(cases)} runs of {suite.MODEL} on {suite.DATASET}, {self.workers} workers, "
            f"estimated {_duration(runs + study)} (runs {_duration(runs)}"
            + (f", gradient study {_duration(study)}" if study else ", no gradient study")
            + f"); results in {self.out}",
            flush=True,
        )

    def downlink(self, codec: CodecCase, workers: int | None = None) -> str:
        """The codec's best downlink (suite.best_downlink on its measured message bytes)."""
        dense = self.nbytes.get("dense") or suite.message_nbytes({"name": "dense"})
        return suite.best_downlink(self.nbytes.get(codec.label, dense), dense, workers or self.workers)

    def run_default(self, codecs: list[CodecCase], profiles: list[str], dense: CodecCase | None) -> None:
        lr0 = suite.QUICK_LR
        regime_codec = dense or codecs[0]
        # The plan with the provisional headline (the slowest link), for the estimate; the real headline follows
        # from the regime runs.
        regime = [
            self.case("timing", c, p, lr0, downlink=self.downlink(c), eval_every=suite.TIMING_STEPS)
            for p in profiles
            for c in [regime_codec]
        ]
        guess = min(profiles, key=lambda p: self.profiles[p].bandwidth_mbit if p in self.profiles else 0)
        self._announce(regime + self.plan(codecs, profiles, guess, regime, tuned=False))
        self.run_phase("regime", regime, self.plan(codecs, profiles, guess, regime, tuned=False))
        for case in regime:
            self.shares[case.profile] = comm_share(self.out / "runs" / case.case_id)
        bandwidths = {n: p.bandwidth_mbit for n, p in self.profiles.items()}
        try:
            self.headline = suite.headline_profile(self.shares, bandwidths)
        except ValueError:
            self.headline = profiles[0]
        shares = ", ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}%'}" for k, v in self.shares.items())
        print(
            f"dense communication share of its step: {shares}; required >= {100 * suite.REGIME_SHARE:.0f}%: "
            f"headline profile {self.headline}",
            flush=True,
        )
        rest = self.plan(codecs, profiles, self.headline, regime, tuned=False)
        self.tune([c for c in rest if c.phase == "tune"], [c for c in rest if c.phase != "tune"])
        self.write_bench()
        plan = [c for c in self.plan(codecs, profiles, self.headline, regime, tuned=True) if c.phase != "tune"]
        for phase in ("main", "momentum_off", "downlink", "scale", "timing"):
            cases = [c for c in plan if c.phase == phase]
            if cases:
                self.run_phase(phase, cases, plan[plan.index(cases[-1]) + 1 :])
                self.write_bench()

    def plan(self, codecs, profiles, headline, regime, tuned: bool) -> list[Case]:
        """Every case after the regime runs, in order: tune (the main codecs at each lr of both grids), main and
        momentum off (the main codecs, each seed, best downlink, headline profile), downlink (dense and svd s=3
        with the other downlink), scale, timing (every codec at every profile where neither a main nor a regime
        run measured it)."""
        lr = (lambda c: self.lrs.get(c.label, suite.QUICK_LR)) if tuned else (lambda c: suite.QUICK_LR)
        lr_off = (lambda c: self.lrs_off.get(c.label, suite.QUICK_LR)) if tuned else (lambda c: suite.QUICK_LR)
        main = [c for c in codecs if suite.in_main(c)]
        timing = dict(eval_every=suite.TIMING_STEPS)
        cases = [
            self.case("tune", c, LOOPBACK, g, momentum=m, eval_every=suite.TUNE_STEPS)
            for m, grid in ((suite.MOMENTUM, suite.LR_GRID), (0.0, suite.LR_GRID_MOMENTUM_OFF))
            for c in main
            for g in grid
        ]
        for phase, momentum, rate in (("main", suite.MOMENTUM, lr), ("momentum_off", 0.0, lr_off)):
            cases += [
                self.case(phase, c, headline, rate(c), momentum=momentum, downlink=self.downlink(c), seed=seed)
                for seed in self.seeds
                for c in main
            ]
        for c in codecs:
            if c.label in ("dense", "svd s=3"):
                other = "atoms" if self.downlink(c) == "model" else "model"
                cases.append(self.case("downlink", c, headline, lr(c), downlink=other, **timing))
        scale = [c for c in codecs if c.label in ("dense", "svd s=3", "qsgd b=4")]
        cases += [
            self.case("scale", c, headline, lr(c), workers=w, downlink=self.downlink(c, w), **timing)
            for w in suite.SCALE_WORKERS
            for c in scale
        ]
        done = {(r.profile, r.codec.label) for r in regime} | {(headline, c.label) for c in main}
        cases += [
            self.case("timing", c, p, lr(c), downlink=self.downlink(c), **timing)
            for p in profiles
            if p != LOOPBACK
            for c in codecs
            if (p, c.label) not in done
        ]
        return cases

    def finish(self) -> None:
        """The gradient study and the report, each if its module is installed; a failure keeps the runs."""
        if self.gradients_enabled():
            started = time.time()
            try:
                from services.bench.gradients import run_study

                print("gradient study ...", flush=True)
                run_study(self.out, self.args.quick)
            except Exception:  # noqa: BLE001 (any failure of the study leaves the runs' results intact)
                print(f"the gradient study failed; the runs are kept:\n{traceback.format_exc()}", flush=True)
            self.phases["gradients"] = time.time() - started
        report = self.args.report or self.default_report()
        self.load["end"] = load()
        self.write_bench(time.time())  # once, finished: the report reads it
        if high_load(self.load["end"], share=1.0):
            print(f"warning: the machine is busy after the runs ({self.load['end']}): compare with care", flush=True)
        started = time.time()
        try:
            from services.bench.report import write_report
        except ImportError as exc:
            print(f"no report generator ({exc}); the results are in {self.out}", flush=True)
            return
        try:
            written = write_report(self.out, report)
        except Exception:  # noqa: BLE001
            print(f"the report generator failed; the results are kept:\n{traceback.format_exc()}", flush=True)
        else:
            print(_targets_section(written.read_text(encoding="utf-8")), flush=True)
            print(f"report: {written} ({_duration(time.time() - started)})", flush=True)

    def default_report(self) -> Path:
        """docs/benchmarks.md for the whole default suite run from a checkout (it is that file's source);
        any other run (--quick, a subset, a custom link) reports into its own results folder."""
        a = self.args
        partial = a.quick or a.codecs or a.bandwidth is not None or a.steps or a.no_netem or a.workers != 2
        if partial or not DEFAULT_REPORT.parent.is_dir():
            return self.out / "report.md"
        return DEFAULT_REPORT


def _targets_section(markdown: str) -> str:
    """The report's table of targets (its most telling part), to print at the end of a run."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Targets")), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip()


def report_from(source: Path, report: Path | None) -> int:
    """Regenerate the report from a results folder or a reduced bench.json (default report: docs/benchmarks.md
    for a reduced file, <folder>/report.md for a folder)."""
    from services.bench import reduced
    from services.bench.report import write_report

    if not source.exists():
        print(f"atomo bench: --report-from: {source} does not exist", file=sys.stderr)
        return 2
    if source.is_file() and not reduced.is_reduced(source):
        print(f"atomo bench: --report-from: {source} is not a results folder or a reduced bench.json", file=sys.stderr)
        return 2
    target = report or (DEFAULT_REPORT if source.is_file() else source / "report.md")
    try:
        written = write_report(source, target)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # a file edited by hand
        print(
            f"atomo bench: --report-from: {source} is not in the form the report reads "
            f"({type(exc).__name__}: {exc}); regenerate it with `python -m services.bench.reduced`",
            file=sys.stderr,
        )
        return 2
    print(_targets_section(written.read_text(encoding="utf-8")), flush=True)
    print(f"report: {written}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.experiment:
        if args.experiment[0] != "table6":
            raise SystemExit(f"atomo bench: unknown experiment {args.experiment[0]!r} (table6 is the one)")
        from services.bench.simulate import main as table6

        return table6(args.experiment[1:])
    signal.signal(signal.SIGTERM, _interrupt)  # the groups' processes and namespaces go on the way out
    args.argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else sys.argv[1:]
    if args.report_from is not None:
        return report_from(args.report_from, args.report)
    bench = Bench(args)
    try:
        return bench.execute()
    except KeyboardInterrupt:
        print(f"\ninterrupted: the results so far are in {bench.out}", file=sys.stderr)
        bench.write_bench()
        return 130
