"""A calibrated model of the step time of synchronous PS training, fitted to `atomo bench`'s runs.

One step with n workers, each sending U bytes (its gradient's messages) and the PS sending W bytes in all
(the `atoms` downlink: every worker receives the n messages, W = n^2 U; the `model` downlink: W = n x the
dense model), over a PS link of R bytes/s that all workers share, both directions:

    T = C(n) + E + 2 L + n U / R_up + W / R_down + n d + P + A + o

- C(n): a worker's forward and backward pass on its share of the batch, a + b / n (fitted to the runs'
  compute_s; with one worker count a and b / n cannot be told apart and the fit takes the constant a alone,
  b = 0). E: the codec's encode time (the runs' encode_s).
- L: the link's one-way latency (its profile's). R_up (the workers' gradients into the PS) and R_down (the
  PS's downlink out to the workers): fitted per profile, with o, to the runs' step times by non-negative
  least squares; the two directions are separate terms because a synchronous PS receives every gradient
  before it sends, and their bytes differ (atoms: W = n^2 U; model: W = n x the model). A link's efficiency
  is its rate over the nominal bandwidth (loopback has no nominal one).
- n d: the PS decodes and adds n messages, d each (the runs' decode_s / k); P: the PS's optimizer step
  (update_s). A: the worker applying the update, n d + P with the atoms downlink (it replays the PS's step on
  the n messages), 0 with the model downlink.
- o: a fixed per-step overhead (protocol, scheduling), fitted per profile with R by least squares.

`fit` calibrates this on measured runs and `predict_run` gives each run's predicted step time (the check
against measurements); `held_out` fits on some worker counts (2 and 3) and predicts the runs of the others
(4), the out-of-sample test. `predict` extrapolates to other models, worker counts and bandwidths from the gradient
study's real message sizes and this CPU's encode, decode and update times, with the GPU compute time a
parameter; `sharded` gives the step with the PS split into S shards, each with its own link and CPU (and a
worker's own link, at the same rate, as the floor). All functions are pure.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The assumed forward+backward time of one worker's batch of 128 on a data-centre GPU (fp32), the default
# compute time of the predictions. An estimate, not a measurement here: ~0.56 GFLOP (ResNet-18, CIFAR) and
# ~0.15 GFLOP (VGG-11-BN) per image forward, x3 for forward and backward, at about 10 TFLOP/s effective.
DEFAULT_GPU_COMPUTE_S = {"resnet18": 0.025, "vgg11_bn": 0.008}
DEFAULT_BATCH_PER_WORKER = 128
PREDICTION_WORKERS = (8, 16, 32, 64, 128, 256)
PREDICTION_GBIT = (1.0, 10.0, 100.0)
PREDICTION_LATENCY_S = 0.0001
# The paper's Table 6 configuration (Section 5): VGG-11-BN on CIFAR-10, 16 compute nodes and a PS on g2.2xlarge
# instances, the PS broadcasting the model after each step. Reported: svd s=3 3.96x and qsgd b=4 1.68x faster
# than dense SGD to the target. The link is an assumption (EC2's "moderate" network of that instance type,
# taken as 1 Gbit/s), as is the compute time of a K520 GPU when no measurement is given.
PAPER_TABLE6 = {"model": "vgg11_bn", "workers": 16, "gbit": 1.0, "downlink": "model"}
PAPER_TABLE6_SPEEDUPS = {"svd s=3": 3.96, "qsgd b=4": 1.68}


@dataclass(frozen=True)
class RunTiming:
    """One measured run's means per step (steps after the first, whose time holds the start-up)."""

    case_id: str
    label: str
    phase: str
    profile: str
    workers: int
    downlink: str
    bandwidth_bps: float | None  # nominal, bytes/s; None on loopback
    latency_s: float
    compute_s: float
    encode_s: float
    decode_s: float  # the PS's decoding of one step (all k messages)
    update_s: float
    step_s: float  # measured: wall-clock seconds per step
    messages: float  # k, gradients aggregated per step
    bytes_up: float  # per step, all workers
    bytes_down: float  # per step, to all workers

    @property
    def link_bytes(self) -> float:
        return self.bytes_up + self.bytes_down


def step_time(records: Sequence[dict]) -> float | None:
    """Mean wall-clock seconds per step after step 1 (its time holds the start-up): from the end of the first
    record's step to the end of the last's (the clock of services.report.training_time); None with fewer than
    2 records. The one step time of the bench's report and of this model."""
    if len(records) < 2:
        return None
    return (records[-1]["wall_s"] - records[0]["wall_s"]) / (len(records) - 1)


