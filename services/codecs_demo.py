"""`atomo codecs`: what each codec does to one real gradient: bytes, compression ratio, relative variance.

One backward pass of a small model on a batch of the offline digits data (random CIFAR-shaped data when
scikit-learn's digits cannot be loaded), by default at initialization and at the per-worker batch of the
default run (`atomo train`: batch 64 over 2 workers); `--steps N` first trains the model N steps of local
SGD with the default run's learning rate and momentum. Then every registered codec encodes the gradient
through the per-layer policy (1-D tensors dense) a few times.

Why the ratio differs from `atomo train`'s: training's is dense bytes / bytes up over every step of the run,
and the gradient changes as the model learns. The codecs whose size is set by their budget (svd, entrywise,
fourier, topk, powersgd) and terngrad (a fixed 2 bits an entry) send about the same on any gradient, so
their ratio here is close to training's; the Elias-coded ones (qsgd, lq) send fewer bytes as the gradient
concentrates on fewer large entries: on LeNet-5 and digits, qsgd 4 bits is 18x here at initialization, 38x
with `--steps 300`, and 37x over the default run trained with it (the README's `--compare` table).

The BIASED codecs (topk, powersgd) are measured without error feedback, each encoding from a zero memory:
their column is the squared relative error of one step, E||C(g) - g||^2 / ||g||^2, not a variance; in
training the memory carries that error to later steps.
"""

from __future__ import annotations

import argparse

import torch

import atomo_core
from atomo_core import LayerPolicy, dense_nbytes, make_codec
from atomo_core.models import MODEL_NAMES, build_model
from services.common.spec import DEFAULT_BUDGETS, RunSpec

DEFAULT_RUN = RunSpec()
PER_WORKER_BATCH = DEFAULT_RUN.batch_size // DEFAULT_RUN.workers  # what each worker encodes in the default run
MAX_STEPS = 100_000

# (label, codec name, parameters): the rows shown, when the codec is registered; "default" marks a RunSpec's
# default parameters (services/common/spec.py).
ROWS = [
    ("svd s=1", "svd", {"budget": 1}),
    ("svd s=3 (default)", "svd", {"budget": 3}),
    ("svd s=3 paper reshape", "svd", {"budget": 3, "reshape": "paper"}),
    ("entrywise s=64", "entrywise", {"budget": 64}),
    (f"entrywise s={DEFAULT_BUDGETS['entrywise']:g} (default)", "entrywise", {"budget": DEFAULT_BUDGETS["entrywise"]}),
    ("fourier s=64", "fourier", {"budget": 64}),
    (f"fourier s={DEFAULT_BUDGETS['fourier']:g} (default)", "fourier", {"budget": DEFAULT_BUDGETS["fourier"]}),
    ("qsgd 1 bit", "qsgd", {"bits": 1, "bucket_size": 512}),
    ("qsgd 4 bits (default)", "qsgd", {"bits": 4, "bucket_size": 512}),
    ("terngrad", "terngrad", {}),
    ("lq q=2", "lq", {"q": 2.0}),
    ("lq q=inf (default)", "lq", {"q": float("inf")}),
    (f"topk k={DEFAULT_BUDGETS['topk']:g} (default)", "topk", {"budget": DEFAULT_BUDGETS["topk"]}),
    ("powersgd r=1", "powersgd", {"rank": 1}),
    ("powersgd r=4 (default)", "powersgd", {"rank": 4}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet5", choices=MODEL_NAMES, help="model (default lenet5)")
    parser.add_argument(
        "--batch",
        type=int,
        default=PER_WORKER_BATCH,
        help=f"batch size of the gradient (default {PER_WORKER_BATCH}: a worker's batch in the default run)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"train the model this many local SGD steps first (lr {DEFAULT_RUN.lr:g}, momentum "
        f"{DEFAULT_RUN.momentum:g}, this batch size); default 0: the gradient at initialization",
    )
    parser.add_argument("--samples", type=int, default=10, help="encodings per relative variance (default 10)")
    parser.add_argument("--seed", type=int, default=0)


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The digits training set, or random CIFAR-shaped data if the digits cannot be loaded."""
    try:
        from atomo_core.data import load_dataset

        train, _, _ = load_dataset("digits")
        return train.x, train.y, "digits"
    except (ImportError, OSError, RuntimeError):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1024, 3, 32, 32, generator=g), torch.randint(0, 10, (1024,), generator=g), "random"


def train_locally(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    """`args.steps` steps of SGD on random batches of (x, y), with the default run's lr and momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=DEFAULT_RUN.lr, momentum=DEFAULT_RUN.momentum)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        index = torch.randint(0, len(y), (args.batch,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.samples < 2 or not 0 <= args.steps <= MAX_STEPS:
        raise SystemExit(f"--batch must be >= 1, --samples >= 2 and --steps within 0..{MAX_STEPS}")
    torch.manual_seed(args.seed)
    x, y, source = data(args.seed)
    if args.batch > len(y):
        raise SystemExit(f"--batch must be at most {len(y)} (the {source} training set)")
    model = build_model(args.model, in_channels=x.shape[1])
    train_locally(model, x, y, args)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[: args.batch]), y[: args.batch]).backward()
    grads = [p.grad.detach() for p in model.parameters()]
    dense = sum(dense_nbytes(tuple(g.shape)) for g in grads)
    norm2 = sum(float(g.double().pow(2).sum()) for g in grads)
    when = f"after {args.steps} local SGD steps" if args.steps else "at initialization"
    print(
        f"{args.model} {when}, a batch of {args.batch} {source} images: {sum(g.numel() for g in grads):,} "
        f"parameters, dense {dense:,} bytes"
    )
    print(f"{'codec':<26} {'bytes':>10} {'ratio':>8} {'rel. variance':>14}")
    generator = torch.Generator().manual_seed(args.seed)
    for label, name, params in ROWS:
        if name not in atomo_core.codec_names():
            continue
        codec = make_codec(name, **params)
        biased = getattr(codec, "biased", False)
        policy = LayerPolicy(codec)
        nbytes, errors = [], []
        for _ in range(args.samples):
            policy.reset_feedback()  # one step from a zero memory: the compressor's own error
            wires = [bytes(m) for m in policy.encode(grads, generator)]
            nbytes.append(sum(len(w) for w in wires))
            estimates = [torch.zeros_like(g) for g in grads]
            atomo_core.decode_add_(wires, estimates)
            errors.append(sum(float((e - g).double().pow(2).sum()) for e, g in zip(estimates, grads, strict=True)))
        mean_bytes = sum(nbytes) / len(nbytes)
        error = f"{sum(errors) / len(errors) / norm2:.3g}" + ("*" if biased else "")
        print(f"{label:<26} {mean_bytes:>10,.0f} {dense / mean_bytes:>8.1f} {error:>14}")
    print("rel. variance: E||g^ - g||^2 / ||g||^2 (the estimates are unbiased); ratio: dense bytes / bytes")
    print("* biased, with error feedback in the worker: the squared relative error of one step without memory")
    print(
        "atomo train's ratio is over a whole run, as the model learns: svd, entrywise, fourier, topk, powersgd and\n"
        "terngrad send about the same there, but qsgd and lq (Elias-coded) send fewer bytes as the gradient\n"
        "concentrates on fewer large entries (LeNet-5 on digits, qsgd 4 bits: 18x at initialization, 38x after\n"
        "300 steps, 37x over the default run). --steps N measures the gradient of a model trained N steps."
    )
    return 0
