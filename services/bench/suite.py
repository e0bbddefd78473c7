"""What `atomo bench` runs, and why: the codecs, the phases, the step-size rule, the paper's regime.

Every run trains the same model on the same data; only the codec, the step size, the momentum, the network,
the number of workers and the seed change. Model and data: LeNet-5 on Fashion-MNIST (60,000 training and
10,000 test images, read offline from Debian's dataset-fashion-mnist package; "digits" where this installation
has no "fashion-mnist" data set). LeNet-5 rather than the MLP because its convolution kernels are 4-D, so the
spectral codecs' reshape policies (`rows` against the paper's) differ on it, as on the paper's networks. Its
dense gradient is 247 KB and a step computes in a few milliseconds here, so a link of tens to hundreds of
Mbit/s makes communication most of a dense step, the paper's regime (`PAPER_COMM_SHARE`).

Phases (`Case.phase`), in the order they run:
- regime: dense (downlink `model`, its best) timed at each profile; its communication share of the step picks
  the headline profile (`headline_profile`);
- tune: each codec of `MAIN_LABELS` at each step size of `LR_GRID` (momentum 0.9) and `LR_GRID_MOMENTUM_OFF`
  (momentum 0, plain SGD: the paper's setting), `TUNE_STEPS` steps on loopback, seed 0, the grid extended
  upwards by doubling (at most `LR_EXTENSIONS` times) while its largest step size is the best; the best final
  test accuracy wins, ties to the smaller step size;
- main: each codec of `MAIN_LABELS` with its step size, momentum 0.9, its best downlink (`best_downlink`), one
  run per seed of `SEEDS`, over the headline profile;
- momentum_off: the same with momentum 0 and its own tuned step size, over the headline profile too;
- downlink: dense and svd s=3 with the other downlink (the one `best_downlink` did not pick), `TIMING_STEPS`;
- scale: dense, svd s=3, qsgd b=4 with 2, 3 and 4 workers, `TIMING_STEPS` steps, headline profile;
- timing: every codec at every profile where no main run measured it, `TIMING_STEPS` steps (the mean step
  time and its split).
Convergence per step does not depend on the network, so only tuning runs on loopback; every time to accuracy
at the headline profile is measured end to end over the emulated link.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from services.common.spec import DATASETS as SPEC_DATASETS
from services.common.spec import CodecSpec, RunSpec
from services.train import slug

MODEL = "lenet5"
# Fashion-MNIST once this installation has it (services.common.spec.DATASETS), else the digits set.
DATASET = "fashion-mnist" if "fashion-mnist" in SPEC_DATASETS else "digits"
SEED = 0
SEEDS = (0, 1, 2)  # the main and momentum-off runs: median and range over these
QUICK_SEEDS = (0,)
BATCH_SIZE = 64  # global: 32 per worker with 2 workers
# LeNet-5 on Fashion-MNIST reaches 60-70% within MAIN_STEPS steps of batch 64 (measured here: dense, momentum
# 0.9 lr 0.05: 68% at step 100, 77% at 150; plain SGD lr 0.2: 59% at step 100, 70% at 150); on digits 80-93%.
TARGETS = (0.60, 0.65, 0.70) if DATASET == "fashion-mnist" else (0.80, 0.90, 0.93)
LR_GRID = (0.025, 0.05, 0.1)
LR_GRID_MOMENTUM_OFF = (0.1, 0.2, 0.4)  # the same powers of two, two octaves up: heavy-ball with momentum
# 0.9 takes steps about 1/(1 - 0.9) = 10 times lr, so plain SGD needs a larger lr for the same progress
QUICK_LR = 0.05
MOMENTUM = 0.9
TUNE_STEPS = 100
MAIN_STEPS = 160  # 32 evaluations of 10,000 images each: the default suite's largest cost
TIMING_STEPS = 30
QUICK_STEPS = 100
EVAL_EVERY = 5  # the main and momentum-off runs: a time to accuracy is known to within 5 steps
QUICK_EVAL_EVERY = 10
SCALE_WORKERS = (2, 3, 4)
# The codecs of the tune, main and momentum-off phases (the targets need these; top-k's label carries its
# byte-matched budget, so it is matched by family); every other codec runs in the timing phase only.
MAIN_LABELS = ("dense", "qsgd b=4", "qsgd b=8", "svd s=2", "svd s=3", "powersgd r=2")
MAIN_FAMILIES = ("topk",)
LR_EXTENSIONS = 2  # where the best lr is the grid's largest, the grid goes on doubling, this many times at most
LR_RULE = (
    "each codec trained {steps} steps on loopback at every lr of {grid} (momentum 0.9) and of {grid_off} "
    "(momentum off), and at twice the largest lr tried while that was the best, at most {extensions} more times; "
    "the lr with the best test accuracy at the end wins, ties to the smaller lr"
)
# Table 6 of the paper: spectral ATOMO s=3 reaches the target 3.96x faster than dense SGD (VGG-11-BN, 16
# workers). If compressed communication cost nothing and the steps to the target were the same, the speed-up
# would be (compute + communication) / compute, so 3.96x needs communication >= 1 - 1/3.96 = 74.7% of a dense
# step. Figures 2 and 4 show communication dominating dense steps in the same way. The headline profile must
# give dense SGD (with its best downlink) at least that share: REGIME_SHARE.
PAPER_SPEEDUP = 3.96
PAPER_COMM_SHARE = 1 - 1 / PAPER_SPEEDUP
REGIME_SHARE = 0.75
PAPER_HOW = (
    "Table 6: svd s=3 is 3.96x faster than dense SGD to the target (VGG-11-BN, 16 workers); were compressed "
    "communication free and the steps to the target equal, speed-up = (compute + communication) / compute, "
    "so communication >= 1 - 1/3.96 = 74.7% of a dense step. Ours: the median over steps 5.. of a dense run's "
    "(downlink model) communication_s / (compute_s + encode_s + communication_s) at each profile; the headline "
    "profile is the fastest link where that share is >= 75% (the slowest link if none reaches it)."
)
# The bar (the paper's Table 6, the median of the seeds, momentum off, the best dense baseline): "match" at every
# target accuracy, "beat" at the highest.
MATCH_DENSE, MATCH_QSGD = 2.7, 2.0
BEAT_DENSE, BEAT_QSGD = 4.0, 2.4


@dataclass(frozen=True)
class CodecCase:
    """A codec as the suite runs it: its label in the report, its CodecSpec fields, family and bias."""

    label: str
    codec: dict
    family: str
    biased: bool = False

    def spec(self) -> CodecSpec:
        return CodecSpec(**self.codec)


def codec_cases(budgets: dict[str, int]) -> list[CodecCase]:
    """Every codec of the default suite; `budgets`: entrywise, fourier and topk budgets whose bytes match svd
    s=3 (`comparable_budgets`)."""
    cases = [CodecCase("dense", {"name": "dense"}, "dense")]
    cases += [CodecCase(f"qsgd b={b}", {"name": "qsgd", "bits": b}, "qsgd") for b in (2, 4, 8)]
    cases += [CodecCase("terngrad", {"name": "terngrad"}, "terngrad")]
    cases += [CodecCase(f"svd s={s}", {"name": "svd", "budget": s}, "svd") for s in (1, 2, 3, 4)]
    for name in ("entrywise", "fourier"):
        cases.append(CodecCase(f"{name} s={budgets[name]}", {"name": name, "budget": budgets[name]}, name))
    cases.append(CodecCase(f"topk k={budgets['topk']}", {"name": "topk", "budget": budgets["topk"]}, "topk", True))
    cases += [CodecCase(f"powersgd r={r}", {"name": "powersgd", "rank": r}, "powersgd", True) for r in (1, 2, 4)]
    cases.append(CodecCase("svd s=3 paper", {"name": "svd", "budget": 3, "reshape": "paper"}, "svd"))
    return cases


QUICK_LABELS = ("dense", "qsgd b=4", "svd s=3")


def choose_lrs(
    scores: dict[tuple[str, float], dict[float, float]],
) -> tuple[dict[tuple[str, float], float], dict[tuple[str, float], float]]:
    """The tuning rule. `scores`: {(label, momentum): {lr: final test accuracy (-1 for a failed run)}}.
    Returns ({key: the best lr, ties to the smaller}, {key: the next lr to try}): twice the best where the best
    is the largest lr tried and doubling stays within `LR_EXTENSIONS` doublings of the grid's largest."""
    best, more = {}, {}
    for key, by_lr in scores.items():
        top = max(by_lr.values())
        best[key] = min(lr for lr, score in by_lr.items() if score == top)
        grid = LR_GRID if key[1] else LR_GRID_MOMENTUM_OFF
        if best[key] == max(by_lr) and 2 * best[key] <= max(grid) * 2**LR_EXTENSIONS * (1 + 1e-9):
            more[key] = 2 * best[key]
    return best, more