def run_timing(case: dict, records: Sequence[dict]) -> RunTiming | None:
    """A RunTiming from a case.json and its per-step records; None with fewer than 3 steps."""
    rows = list(records)[1:]
    if len(rows) < 2:
        return None

    def mean(key: str) -> float:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return statistics.fmean(values) if values else 0.0

    bandwidth = case.get("bandwidth_mbit")
    return RunTiming(
        case_id=case["case_id"],
        label=case["label"],
        phase=case.get("phase", ""),
        profile=case.get("profile", "loopback"),
        workers=int(case["workers"]),
        downlink=case.get("downlink", "atoms"),
        bandwidth_bps=bandwidth * 1e6 / 8 if bandwidth else None,
        latency_s=(case.get("latency_ms") or 0.0) / 1e3,
        compute_s=mean("compute_s"),
        encode_s=mean("encode_s"),
        decode_s=mean("decode_s"),
        update_s=mean("update_s"),
        step_s=step_time(records),
        messages=mean("k") or float(case["workers"]),
        bytes_up=mean("bytes_up"),
        bytes_down=mean("bytes_down"),
    )


@dataclass(frozen=True)
class Link:
    """A profile's fitted link: rates R_up and R_down (bytes/s; inf when the runs do not resolve one),
    overhead o (s)."""

    rate_up_bps: float
    rate_down_bps: float
    overhead_s: float
    nominal_bps: float | None
    latency_s: float
    runs: int

    def _efficiency(self, rate: float) -> float | None:
        if self.nominal_bps is None or not math.isfinite(rate):
            return None
        return rate / self.nominal_bps

    @property
    def efficiency_up(self) -> float | None:
        """R_up over the nominal bandwidth, when both are known."""
        return self._efficiency(self.rate_up_bps)

    @property
    def efficiency_down(self) -> float | None:
        """R_down over the nominal bandwidth, when both are known."""
        return self._efficiency(self.rate_down_bps)

    def transfer_s(self, bytes_up: float, bytes_down: float) -> float:
        """n U / R_up + W / R_down."""
        up = bytes_up / self.rate_up_bps if math.isfinite(self.rate_up_bps) else 0.0
        down = bytes_down / self.rate_down_bps if math.isfinite(self.rate_down_bps) else 0.0
        return up + down


@dataclass(frozen=True)
class Calibration:
    """The fitted parameters: compute a + b / n, per codec E and d, the PS update P, per profile Link."""

    compute_fixed_s: float
    compute_scaled_s: float  # b: C(n) = a + b / n
    encode_s: dict[str, float]
    decode_per_message_s: dict[str, float]
    update_s: float
    links: dict[str, Link] = field(default_factory=dict)

    def compute_s(self, workers: int) -> float:
        return self.compute_fixed_s + self.compute_scaled_s / workers


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of least squares y = c + m x with c, m >= 0 (non-negative least squares in 2-D)."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if n >= 2 and sxx > 0:
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = my - slope * mx
        if slope >= 0 and intercept >= 0:
            return intercept, slope
    # A constraint is active: the better of a line through the origin and a constant.
    sxx0 = sum(x * x for x in xs)
    through_origin = max(0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sxx0) if sxx0 > 0 else 0.0
    constant = max(0.0, my)
    err_origin = sum((y - through_origin * x) ** 2 for x, y in zip(xs, ys, strict=True))
    err_constant = sum((y - constant) ** 2 for y in ys)
    return (0.0, through_origin) if err_origin < err_constant else (constant, 0.0)


def _nnls(columns: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Non-negative least squares y = sum_j c_j x_j, c >= 0, for a few columns: the best of the unconstrained
    least-squares solutions over every subset of the columns (the others 0) whose coefficients are all >= 0."""
    import itertools

    import numpy as np

    a, y = np.asarray(columns, dtype=float).T, np.asarray(ys, dtype=float)
    best, best_err = [0.0] * a.shape[1], float(np.sum(y * y))
    for size in range(1, a.shape[1] + 1):
        for subset in itertools.combinations(range(a.shape[1]), size):
            coef, *_ = np.linalg.lstsq(a[:, subset], y, rcond=None)
            if np.all(coef >= 0):
                err = float(np.sum((a[:, subset] @ coef - y) ** 2))
                if err < best_err - 1e-15:
                    best, best_err = [0.0] * a.shape[1], err
                    for j, c in zip(subset, coef, strict=True):
                        best[j] = float(c)
    return best


def _apply_s(downlink: str, workers: float, decode_per_message: float, update: float) -> float:
    """A: the worker's time to apply the update (replaying the PS's step on the n messages, or 0)."""
    return workers * decode_per_message + update if downlink == "atoms" else 0.0


def _known_part(run: RunTiming, cal: Calibration) -> float:
    """Every term of T but the link's n U / R_up + W / R_down and o, from the calibration."""
    d = cal.decode_per_message_s.get(run.label, 0.0)
    return (
        cal.compute_s(run.workers)
        + cal.encode_s.get(run.label, 0.0)
        + 2 * run.latency_s
        + run.messages * d
        + cal.update_s
        + _apply_s(run.downlink, run.messages, d, cal.update_s)
    )


