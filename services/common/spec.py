"""RunSpec: the one description of a training run, shared by `atomo train`, the PS, workers and the REST API.

Every field has a default, so `RunSpec()` (or `{}` over REST) is the embedded default run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MODELS = ("mlp", "lenet5", "resnet18", "resnet34", "vgg11_bn")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "svhn", "mnist")
CODECS = ("dense", "entrywise", "svd", "fourier", "qsgd", "terngrad", "lq")
BUDGETED = ("entrywise", "svd", "fourier")
DEFAULT_BUDGET = 3  # the paper's best spectral-ATOMO budget on CIFAR-10 (Section 6)
# Codec parameter -> the codecs that take it.
_PARAMETER_OWNERS = {
    "budget": BUDGETED,
    "bits": ("qsgd",),
    "bucket_size": ("qsgd",),
    "q": ("lq",),
    "clip": ("terngrad",),
}


class CodecSpec(BaseModel):
    """The gradient codec and the per-layer policy (which layers it applies to)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal[CODECS] = "svd"
    budget: float | None = Field(None, gt=0, description="sparsity budget s (svd, entrywise, fourier); default 3")
    reshape: Literal["rows", "paper"] = Field("rows", description="svd: [out, in*k*k] or the paper's [out*in/2, 2k^2]")
    bits: int | None = Field(None, ge=1, le=16, description="qsgd: bits b, levels s = 2^b - 1; default 4")
    bucket_size: int | None = Field(None, ge=1, description="qsgd: bucket size (default: whole tensor)")
    q: float | None = Field(None, gt=0, description="lq: the l_q norm (float('inf') is TernGrad's)")
    clip: float | None = Field(None, gt=0, description="terngrad: clip at clip*sigma (biased)")
    atom_dtype: Literal["float32", "float16"] = "float32"
    vector_codec: Literal["dense", "entrywise"] = Field("dense", description="codec for 1-D tensors (biases, BN)")
    min_compression_rate: float = Field(
        1.0, ge=1.0, description="layers whose compression rate would be below this are sent dense"
    )

    # Field validators (not a model validator) so that an error names its field, e.g. "codec.bits".
    @field_validator(*_PARAMETER_OWNERS)
    @classmethod
    def _only_own_parameters(cls, value, info: ValidationInfo):
        name = info.data.get("name")
        if value is not None and name is not None and name not in _PARAMETER_OWNERS[info.field_name]:
            raise ValueError(f"codec {name!r} takes no {info.field_name}")
        return value

    @property
    def budget_or_default(self) -> float | int:
        return self.budget if self.budget is not None else DEFAULT_BUDGET

    def codec_params(self) -> dict:
        """Keyword arguments for `atomo_core.make_codec(self.name, **params)`."""
        params: dict = {}
        if self.name in BUDGETED:
            params["budget"] = self.budget_or_default
        if self.name in ("svd", "entrywise", "fourier"):
            params["atom_dtype"] = self.atom_dtype
        if self.name == "svd":
            params["reshape"] = self.reshape
        if self.name == "qsgd":
            params["bits"] = self.bits if self.bits is not None else 4
            if self.bucket_size is not None:
                params["bucket_size"] = self.bucket_size
        if self.name == "lq":
            params["q"] = self.q if self.q is not None else 2.0
        if self.name == "terngrad" and self.clip is not None:
            params["clip"] = self.clip
        return params


class RunSpec(BaseModel):
    """A synchronous data-parallel SGD run on a parameter server (Section 2) with a gradient codec."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("atomo-run", min_length=1, max_length=100)
    model: Literal[MODELS] = "lenet5"
    dataset: Literal[DATASETS] = "digits"
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
    warmup_steps: int = Field(0, ge=0)
    step_milestones: list[int] = Field(default_factory=list, description="step schedule: steps where lr *= 0.1")
    steps: int | None = Field(None, ge=1, le=10_000_000, description="total steps (default 300 unless epochs)")
    epochs: float | None = Field(None, gt=0, le=10_000)
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    num_aggregate: int | None = Field(None, ge=1, description="k gradients averaged per step (default: all live)")
    min_workers: int = Field(1, ge=1)
    dense_steps: int = Field(0, ge=0, description="first steps sent uncompressed")
    downlink: Literal["atoms", "model"] = "atoms"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Field validators (not a model validator) so that an error names its field; `workers` and `steps`
    # come first in the class, so they are in `info.data` when valid.
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

    def total_steps(self, train_size: int) -> int:
        """Steps to run: `steps`, or `epochs` passes over a training set of `train_size` examples."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, round(self.epochs * train_size / self.batch_size))
        return 300
