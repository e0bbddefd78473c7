"""Quantizer costs on a ResNet-18-sized vector (11.2M entries): encode and decode time, bytes.

Two inputs of the same size: i.i.d. Gaussian entries, and the gradient of a freshly initialised
ResNet-18 on one random CIFAR-shaped batch, flattened. Each codec encodes the whole vector as one message;
the real gradient is also sent per layer (one message per parameter tensor, as workers send it). Times are
medians over --repeats, also given as multiples of one torch.rand over the same entries (the uniforms every
quantizer draws) and of the dense codec's encode + decode, both measured in the same run.

    python bench/quantizers.py [--repeats 5] [--threads 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import math

import torch
from timing import median_time

import atomo_core
from atomo_core import make_codec
from atomo_core.models import build_model

CONFIGS = [
    ("qsgd", {"bits": 1, "bucket_size": 512}),
    ("qsgd", {"bits": 2, "bucket_size": 512}),
    ("qsgd", {"bits": 4, "bucket_size": 512}),
    ("qsgd", {"bits": 8, "bucket_size": 512}),
    ("qsgd", {"bits": 4}),
    ("qsgd", {"bits": 8}),
    ("terngrad", {}),
    ("lq", {"q": 2.0}),
    ("lq", {"q": math.inf}),
]
CODINGS = {"qsgd": ("fixed", "elias"), "terngrad": ("2-bit", "elias"), "lq": ("2-bit", "elias")}


def resnet18_gradient(batch: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet18")
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    layers = resnet18_gradient(args.batch)
    real = torch.cat([g.reshape(-1) for g in layers])
    n = real.numel()
    gaussian = torch.randn(n, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    rand_s = median_time(lambda: torch.rand(n, generator=generator), args.repeats)
    dense = make_codec("dense")
    dense_msg = dense.encode(gaussian)
    dense_s = median_time(lambda: dense.decode(bytes(dense.encode(gaussian))), args.repeats)
    print(
        f"{n:,} entries, {args.threads} threads; torch.rand {rand_s * 1e3:.0f} ms; dense encode+bytes+decode "
        f"{dense_s * 1e3:.0f} ms, {len(dense_msg) / 1e6:.2f} MB"
    )
    header = f"{'codec':<28} {'input':<9} {'coding':<7} {'encode ms':>9} {'decode ms':>9} {'x rand':>7} "
    print(header + f"{'x dense':>7} {'MB':>7} {'per layer MB':>12}")
    for name, params in CONFIGS:
        codec = make_codec(name, **params)
        label = f"{name} " + " ".join(f"{k}={v}" for k, v in params.items())
        for input_name, vector in [("gaussian", gaussian), ("resnet18", real)]:
            msg = codec.encode(vector, generator=generator)
            wire = bytes(msg)
            encode_s = median_time(lambda c=codec, v=vector: c.encode(v, generator=generator), args.repeats)
            decode_s = median_time(lambda w=wire: atomo_core.decode(w), args.repeats)
            per_layer = ""
            if input_name == "resnet18":
                per_layer = f"{sum(len(codec.encode(g, generator=generator)) for g in layers) / 1e6:>12.3f}"
            coding = CODINGS[name][int(msg.sections[1][0])]
            print(
                f"{label:<28} {input_name:<9} {coding:<7} {encode_s * 1e3:>9.0f} {decode_s * 1e3:>9.0f} "
                f"{(encode_s + decode_s) / rand_s:>7.1f} {(encode_s + decode_s) / dense_s:>7.1f} "
                f"{len(wire) / 1e6:>7.3f} {per_layer}"
            )


if __name__ == "__main__":
    main()
