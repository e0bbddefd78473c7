"""RunSpec: the one description of a training run, shared by `atomo train`, the PS, workers and the REST API.

Every field has a default, so `RunSpec()` (or `{}` over REST) is the embedded default run.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import entry_points
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

MODELS = ("mlp", "lenet5", "resnet18", "resnet34", "vgg11_bn", "vgg11_bn_narrow")
DATASETS = ("digits", "fashion-mnist", "synthetic", "cifar10", "cifar100", "svhn", "mnist")
VISION_DATASETS = ("cifar10", "cifar100", "svhn", "mnist")  # atomo_core.data.VISION: they need torchvision
CODECS = ("dense", "entrywise", "svd", "fourier", "qsgd", "terngrad", "lq", "topk", "powersgd")
# Plugin codecs: entry points of this group (atomo_core.codecs.PLUGIN_GROUP; this module does not import torch,
# so validation reads only the installed entry points' names and imports nothing).
PLUGIN_GROUP = "atomo.codecs"
MAX_PLUGIN_PARAMS = 16
BUDGETED = ("entrywise", "svd", "fourier", "topk")
DEFAULT_BUDGET = 3  # the paper's best spectral-ATOMO budget on CIFAR-10 (Section 6); also the vector codec's
# Entry-wise and Fourier atoms are single coefficients, so a comparable variance takes far more of them: on the
# default run (LeNet-5 on digits, 300 steps) budget 100 does not learn (entrywise) or diverges (fourier); entrywise
# at 300 reaches 94-97% (seeds 0-2). Fourier needs more: the DCT spreads a gradient's energy over all its
# coefficients, where ReLU networks' gradients are sparse entry-wise, so at equal budget its variance is higher
# (LeNet-5's 48,000-entry layer: relative variance 41 at s=300). Measured at 300 over seeds 0-4: 93.7%, diverged,
# chance, 85.3%, 95.0%; at 600: 94.3, 95.7, 96.0, 96.3, 95.7% (18x fewer bytes up than dense).
# tests/test_default_codecs.py trains every codec at its defaults, and fourier at seeds 1 and 2 too.
# topk keeps as many entries as entrywise samples, so that their bytes are comparable.
DEFAULT_BUDGETS = {"svd": float(DEFAULT_BUDGET), "entrywise": 300.0, "fourier": 600.0, "topk": 300.0}
DEFAULT_STEPS = 300
# The value each codec parameter takes when a spec leaves it out: a validated spec holds them filled in, so
# what is recorded (spec.json, summary.json, the REST run) is what ran. `clip` stays None: no clipping.
# `budget` defaults per codec (DEFAULT_BUDGETS).
# lq: q=2 (1-bit QSGD over a whole tensor) diverges on the default run by step 40 and q=4 reaches 74%; q=inf
# (TernGrad's l_inf) reaches 91%.
CODEC_DEFAULTS = {"bits": 4, "bucket_size": 512, "q": math.inf, "rank": 4, "basis": "exact", "coding": "auto"}
MAX_RANK = 1024  # atomo_core.biased.powersgd.MAX_RANK
MAX_MILESTONES = 100  # step_milestones: the one list in a spec (codec.params is a dict of MAX_PLUGIN_PARAMS)
MAX_COUNT = 2**62  # the bound of every step count or period, so each fits an int64 anywhere it travels
Milestone = Annotated[int, Field(ge=0, le=MAX_COUNT)]
# Codec parameter -> the codecs that take it.
_PARAMETER_OWNERS = {
    "budget": BUDGETED,
    "bits": ("qsgd",),
    "bucket_size": ("qsgd",),
    "q": ("lq",),
    "clip": ("terngrad",),
    "rank": ("powersgd",),
    "basis": ("svd",),
    "coding": ("qsgd", "lq"),
}

ParamName = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# A plugin codec's parameter: a JSON scalar; numbers finite and within int64, strings short.
ParamValue = (
    bool
    | Annotated[int, Field(ge=-(2**63), lt=2**63)]
    | Annotated[float, Field(allow_inf_nan=False)]
    | Annotated[str, StringConstraints(max_length=256)]
)


def plugin_codec_names() -> list[str]:
    """The names of the installed plugin codecs, read from their entry points without importing them."""
    return sorted({ep.name for ep in entry_points(group=PLUGIN_GROUP)})


def _parse_params(text: str) -> dict:
    """The command-line form of `params`, 'key=value,key=value'; values as JSON scalars (8, 0.5, true) or text."""
    params = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"params: expected key=value, got {item!r}")
        try:
            params[key.strip()] = json.loads(value.strip())
        except ValueError:
            params[key.strip()] = value.strip()
    return params


class CodecSpec(BaseModel):
    """The gradient codec and the per-layer policy (which layers it applies to)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "svd",
        min_length=1,
        max_length=64,
        description=f"a built-in codec ({', '.join(CODECS)}; topk and powersgd are biased, with error feedback "
        f"in the worker) or an installed plugin codec (entry point group {PLUGIN_GROUP!r})",
    )
    budget: float | None = Field(
        None,
        gt=0,
        le=1e9,
        description="sparsity budget s: atoms per tensor in expectation; default 3 (svd), 300 (entrywise), "
        "600 (fourier); "
        "topk: k entries kept per tensor, a whole number (biased, with error feedback in the worker), default 300",
    )
    reshape: Literal["rows", "paper"] = Field("rows", description="svd: [out, in*k*k] or the paper's [out*in/2, 2k^2]")
    basis: Literal["warm", "exact"] | None = Field(
        None,
        description="svd: exact (the Gram matrix's eigenvectors; the default) or warm (top-32 subspace "
        "warm-started at the previous step's, plus residual rows)",
    )
    bits: int | None = Field(None, ge=1, le=16, description="qsgd: bits b, levels s = 2^b - 1; default 4")
    bucket_size: int | None = Field(
        None, ge=1, lt=2**32, description="qsgd: entries per bucket norm; default 512 (QSGD's)"
    )
    q: float | Literal["inf"] | None = Field(
        None, description='lq: the l_q norm, q > 0 (2 is 1-bit QSGD); "inf" is TernGrad\'s l_inf, the default'
    )
    coding: Literal["auto", "elias", "fixed"] | None = Field(
        None,
        description='qsgd, lq: payload coding; "elias": on the host, Elias-coded where smaller than fixed width; '
        '"fixed": fixed-width fields packed on the gradient\'s device (a GPU gradient is not copied to the host); '
        '"auto" (the default): fixed on a GPU, elias on the CPU',
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=MAX_RANK,
        description="powersgd: rank r of the P Q^T approximation (biased, with error feedback in the worker); "
        "default 4",
    )
    clip: float | None = Field(
        None, gt=0, le=1e6, description="terngrad: clip at clip*sigma (biased); null (the default): no clipping"
    )
    params: dict[ParamName, ParamValue] = Field(
        default_factory=dict,
        max_length=MAX_PLUGIN_PARAMS,
        description=f"a plugin codec's keyword arguments (at most {MAX_PLUGIN_PARAMS}, JSON scalars); on the "
        "command line key=value,key=value",
    )
    atom_dtype: Literal["float32", "float16"] = "float32"
    vector_codec: Literal["dense", "entrywise"] = Field("dense", description="codec for 1-D tensors (biases, BN)")
    min_compression_rate: float = Field(
        1.0, ge=1.0, description="layers whose compression rate would be below this are sent dense"
    )

    # Field validators (not a model validator) so that an error names its field, e.g. "codec.bits".
    @field_validator("name")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        """A built-in codec, or a plugin codec installed where this spec is validated."""
        if name not in CODECS and name not in plugin_codec_names():
            plugins = ", ".join(plugin_codec_names()) or f"none (entry point group {PLUGIN_GROUP!r})"
            raise ValueError(f"unknown codec {name!r}; built-in codecs: {', '.join(CODECS)}; plugin codecs: {plugins}")
        return name

    @field_validator(*_PARAMETER_OWNERS)
    @classmethod
    def _only_own_parameters(cls, value, info: ValidationInfo):
        name = info.data.get("name")
        if value is not None and name is not None and name not in _PARAMETER_OWNERS[info.field_name]:
            hint = " (a plugin codec takes its parameters in codec.params)" if name not in CODECS else ""
            raise ValueError(f"codec {name!r} takes no {info.field_name}{hint}")
        return value

    @field_validator("budget")
    @classmethod
    def _whole_topk_budget(cls, budget, info: ValidationInfo):
        if info.data.get("name") == "topk" and budget is not None and budget != int(budget):
            raise ValueError(f"topk keeps a whole number of entries, got budget {budget}")
        return budget

    @field_validator("params", mode="before")
    @classmethod
    def _params_from_text(cls, params):
        return _parse_params(params) if isinstance(params, str) else params

    @field_validator("params")
    @classmethod
    def _params_for_plugins(cls, params: dict, info: ValidationInfo):
        name = info.data.get("name")
        if params and name in CODECS:
            raise ValueError(f"codec {name!r} takes no params (they are a plugin codec's keyword arguments)")
        return params

    @field_validator("q")
    @classmethod
    def _positive_q(cls, q):
        """q > 0, finite or infinite; JSON has no infinity, so it travels as the string "inf"."""
        if q == "inf":
            return math.inf
        if q is not None and not q > 0:  # also refuses NaN
            raise ValueError(f'q must be > 0 (or "inf"), got {q}')
        return q

    @field_serializer("q")
    def _q_as_json(self, q):
        return "inf" if q == math.inf else q

    @model_validator(mode="after")
    def _fill_defaults(self):
        """Every parameter of this codec that was left out takes its default (DEFAULT_BUDGETS, CODEC_DEFAULTS)."""
        if self.name in DEFAULT_BUDGETS and self.budget is None:
            self.budget = DEFAULT_BUDGETS[self.name]
        for parameter, default in CODEC_DEFAULTS.items():
            if self.name in _PARAMETER_OWNERS[parameter] and getattr(self, parameter) is None:
                setattr(self, parameter, default)
        return self

    @property
    def budget_or_default(self) -> float | int:
        return self.budget if self.budget is not None else DEFAULT_BUDGET

    def codec_params(self) -> dict:
        """Keyword arguments for `atomo_core.make_codec(self.name, **params)`."""
        if self.name not in CODECS:
            return dict(self.params)
        params: dict = {}
        if self.name in BUDGETED:
            params["budget"] = self.budget
        if self.name in ("svd", "entrywise", "fourier"):
            params["atom_dtype"] = self.atom_dtype
        if self.name == "svd":
            params["reshape"] = self.reshape
            params["basis"] = self.basis
        if self.name == "qsgd":
            params["bits"], params["bucket_size"] = self.bits, self.bucket_size
        if self.name == "lq":
            params["q"] = self.q
        if self.name in ("qsgd", "lq"):
            params["coding"] = self.coding
        if self.name == "powersgd":
            params["rank"] = self.rank
        if self.name == "terngrad" and self.clip is not None:
            params["clip"] = self.clip
        return params