def in_main(case: CodecCase) -> bool:
    """Whether `case` runs in the tune, main and momentum-off phases (MAIN_LABELS, MAIN_FAMILIES)."""
    return case.label in MAIN_LABELS or case.family in MAIN_FAMILIES


def best_downlink(message_nbytes: float, dense_nbytes: float, workers: int) -> str:
    """The downlink that sends each worker fewer bytes per step: "atoms" (the `workers` messages of the step)
    or "model" (the dense model). Dense SGD's is "model" with two or more workers."""
    return "model" if dense_nbytes < workers * message_nbytes else "atoms"


BYTE_MATCHED = ("entrywise", "fourier", "topk")  # their budgets match svd s=3's bytes (comparable_budgets)


def valid(case: CodecCase) -> str | None:
    """None if this installation's RunSpec accepts the codec; otherwise why not (the suite skips it)."""
    try:
        case.spec()
    except ValueError as exc:
        return str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
    return None


@dataclass
class Case:
    """One run of the suite; `profile` is a profile name or "loopback" (bandwidth and latency then None)."""

    phase: str
    codec: CodecCase
    profile: str
    bandwidth_mbit: float | None
    latency_ms: float | None
    workers: int
    momentum: float
    lr: float
    steps: int
    downlink: str = "atoms"
    eval_every: int = EVAL_EVERY
    seed: int = SEED
    case_id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.case_id:
            momentum = "" if self.momentum == MOMENTUM else f"-m{self.momentum:g}"
            downlink = "" if self.downlink == "atoms" else f"-{self.downlink}"
            lr = f"-lr{self.lr:g}" if self.phase == "tune" else ""
            seed = f"-s{self.seed}" if self.phase in ("main", "momentum_off") else ""
            self.case_id = slug(
                f"{self.phase}-{self.profile}-w{self.workers}-{self.codec.label}{momentum}{downlink}{lr}{seed}"
            )[:64]

    def run_spec(self) -> RunSpec:
        return RunSpec(
            name=self.case_id,
            model=MODEL,
            dataset=DATASET,
            codec=self.codec.spec(),
            workers=self.workers,
            batch_size=BATCH_SIZE,
            lr=self.lr,
            momentum=self.momentum,
            steps=self.steps,
            eval_every=min(self.eval_every, self.steps),
            # evaluations on the whole test set (10,000 images: 0.7 s each here) after the last step, so that
            # they take no CPU from the timed steps (a compute-bound compressed run would lose most)
            eval_deferred=True,
            checkpoint_every=self.steps,  # one checkpoint, at the end: no disk writes inside the timed steps
            min_workers=self.workers,
            downlink=self.downlink,
            seed=self.seed,
            device="cpu",
        )

    def record(self) -> dict:
        """case.json without the outcome (`state`, `error`, `wall_s`)."""
        return {
            "case_id": self.case_id,
            "label": self.codec.label,
            "family": self.codec.family,
            "biased": self.codec.biased,
            "codec": self.codec.spec().model_dump(mode="json"),
            "profile": self.profile,
            "bandwidth_mbit": self.bandwidth_mbit,
            "latency_ms": self.latency_ms,
            "workers": self.workers,
            "momentum": self.momentum,
            "lr": self.lr,
            "downlink": self.downlink,
            "phase": self.phase,
            "steps": self.steps,
            "seed": self.seed,
            "eval_every": min(self.eval_every, self.steps),
        }


