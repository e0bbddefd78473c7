"""`atomo bench`'s gradient study: every codec on ResNet-18 and VGG-11-BN gradients taken during training.

Each model is trained with plain SGD (no momentum, no weight decay) on CIFAR-10 when torchvision and the data
are present, else on the "synthetic" 3x32x32 set of atomo_core.data (gradients.json says which, and the report
labels the study "synthetic data" then: real backward passes of these networks, not on a real data set), and
its whole gradient (every parameter, in parameter order) is captured at a few steps. Then:

- variance per byte, at the last captured step: for every codec and budget of `codec_grid`, the measured
  E||g^ - g||^2 / ||g||^2 over independent encodings (mean and standard error), the exact bytes (the
  messages' lengths under the runtime's default per-layer policy: the codec for >= 2-D tensors, dense for
  1-D ones), and the median encode and decode times of the whole gradient on this CPU. Biased codecs (top-k,
  PowerSGD) report the squared relative error of one compression without error feedback.
- per layer (>= 2-D tensors), at each captured step: Theorem 6's ratio (n+m)||X||_*^2 / ||X||_{1,1}^2 for
  the "rows" and "paper" matrix views (<= 1: spectral beats entry-wise at equal communication), and the
  share of ||X||_F^2 in the top 3 singular values.
- the spectrum (Figure 1): the normalized singular values sigma_i / sigma_1 (the first `spectrum_top`) of
  three representative convolutions (early, middle, last) at each captured step.
- for the scale model: the compute time of a training step (forward and backward) and of one optimizer
  step (SGD with momentum, as the PS runs it) on this CPU.

The math is atomo_core.analysis; this module trains, times, prints progress and writes gradients.json.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from atomo_core import LayerPolicy, codec_names, dense_nbytes, make_codec
from atomo_core.analysis import matrix_view, relative_variance, singular_values, theorem6_ratio
from atomo_core.data import DatasetUnavailableError, load_dataset
from atomo_core.models import build_model
from services.bench.suite import CodecCase

MODEL_TITLES = {"resnet18": "ResNet-18", "vgg11_bn": "VGG-11-BN"}
BIASED = ("topk", "powersgd")


@dataclass(frozen=True)
class StudyConfig:
    """What the study measures and how long it takes.

    models: the models studied. capture_steps: training steps (0 = at initialization) whose gradient is
    captured; the last one is the variance study's. batch_size, lr: plain SGD's. encodings: independent
    encodings per codec for the variance estimate. spectrum_top: singular values kept per spectrum.
    train_size: examples drawn from the training set (synthetic: generated).
    """

    models: tuple[str, ...] = ("resnet18", "vgg11_bn")
    capture_steps: tuple[int, ...] = (0, 40, 80)
    batch_size: int = 32
    lr: float = 0.05
    encodings: int = 8
    spectrum_top: int = 32
    train_size: int = 5_000
    seed: int = 0


DEFAULT = StudyConfig()
# About a minute here: the same models and codecs, gradients at steps 0 and 10 of batch 16, 3 encodings each.
QUICK = StudyConfig(capture_steps=(0, 10), batch_size=16, encodings=3, train_size=1_000)


def codec_grid() -> list[CodecCase]:
    """Every codec and budget of the study (labelled as `atomo bench` labels its runs); top-k and PowerSGD only
    when they are registered. Each is built from its RunSpec codec fields, so its defaults are a run's."""
    grid = [CodecCase("dense", {"name": "dense"}, "dense")]
    grid += [CodecCase(f"qsgd b={b}", {"name": "qsgd", "bits": b}, "qsgd") for b in (2, 4, 8)]
    grid += [CodecCase("terngrad", {"name": "terngrad"}, "terngrad")]
    grid += [CodecCase(f"svd s={s}", {"name": "svd", "budget": s}, "svd") for s in (1, 2, 3, 4)]
    grid += [
        CodecCase(f"svd s={s} paper", {"name": "svd", "budget": s, "reshape": "paper"}, "svd paper")
        for s in (1, 2, 3, 4)
    ]
    for name in ("entrywise", "fourier"):
        grid += [CodecCase(f"{name} s={s}", {"name": name, "budget": s}, name) for s in (300, 3000, 30000)]
    names = codec_names()
    if "topk" in names:
        grid += [CodecCase(f"topk k={k}", {"name": "topk", "budget": k}, "topk", True) for k in (300, 3000)]
    if "powersgd" in names:
        grid += [CodecCase(f"powersgd r={r}", {"name": "powersgd", "rank": r}, "powersgd", True) for r in (1, 4)]
    return grid


