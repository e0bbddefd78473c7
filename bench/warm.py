"""The warm spectral basis against the exact one on real gradients: encode time, expected bytes, variance.

Two batches of a model give two gradients: g_A (the step before) and g_B (this step, after one SGD step on
g_A). The warm codec's state (each layer's Q) comes from encoding g_A; everything is then measured on g_B:

- encode ms: median wall time of encoding every >= 2-D gradient as a worker's policy does (the layers of one
  codec together: `AtomicCodec.encode_many`; 1-D ones go dense, as the default policy sends them), the exact
  svd s=3 in the same run; "x exact" is the ratio of the two.
- E[KB]: the expected message bytes, computed from the probabilities (sum_i p_i times each atom's bytes, plus
  the headers and the dense 1-D tensors), not from samples.
- rel var: E||g^ - g||^2 / ||g||^2 = sum_i lam_i^2 (1 / p_i - 1) / ||g||^2 over all layers, exact for
  independent Bernoulli draws whether or not the atoms are orthogonal (atomo_core/decompositions/spectral.py);
  --samples encodings check it by Monte Carlo.
- Each warm row's budget s is chosen (bisection) so that its E[KB] equals the exact s=3's: the comparison is
  at equal expected bytes. "r = n/F" takes a rank proportional to each layer's n (one codec per rank).
- "from the SVD" rows start the warm route at each layer's top-r left singular vectors of g_B itself (one
  more subspace step keeps that subspace): the variance of the warm atoms on the best r-dimensional
  subspace, so what any tracker of the top subspace could reach at that r (their encode time is the same
  route's; the SVD that gives their state is not timed).
- PowerSGD (BIASED) compresses the same g_B, warm-started from its Q of g_A, without error-feedback memory:
  its encode time, its bytes and its squared relative error ||P Q^T - g||^2 / ||g||^2 (an error, not a
  variance); "err x MB" and "var x MB" put both on one scale of error per byte.

With --data fashion-mnist (or digits) the two batches are real images (the model then takes 1 channel), and
--checkpoint starts from a trained model rather than the seeded initialization; with --device
cuda the model, the gradients, the encoders and their generators are on the GPU and the timings synchronize it
(the encode ratio to the backward pass measured in the same run is printed; the targets: <= 0.3x).

    python bench/warm.py [--model resnet18] [--batch 32] [--ranks 16,32,64] [--fraction 8] [--threads 2]
        [--svd-ranks 32,64] [--data random|fashion-mnist|digits] [--device cpu|cuda]
        [--checkpoint RUN/checkpoint.pt]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from timing import median_time

import atomo_core
from atomo_core import atomic_probabilities, dense_nbytes, make_codec
from atomo_core.decompositions.spectral import matrix_shape
from atomo_core.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "warm.json"
DEVICE = torch.device("cpu")  # set by --device


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def synchronized(fn):
    """`fn` followed by a device synchronization on a GPU (so that its wall time counts the kernels)."""

    def call():
        result = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return result

    return call


def batches(data: str, batch: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Two batches (x, y) and the images' channels: random CIFAR-shaped ones, or real Fashion-MNIST images."""
    if data == "random":
        return [(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)), 3) for _ in range(2)]
    from atomo_core.data import load_dataset

    train, _, info = load_dataset(data, train_size=2 * batch)
    return [
        (train.x[i * batch : (i + 1) * batch], train.y[i * batch : (i + 1) * batch], info.in_channels) for i in (0, 1)
    ]