def fit(runs: Iterable[RunTiming]) -> Calibration:
    """Calibrate the model on measured runs (ValueError without any)."""
    runs = list(runs)
    if not runs:
        raise ValueError("no measured run to fit the scale model to")
    inverse = [1.0 / r.workers for r in runs]
    fixed, scaled = _fit_line(inverse, [r.compute_s for r in runs])
    by_label: dict[str, list[RunTiming]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    cal = Calibration(
        compute_fixed_s=fixed,
        compute_scaled_s=scaled,
        encode_s={label: statistics.fmean(r.encode_s for r in rs) for label, rs in by_label.items()},
        decode_per_message_s={
            label: statistics.fmean(r.decode_s / max(r.messages, 1.0) for r in rs) for label, rs in by_label.items()
        },
        update_s=statistics.fmean(r.update_s for r in runs),
    )
    by_profile: dict[str, list[RunTiming]] = {}
    for r in runs:
        by_profile.setdefault(r.profile, []).append(r)
    for profile, rs in by_profile.items():
        overhead, inverse_up, inverse_down = _nnls(
            [[1.0] * len(rs), [r.bytes_up for r in rs], [r.bytes_down for r in rs]],
            [r.step_s - _known_part(r, cal) for r in rs],
        )
        cal.links[profile] = Link(
            rate_up_bps=1.0 / inverse_up if inverse_up > 0 else math.inf,
            rate_down_bps=1.0 / inverse_down if inverse_down > 0 else math.inf,
            overhead_s=overhead,
            nominal_bps=rs[0].bandwidth_bps,
            latency_s=rs[0].latency_s,
            runs=len(rs),
        )
    return cal


def predict_run(run: RunTiming, cal: Calibration) -> float:
    """The calibrated model's step time for a measured run's configuration (its profile must be fitted)."""
    link = cal.links[run.profile]
    return _known_part(run, cal) + link.transfer_s(run.bytes_up, run.bytes_down) + link.overhead_s


@dataclass(frozen=True)
class HeldOut:
    """One held-out run: measured and predicted step time (s) by a model fitted without its worker count."""

    run: RunTiming
    predicted_s: float

    @property
    def error(self) -> float:
        return self.predicted_s / self.run.step_s - 1


def held_out(
    runs: Iterable[RunTiming], fit_workers: Sequence[int] = (2, 3), test_workers: Sequence[int] = (4,)
) -> tuple[Calibration, list[HeldOut]]:
    """Fit on the runs with `fit_workers` workers, predict those with `test_workers` whose profile and codec
    the fit has (ValueError if no run is left to fit or to test)."""
    runs = list(runs)
    train = [r for r in runs if r.workers in fit_workers]
    cal = fit(train)
    tested = [
        HeldOut(r, predict_run(r, cal))
        for r in runs
        if r.workers in test_workers and r.profile in cal.links and r.label in cal.encode_s
    ]
    if not tested:
        raise ValueError(f"no run with {list(test_workers)} workers to test the fit on")
    return cal, tested


def held_out_errors(tested: Sequence[HeldOut]) -> dict[str, float]:
    """Mean absolute relative error of the held-out predictions per codec label."""
    by_label: dict[str, list[float]] = {}
    for h in tested:
        by_label.setdefault(h.run.label, []).append(abs(h.error))
    return {label: statistics.fmean(errors) for label, errors in by_label.items()}


# Extrapolation -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecCost:
    """One codec on one model, from the gradient study: bytes of a worker's message set, encode time, the
    PS's decode time of one message set (this CPU)."""

    label: str
    bytes: float
    encode_s: float
    decode_s: float


@dataclass(frozen=True)
class StepPrediction:
    """A predicted step: its time and parts (s), and the downlink that gave it (the cheaper of the two)."""

    step_s: float
    worker_s: float  # C + E (+ A): the workers' own part
    ps_link_s: float  # n U / R_up + W / R_down at the PS (per shard when sharded)
    ps_cpu_s: float  # n d + P at the PS (per shard when sharded)
    worker_link_s: float  # U / R_up + W / n / R_down at one worker
    downlink: str

    @property
    def bottleneck(self) -> str:
        """Which of the workers, the PS link or the PS CPU takes the most of the step."""
        parts = {"workers": self.worker_s, "PS link": self.ps_link_s, "PS CPU": self.ps_cpu_s}
        return max(parts, key=parts.get)


def predict(
    cost: CodecCost,
    workers: int,
    rate_bps: float,
    compute_s: float,
    update_s: float,
    dense_bytes: float,
    latency_s: float = PREDICTION_LATENCY_S,
    overhead_s: float = 0.0,
    shards: int = 1,
    down_rate_bps: float | None = None,
    downlinks: Sequence[str] = ("atoms", "model"),
) -> StepPrediction:
    """The step time of `workers` workers at `rate_bps` (bytes/s) with the PS split into `shards` shards.

    The downlink is whichever of `atoms` (W = n^2 U, and each worker replays the step: A = n d + P) and `model`
    (W = n x dense_bytes, A = 0) gives the shorter step. With S shards each shard carries 1/S of the bytes and
    of the decoding and update work over its own link and CPU; a worker's own link (also `rate_bps`) carries
    its U up and W / n down whatever S, and the step waits for the slower of the two links. `rate_bps` is the
    upload (workers to PS) rate, `down_rate_bps` the download's (default the same); `downlinks` limits the
    choice (the paper's PS always sends the model: ("model",)).
    """
    down_rate = rate_bps if down_rate_bps is None else down_rate_bps
    if workers < 1 or shards < 1 or not rate_bps > 0 or not down_rate > 0:
        raise ValueError(f"workers and shards must be >= 1 and the rates > 0, got {workers}, {shards}, {rate_bps}")
    if not downlinks or set(downlinks) - {"atoms", "model"}:
        raise ValueError(f"downlinks must be among 'atoms' and 'model', got {downlinks!r}")
    best = None
    for downlink, down_bytes in (("atoms", workers * workers * cost.bytes), ("model", workers * dense_bytes)):
        if downlink not in downlinks:
            continue
        apply = _apply_s(downlink, workers, cost.decode_s, update_s)
        ps_link = (workers * cost.bytes / rate_bps + down_bytes / down_rate) / shards
        worker_link = cost.bytes / rate_bps + down_bytes / workers / down_rate
        ps_cpu = (workers * cost.decode_s + update_s) / shards
        worker = compute_s + cost.encode_s + apply
        step = worker + 2 * latency_s + max(ps_link, worker_link) + ps_cpu + overhead_s
        candidate = StepPrediction(step, worker, ps_link, ps_cpu, worker_link, downlink)
        if best is None or candidate.step_s < best.step_s:
            best = candidate
    return best


def speedups(
    costs: dict[str, CodecCost],
    dense_label: str,
    workers: Sequence[int],
    rates_bps: Sequence[float],
    compute_s: float,
    update_s: float,
    dense_bytes: float,
    down_ratio: float = 1.0,
    **options,
) -> dict[float, dict[int, dict[str, float]]]:
    """{rate: {workers: {label: dense step time / the label's step time}}} for every codec in `costs`; the
    download rate is `down_ratio` times each upload rate of `rates_bps`."""
    table: dict[float, dict[int, dict[str, float]]] = {}
    for rate in rates_bps:
        table[rate] = {}
        for n in workers:
            steps = {
                label: predict(
                    c, n, rate, compute_s, update_s, dense_bytes, down_rate_bps=rate * down_ratio, **options
                ).step_s
                for label, c in costs.items()
            }
            table[rate][n] = {label: steps[dense_label] / s for label, s in steps.items()}
    return table


def ps_bottleneck_workers(
    cost: CodecCost, rate_bps: float, compute_s: float, update_s: float, dense_bytes: float, max_workers: int = 4096
) -> tuple[int, str] | None:
    """The smallest n (doubling from 1) at which the single PS (link or CPU) takes longer than the workers'
    own part of the step, and which of the two; None if not up to `max_workers`."""
    n = 1
    while n <= max_workers:
        p = predict(cost, n, rate_bps, compute_s, update_s, dense_bytes)
        if max(p.ps_link_s, p.ps_cpu_s) > p.worker_s:
            return n, "PS link" if p.ps_link_s >= p.ps_cpu_s else "PS CPU"
        n *= 2
    return None