def load_training_data(config: StudyConfig) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """Images, labels, the data set's name and why it was chosen: CIFAR-10 if present, else synthetic."""
    try:
        import torchvision  # noqa: F401  (load_dataset needs it for CIFAR-10)

        train, _, _ = load_dataset("cifar10", download=False, train_size=config.train_size)
        return train.x, train.y, "cifar10", "CIFAR-10 (torchvision, found locally)"
    except (ImportError, DatasetUnavailableError, OSError, RuntimeError) as exc:
        why = f"CIFAR-10 unavailable ({type(exc).__name__}: {str(exc)[:120]})"
    train, _, _ = load_dataset("synthetic", train_size=config.train_size, seed=config.seed)
    return train.x, train.y, "synthetic", f"atomo_core.data's synthetic 3x32x32 set, 10 classes; {why}"


def _median(values) -> float:
    return statistics.median(values)


def study_model(name: str, x: torch.Tensor, y: torch.Tensor, config: StudyConfig, log=print) -> dict:
    """Train `name` with plain SGD, capture its gradient at `config.capture_steps`, measure everything."""
    torch.manual_seed(config.seed)
    model = build_model(name, num_classes=10, in_channels=x.shape[1])
    model.train()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    matrices = [i for i, p in enumerate(params) if p.dim() >= 2]
    spectrum_layers = _representative(matrices, params)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    layers = [
        {
            "name": names[i],
            "shape": list(params[i].shape),
            "rows": list(matrix_view(params[i], "rows").shape),
            "paper": list(matrix_view(params[i], "paper").shape),
            "theorem6_rows": [],
            "theorem6_paper": [],
            "top3_energy": [],
        }
        for i in matrices
    ]
    spectra = [
        {"name": names[i], "rows": list(matrix_view(params[i], "rows").shape), "values": []} for i in spectrum_layers
    ]
    step_s, gradient = [], None
    for step in range(max(config.capture_steps) + 1):
        batch = order[(step * config.batch_size + torch.arange(config.batch_size)) % len(y)]
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        step_s.append(time.perf_counter() - start)
        if step in config.capture_steps:
            gradient = [p.grad.detach().clone() for p in params]
            for row, i in zip(layers, matrices, strict=True):
                grad = gradient[i]
                rows = matrix_view(grad, "rows")
                sigma = singular_values(rows)
                row["theorem6_rows"].append(_ratio(rows, sigma))
                row["theorem6_paper"].append(_ratio(matrix_view(grad, "paper")))
                sigma2 = sigma.square()
                row["top3_energy"].append(float(sigma2[:3].sum() / sigma2.sum()) if sigma2.sum() > 0 else None)
            for spectrum, i in zip(spectra, spectrum_layers, strict=True):
                sigma = singular_values(matrix_view(gradient[i], "rows"))
                top = (sigma[: config.spectrum_top] / sigma[0]).tolist() if sigma[0] > 0 else []
                spectrum["values"].append(top)
            log(f"gradients: {MODEL_TITLES.get(name, name)} step {step}: loss {loss.item():.4f}, captured")
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-config.lr)
    codecs = [_measure(case, gradient, config, log, name) for case in codec_grid()]
    update_s = _update_time(params, gradient)
    return {
        "title": MODEL_TITLES.get(name, name),
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
        "matrices": len(matrices),
        "dense_bytes": sum(dense_nbytes(tuple(p.shape)) for p in params),
        "compute_s": _median(step_s[1:] or step_s),
        "update_s": update_s,
        "batch_size": config.batch_size,
        "variance_step": max(config.capture_steps),
        "codecs": codecs,
        "layers": layers,
        "spectra": spectra,
    }