class RunSpec(BaseModel):
    """A synchronous data-parallel SGD run on a parameter server (Section 2) with a gradient codec."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("atomo-run", min_length=1, max_length=100)
    model: Literal[MODELS] = "lenet5"
    dataset: Literal[DATASETS] = Field(
        "digits",
        description="cifar10, cifar100, svhn and mnist need the vision extra: pip install -e '.[vision]'; "
        "fashion-mnist is read offline from Debian's dataset-fashion-mnist package (or <data root>/fashion-mnist)",
    )
    codec: CodecSpec = Field(default_factory=CodecSpec)
    workers: int = Field(2, ge=1, le=256)
    batch_size: int = Field(
        64, ge=1, le=65536, validate_default=True, description="global batch, split evenly across workers"
    )
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, lt=1)
    lr_schedule: Literal["constant", "step", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    step_milestones: list[Milestone] = Field(
        default_factory=list,
        max_length=MAX_MILESTONES,
        description=f"step schedule: steps where lr *= 0.1 (at most {MAX_MILESTONES})",
    )
    steps: int | None = Field(
        None, ge=1, le=10_000_000, description=f"total steps (default {DEFAULT_STEPS} unless epochs)"
    )
    epochs: float | None = Field(
        None, gt=0, le=10_000, description="passes over the training set instead of steps; null: counted in steps"
    )
    eval_every: int = Field(50, ge=1, le=MAX_COUNT)
    eval_deferred: bool = Field(
        False,
        description="evaluate after the last step, on the weights copied at each evaluation step, so that no "
        "evaluation shares the CPU with the timed steps (benchmarks); records are written at the end. At most 2 GiB "
        "of copies are held: beyond, evaluation starts at once (event evaluation_not_deferred)",
    )
    checkpoint_every: int = Field(100, ge=1, le=MAX_COUNT)
    num_aggregate: int | None = Field(
        None, ge=1, description="k gradients averaged per step; null (the default): all live workers"
    )
    min_workers: int = Field(1, ge=1)
    dense_steps: int = Field(0, ge=0, le=MAX_COUNT, description="first steps sent uncompressed")
    downlink: Literal["atoms", "model"] = "atoms"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Field validators (not a model validator) so that an error names its field; `workers` and `steps`
    # come first in the class, so they are in `info.data` when valid.
    @field_validator("dataset")
    @classmethod
    def _dataset_loads_here(cls, dataset: str) -> str:
        """A torchvision data set is refused where torchvision does not import (the PS could not load it)."""
        if dataset in VISION_DATASETS:
            from atomo_core.data import vision_unavailable_message  # imports torch: only for these data sets

            message = vision_unavailable_message(dataset)
            if message is not None:
                raise ValueError(message)
        return dataset

    @field_validator("epochs")
    @classmethod
    def _steps_or_epochs(cls, epochs, info: ValidationInfo):
        if epochs is not None and info.data.get("steps") is not None:
            raise ValueError("give steps or epochs, not both")
        return epochs

    @field_validator("num_aggregate", "min_workers")
    @classmethod
    def _at_most_workers(cls, value, info: ValidationInfo):
        workers = info.data.get("workers")
        if value is not None and workers is not None and value > workers:
            raise ValueError(f"{info.field_name} ({value}) exceeds workers ({workers})")
        return value

    @field_validator("batch_size")
    @classmethod
    def _at_least_workers(cls, batch_size, info: ValidationInfo):
        workers = info.data.get("workers")
        if workers is not None and batch_size < workers:
            raise ValueError(f"batch_size ({batch_size}) is smaller than workers ({workers})")
        return batch_size

    @model_validator(mode="after")
    def _default_steps(self):
        """Without steps or epochs, a run has DEFAULT_STEPS steps (recorded as such)."""
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS
        return self

    def total_steps(self, train_size: int) -> int:
        """Steps to run: `steps`, or `epochs` passes over a training set of `train_size` examples."""
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * train_size / self.batch_size))
