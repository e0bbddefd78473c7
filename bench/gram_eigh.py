"""Where spectral encoding's time goes: the exact Gram eigendecompositions of ResNet-18's gradient.

    python bench/gram_eigh.py [--device cuda]

Spectral ATOMO (atomo_core/decompositions/spectral.py) needs every singular value of each layer's gradient
(Algorithm 1's probabilities), so it solves one Gram eigenproblem per matrix: 21 for ResNet-18 in the `rows`
reshape, up to 512 x 512. This times them on the device in float32 and float64, batched by size, and on the
host CPU, beside the whole svd s=3 encode of the gradient and one batch-128 backward, so the ratios come from
one run. Prints milliseconds (mean of --repeats after one warm-up).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.nn import functional as F

from atomo_core import LayerPolicy, make_codec
from atomo_core.analysis import matrix_view
from atomo_core.models import build_model


def timed(device: torch.device, fn, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model("resnet18", num_classes=10, in_channels=3).to(device)
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def backward():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    backward_ms = timed(device, backward, args.repeats)
    grads = [p.grad for p in model.parameters()]
    views = [matrix_view(g, "rows") for g in grads if g.dim() >= 2]
    grams = [v @ v.T if v.shape[0] <= v.shape[1] else v.T @ v for v in views]
    by_size = defaultdict(list)
    for g in grams:
        by_size[g.shape[0]].append(g)
    stacks = [torch.stack(group) for group in by_size.values()]
    host = [g.double().cpu() for g in grams]
    policy = LayerPolicy(make_codec("svd", budget=3))
    generator = torch.Generator(device=device).manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"Gram sizes (count): {dict(sorted((k, len(v)) for k, v in by_size.items()))}")
    rows = [
        ("batch-128 backward", backward_ms),
        ("svd s=3 encode of the whole gradient", timed(device, lambda: policy.encode(grads, generator), args.repeats)),
        (
            f"eigh of the {len(grams)} Grams, float32",
            timed(device, lambda: [torch.linalg.eigh(g) for g in grams], args.repeats),
        ),
        ("  batched by size, float32", timed(device, lambda: [torch.linalg.eigh(s) for s in stacks], args.repeats)),
        ("  float64", timed(device, lambda: [torch.linalg.eigh(g.double()) for g in grams], args.repeats)),
        (
            "  on the host CPU, float32",
            timed(device, lambda: [torch.linalg.eigh(g.float()) for g in host], args.repeats),
        ),
        ("  on the host CPU, float64", timed(device, lambda: [torch.linalg.eigh(g) for g in host], args.repeats)),
    ]
    for label, ms in rows:
        print(f"{label:<40} {ms:9.1f} ms  {ms / backward_ms:7.2f} x backward")


if __name__ == "__main__":
    main()
