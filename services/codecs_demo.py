"""`atomo codecs`: what each codec does to one real gradient: bytes, compression ratio, relative variance.

Trains nothing: one backward pass of a small model on a batch of the offline digits data (random
CIFAR-shaped data when scikit-learn's digits cannot be loaded), then every registered codec encodes the
gradient through the per-layer policy (1-D tensors dense) a few times.

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

# (label, codec name, parameters): the rows shown, when the codec is registered; "default" marks a RunSpec's
# default parameters (services/common/spec.py).
ROWS = [
    ("svd s=1", "svd", {"budget": 1}),
    ("svd s=3 (default)", "svd", {"budget": 3}),
    ("svd s=3 paper reshape", "svd", {"budget": 3, "reshape": "paper"}),
    ("entrywise s=64", "entrywise", {"budget": 64}),
    ("entrywise s=300 (default)", "entrywise", {"budget": 300}),
    ("fourier s=64", "fourier", {"budget": 64}),
    ("fourier s=300 (default)", "fourier", {"budget": 300}),
    ("qsgd 1 bit", "qsgd", {"bits": 1, "bucket_size": 512}),
    ("qsgd 4 bits (default)", "qsgd", {"bits": 4, "bucket_size": 512}),
    ("terngrad", "terngrad", {}),
    ("lq q=2", "lq", {"q": 2.0}),
    ("lq q=inf (default)", "lq", {"q": float("inf")}),
    ("topk k=300 (default)", "topk", {"budget": 300}),
    ("powersgd r=1", "powersgd", {"rank": 1}),
    ("powersgd r=4 (default)", "powersgd", {"rank": 4}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet5", choices=MODEL_NAMES, help="model (default lenet5)")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the gradient (default 128)")
    parser.add_argument("--samples", type=int, default=10, help="encodings per relative variance (default 10)")
    parser.add_argument("--seed", type=int, default=0)


def batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A batch of the digits data, or random CIFAR-shaped data if the digits cannot be loaded."""
    try:
        from atomo_core.data import load_dataset

        train, _, _ = load_dataset("digits")
        return train.x[:size], train.y[:size], "digits"
    except (ImportError, OSError, RuntimeError):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g), "random"


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.samples < 2:
        raise SystemExit("--batch must be >= 1 and --samples >= 2")
    torch.manual_seed(args.seed)
    x, y, data = batch(args.batch, args.seed)
    model = build_model(args.model, in_channels=x.shape[1])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach() for p in model.parameters()]
    dense = sum(dense_nbytes(tuple(g.shape)) for g in grads)
    norm2 = sum(float(g.double().pow(2).sum()) for g in grads)
    print(
        f"{args.model} on a batch of {len(y)} {data} images: {sum(g.numel() for g in grads):,} parameters, "
        f"dense {dense:,} bytes"
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
    return 0