def two_gradients(
    model_name: str, batch: int, lr: float, data: str = "random", repeats: int = 5, checkpoint: Path | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """g_A, then g_B after one SGD step on g_A (two batches: `batches`), and the median seconds of the backward
    pass of batch B over `repeats` more passes (the first ones warm up kernels and allocator pools)."""
    torch.manual_seed(0)
    pairs = batches(data, batch)
    model = build_model(model_name, 10, pairs[0][2])
    if checkpoint is not None:  # a run's checkpoint.pt (its "model" entry) or a bare state_dict
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("model", state))
    model = model.to(DEVICE)
    grads, times = [], []
    for i, (x, y, _) in enumerate(pairs + [pairs[1]] * (repeats + 1)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(DEVICE)), y.to(DEVICE))
        synchronized(lambda: None)()
        start = time.perf_counter()
        synchronized(loss.backward)()
        times.append(time.perf_counter() - start)
        if i < 2:
            grads.append([p.grad.detach().clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
    return grads[0], grads[1], statistics.median(times[3:])


class Config:
    """One svd configuration: a codec per >= 2-D layer (the rank may depend on the layer's n); layers of
    equal rank share one codec object, which encodes them together (`encode_all`)."""

    def __init__(self, label: str, grads, budget: float, basis: str, rank=None):
        self.label, self.basis = label, basis
        self.rank = rank  # int, or a function of n
        self.budget = budget
        shared: dict = {}
        self.codecs = [self._codec(g, budget, shared) if g.dim() >= 2 else None for g in grads]

    def _codec(self, g, budget, shared):
        if self.basis == "exact":
            return shared.setdefault("exact", make_codec("svd", budget=budget, basis="exact"))
        rows, columns = matrix_shape(tuple(g.shape), "rows")
        rank = self.rank(min(rows, columns)) if callable(self.rank) else self.rank
        return shared.setdefault(rank, make_codec("svd", budget=budget, basis="warm", rank=rank))

    def with_budget(self, grads, budget: float) -> Config:
        return Config(self.label, grads, budget, self.basis, self.rank)


def warm_states(config: Config, grads_a) -> list:
    """Each layer's Q after encoding g_A (None for the exact route and 1-D tensors)."""
    gen = generator(1)
    return [
        None if c is None else c.encode_with_state(g, None, gen)[1] for c, g in zip(config.codecs, grads_a, strict=True)
    ]


def svd_states(config: Config, grads) -> list:
    """Each warm layer's top-r left singular vectors of its own gradient (the best r-dimensional subspace)."""
    states = []
    for codec, g in zip(config.codecs, grads, strict=True):
        y, _, r = (None, None, 0) if codec is None else codec.decomposition._view(g)  # Y: n x m, n <= m
        states.append(torch.linalg.svd(y.double(), full_matrices=False)[0][:, :r].to(y.dtype) if r else None)
    return states


def decomposed(config: Config, grads, states) -> list:
    """Per layer: (lam float64, bytes of each atom, header bytes), or None for a dense layer."""
    out = []
    gen = generator(2)
    for codec, g, state in zip(config.codecs, grads, states, strict=True):
        if codec is None:
            out.append(None)
            continue
        lam, parts, _ = codec.decomposition.decompose_with_state(g, state, gen)
        rows, columns = matrix_shape(tuple(g.shape), "rows")
        header = len(codec.encode(g, gen).header())
        r = codec.decomposition.warm_rank(rows, columns)
        top = torch.full((r if r else lam.numel(),), 4.0 * (1 + rows + columns), dtype=torch.float64)
        residual = torch.full((lam.numel() - top.numel(),), 4.0 * (2 + max(rows, columns)), dtype=torch.float64)
        out.append((lam.double().cpu(), torch.cat([top, residual]), header))
    return out


def expected(layers, grads, budget: float) -> tuple[float, float]:
    """(E[bytes], E||g^ - g||^2) at `budget` atoms per layer."""
    nbytes, variance = 0.0, 0.0
    for layer, g in zip(layers, grads, strict=True):
        if layer is None:
            nbytes += dense_nbytes(tuple(g.shape))
            continue
        lam, cost, header = layer
        p = atomic_probabilities(lam, budget)
        kept = p > 0
        nbytes += header + float((p * cost).sum())
        variance += float((lam[kept] ** 2 * (1 / p[kept] - 1)).sum())
    return nbytes, variance


def matched_budget(layers, grads, target_bytes: float) -> float:
    """The budget s whose expected bytes equal `target_bytes` (bisection in log s)."""
    low, high = 0.05, 512.0
    for _ in range(40):
        mid = math.sqrt(low * high)
        if expected(layers, grads, mid)[0] < target_bytes:
            low = mid
        else:
            high = mid
    return math.sqrt(low * high)


def encode_all(config: Config, grads, states, generator):
    """Every layer's message, as a worker's `LayerPolicy` encodes a model: the layers that share a codec
    together (`AtomicCodec.encode_many`: Algorithm 1 for all of them and one host copy of the sample, the
    small eigenproblems batched), 1-D tensors dense."""
    messages = [
        None if c is not None else atomo_core.make_codec("dense").encode(g)
        for c, g in zip(config.codecs, grads, strict=True)
    ]
    groups: dict[int, list[int]] = {}
    for i, codec in enumerate(config.codecs):
        if codec is not None:
            groups.setdefault(id(codec), []).append(i)
    for layers in groups.values():
        codec = config.codecs[layers[0]]
        encoded, _ = codec.encode_many([grads[i] for i in layers], [states[i] for i in layers], generator)
        for i, message in zip(layers, encoded, strict=True):
            messages[i] = message
    return messages


def monte_carlo(config: Config, grads, states, samples: int) -> tuple[float, float]:
    """(mean bytes, mean squared error) of `samples` real encodings."""
    gen = generator(3)
    sizes, errors = [], []
    for _ in range(samples):
        wires = [bytes(m) for m in encode_all(config, grads, states, gen)]
        sizes.append(sum(len(w) for w in wires))
        errors.append(
            sum(
                float((atomo_core.decode(w).to(DEVICE).double() - g.double()).pow(2).sum())
                for w, g in zip(wires, grads, strict=True)
            )
        )
    return statistics.mean(sizes), statistics.mean(errors)


def powersgd_row(rank: int, grads_a, grads_b, repeats: int) -> dict:
    codec = make_codec("powersgd", rank=rank)
    gen = generator(4)
    starts = [None if g.dim() < 2 else codec.compress(g.float(), None, gen)[1] for g in grads_a]

    def encode():
        return [
            None if g.dim() < 2 else codec.compress(g.float(), q, gen)[0] for g, q in zip(grads_b, starts, strict=True)
        ]

    encode()
    seconds = median_time(synchronized(encode), repeats)
    nbytes, error = 0, 0.0
    for g, sections in zip(grads_b, encode(), strict=True):
        if sections is None:
            nbytes += dense_nbytes(tuple(g.shape))
            continue
        message = codec._message(g, sections)
        nbytes += len(message)
        error += float((codec.decode_message(message).to(DEVICE).double() - g.double()).pow(2).sum())
    return {"encode_ms": 1e3 * seconds, "bytes": nbytes, "error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="the SGD step between the two gradients")
    parser.add_argument("--budget", type=float, default=3.0, help="the exact route's s")
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--fraction", type=int, default=8, help="also r = n / FRACTION per layer (0: not)")
    parser.add_argument("--svd-ranks", default="32,64", help="ranks also started from each layer's own SVD")
    parser.add_argument("--powersgd", default="1,2,4", help="PowerSGD ranks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10, help="Monte Carlo encodings for the variance check")
    parser.add_argument("--data", default="random", help="random (CIFAR-shaped noise) or fashion-mnist (real images)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--checkpoint", type=Path, help="start from a trained model: a run's checkpoint.pt or a state_dict"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    grads_a, grads_b, backward_s = two_gradients(
        args.model, args.batch, args.lr, args.data, args.repeats, args.checkpoint
    )
    norm2 = sum(float(g.double().pow(2).sum()) for g in grads_b)
    dense = sum(dense_nbytes(tuple(g.shape)) for g in grads_b)
    print(
        f"{args.model} on {args.data} data ({args.device}, {args.checkpoint or 'at initialization'}):\n"
        f"  dense {dense / 1e6:.2f} MB, backward (batch {args.batch}) {1e3 * backward_s:.1f} ms, {args.threads} threads"
    )

    exact = Config(f"exact s={args.budget:g}", grads_b, args.budget, "exact")
    configs = [(exact, [None] * len(grads_b))]
    for rank in [int(r) for r in args.ranks.split(",") if r]:
        configs.append((Config(f"warm r={rank}", grads_b, args.budget, "warm", rank), None))
    if args.fraction:
        fraction = args.fraction
        configs.append(
            (Config(f"warm r=n/{fraction}", grads_b, args.budget, "warm", lambda n: max(1, n // fraction)), None)
        )
    cold = Config("warm r=32 cold", grads_b, args.budget, "warm", 32)
    configs.append((cold, [None] * len(grads_b)))
    for rank in [int(r) for r in args.svd_ranks.split(",") if r]:
        ideal = Config(f"warm r={rank} from SVD", grads_b, args.budget, "warm", rank)
        configs.append((ideal, svd_states(ideal, grads_b)))

    exact_layers = decomposed(exact, grads_b, configs[0][1])
    target_bytes, exact_variance = expected(exact_layers, grads_b, args.budget)
    rows = {}
    exact_ms = None
    print(
        f"{'codec':<22} {'s':>6} {'encode ms':>10} {'x exact':>8} {'x bwd':>7} {'E[KB]':>8} {'rel var':>8} "
        f"{'x exact':>8} {'var x MB':>9} {'MC KB':>8} {'MC var':>8}"
    )
    for config, states in configs:
        if states is None:
            states = warm_states(config, grads_a)
        if config is exact:
            budget, layers = args.budget, exact_layers
        else:
            layers = decomposed(config, grads_b, states)
            budget = matched_budget(layers, grads_b, target_bytes)
            config = config.with_budget(grads_b, budget)
        nbytes, variance = expected(layers, grads_b, budget)
        gen = generator(5)
        encode_all(config, grads_b, states, gen)  # warm-up
        seconds = median_time(
            synchronized(lambda c=config, s=states, g=gen: encode_all(c, grads_b, s, g)), args.repeats
        )
        exact_ms = exact_ms or 1e3 * seconds
        mc_bytes, mc_error = monte_carlo(config, grads_b, states, args.samples) if args.samples else (math.nan,) * 2
        row = {
            "budget": budget,
            "encode_ms": 1e3 * seconds,
            "encode_over_exact": 1e3 * seconds / exact_ms,
            "encode_over_backward": seconds / backward_s,
            "expected_bytes": nbytes,
            "relative_variance": variance / norm2,
            "variance_over_exact": variance / exact_variance,
            "monte_carlo_bytes": mc_bytes,
            "monte_carlo_relative_variance": mc_error / norm2,
        }
        rows[config.label] = row
        print(
            f"{config.label:<22} {budget:>6.2f} {row['encode_ms']:>10.1f} {row['encode_over_exact']:>8.3f} "
            f"{row['encode_over_backward']:>7.2f} "
            f"{nbytes / 1e3:>8.1f} {row['relative_variance']:>8.3f} {row['variance_over_exact']:>8.3f} "
            f"{row['relative_variance'] * nbytes / 1e6:>9.3f} {mc_bytes / 1e3:>8.1f} "
            f"{row['monte_carlo_relative_variance']:>8.3f}"
        )
    print(
        f"\n{'powersgd (biased)':<18} {'encode ms':>10} {'x exact':>8} {'x bwd':>7} {'KB':>8} {'rel err':>8} "
        f"{'err x MB':>9}"
    )
    for rank in [int(r) for r in args.powersgd.split(",") if r]:
        r = powersgd_row(rank, grads_a, grads_b, args.repeats)
        r["encode_over_exact"] = r["encode_ms"] / exact_ms
        r["encode_over_backward"] = r["encode_ms"] / (1e3 * backward_s)
        r["relative_error"] = r["error"] / norm2
        rows[f"powersgd r={rank}"] = r
        print(
            f"{'powersgd r=' + str(rank):<18} {r['encode_ms']:>10.1f} {r['encode_over_exact']:>8.3f} "
            f"{r['encode_over_backward']:>7.2f} "
            f"{r['bytes'] / 1e3:>8.1f} {r['relative_error']:>8.3f} {r['relative_error'] * r['bytes'] / 1e6:>9.3f}"
        )
    report = {
        "model": args.model,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "data": args.data,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "backward_ms": 1e3 * backward_s,
        "dense_bytes": dense,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