def _update_time(params: list[torch.Tensor], gradient: list[torch.Tensor], repeats: int = 5) -> float:
    """Median seconds of one optimizer step over the whole model (SGD, momentum 0.9, weight decay 5e-4), as
    the PS runs it once per step."""
    for p, g in zip(params, gradient, strict=True):
        p.grad = g.clone()
    optimizer = torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=5e-4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return _median(times)


def _ratio(matrix: torch.Tensor, sigma: torch.Tensor | None = None) -> float | None:
    return theorem6_ratio(matrix, sigma) if bool(matrix.any()) else None


def _representative(matrices: list[int], params: list[torch.Tensor]) -> list[int]:
    """An early, a middle and the last convolution (4-D) of the model: the layers whose spectra are plotted."""
    convs = [i for i in matrices if params[i].dim() == 4] or matrices
    picks = [convs[min(1, len(convs) - 1)], convs[len(convs) // 2], convs[-1]]
    return list(dict.fromkeys(picks))


def _measure(case: CodecCase, gradient: list[torch.Tensor], config: StudyConfig, log, model: str) -> dict:
    """The variance-per-byte row of one codec setting; an error is recorded, not raised (the study goes on)."""
    spec = case.spec()
    params = spec.codec_params()
    row = {"label": case.label, "name": spec.name, "params": params, "family": case.family, "biased": case.biased}
    try:
        estimate = relative_variance(
            lambda: LayerPolicy(make_codec(spec.name, **params)), gradient, config.encodings, config.seed
        )
    except (ValueError, RuntimeError) as exc:
        log(f"gradients: {MODEL_TITLES.get(model, model)} {case.label}: failed: {exc}")
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    row.update(
        relative_variance=estimate.mean,
        stderr=estimate.stderr,
        encodings=len(estimate.errors),
        bytes=statistics.fmean(estimate.nbytes),
        bytes_min=min(estimate.nbytes),
        bytes_max=max(estimate.nbytes),
        messages=estimate.messages,
        encode_s=_median(estimate.encode_s),
        decode_s=_median(estimate.decode_s),
        error=None,
    )
    log(
        f"gradients: {MODEL_TITLES.get(model, model)} {case.label}: relative variance {estimate.mean:.4g} "
        f"(+- {estimate.stderr:.2g}), {row['bytes'] / 1e6:.3f} MB, encode {1e3 * row['encode_s']:.0f} ms"
    )
    return row


def run_study(out: Path, quick: bool = False, config: StudyConfig | None = None) -> Path:
    """Run the study (QUICK or DEFAULT unless `config` is given), write `<out>/gradients.json`, return its path."""
    config = config or (QUICK if quick else DEFAULT)
    if not config.capture_steps or min(config.capture_steps) < 0:
        raise ValueError(f"capture_steps must be non-negative steps, got {config.capture_steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    x, y, dataset, dataset_note = load_training_data(config)

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"gradients: {', '.join(MODEL_TITLES.get(m, m) for m in config.models)} on {dataset}, quick={quick}")
    models = {name: study_model(name, x, y, config, log) for name in config.models}
    result = {
        "quick": quick,
        "config": asdict(config),
        "dataset": dataset,
        "dataset_note": dataset_note,
        "capture_steps": sorted(config.capture_steps),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "duration_s": time.perf_counter() - started,
        "models": models,
    }
    path = out / "gradients.json"
    path.write_text(json.dumps(_finite(result), separators=(",", ":")) + "\n", encoding="utf-8")
    log(f"gradients: done in {result['duration_s']:.0f} s: {path}")
    return path


def _finite(value):
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    run_study(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."), quick="--quick" in sys.argv)