# -- bytes: the budgets of entrywise, fourier and topk that match svd s=3 ----------------------------------------


@functools.lru_cache(maxsize=1)
def _gradient() -> tuple[torch.Tensor, ...]:
    """A real gradient of the suite's model: LeNet-5 at its seeded initialization, one worker's batch of
    DATASET."""
    from atomo_core.data import load_dataset
    from atomo_core.models import build_model

    train, _, info = load_dataset(DATASET)
    torch.manual_seed(SEED)
    model = build_model(MODEL, info.num_classes, info.in_channels)
    x, y = train.x[: BATCH_SIZE // 2], train.y[: BATCH_SIZE // 2]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return tuple(p.grad for p in model.parameters())


def message_nbytes(codec: dict, samples: int = 4) -> float:
    """Mean bytes of one worker's message for `codec` on `_gradient()`, encoded `samples` times by the
    runtime's per-layer policy."""
    from services.worker.worker import gradient_policy

    policy = gradient_policy(RunSpec(codec=CodecSpec(**codec)))
    generator = torch.Generator().manual_seed(SEED)
    return sum(sum(len(m) for m in policy.encode(_gradient(), generator)) for _ in range(samples)) / samples


def comparable_budgets(reference: dict | None = None) -> dict:
    """For entrywise, fourier and topk: the whole budget whose message bytes (one seeded encoding) are closest
    to the mean bytes of `reference` (svd s=3), by bisection (bytes grow with the budget). Returns the
    budgets, the reference's mean bytes and each chosen budget's mean bytes."""
    reference = reference or {"name": "svd", "budget": 3}
    target = message_nbytes(reference)
    result = {"reference": reference, "reference_nbytes": target, "budgets": {}, "nbytes": {}}
    for name in BYTE_MATCHED:
        if valid(CodecCase(name, {"name": name, "budget": 1}, name)) is not None:
            continue
        low, high = 1, 1 << 16
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if message_nbytes({"name": name, "budget": mid}, 1) < target else (low, mid)
        best = min((low, high), key=lambda b: abs(message_nbytes({"name": name, "budget": b}, 1) - target))
        result["budgets"][name] = best
        result["nbytes"][name] = message_nbytes({"name": name, "budget": best})
    return result


def headline_profile(shares: dict[str, float | None], bandwidths: dict[str, float]) -> str:
    """The profile of the regime: the fastest link (by `bandwidths`, Mbit/s) where dense SGD's communication share
    of the step is at least REGIME_SHARE; where none is, the one with the largest share."""
    usable = {name: s for name, s in shares.items() if s is not None and s > 0}
    if not usable:
        raise ValueError(f"no positive communication share to choose a profile from: {shares}")
    regime = [name for name, s in usable.items() if s >= REGIME_SHARE]
    if regime:
        return max(regime, key=lambda name: bandwidths.get(name, 0.0))
    return max(usable, key=usable.get)
