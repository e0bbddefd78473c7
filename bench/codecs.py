"""Codec costs on ResNet-18 / VGG-11-BN gradients of a random batch: encode/decode time, bytes, relative variance.

One backward pass (random CIFAR-shaped batch) of each model gives the gradients. Every codec encodes the
>= 2-D gradients (1-D ones go dense, as the default per-layer policy does). Figures are medians over
--repeats; encode time is compared with the backward time measured in the same run. Bytes (mean) and the
relative variance E||g^ - g||^2 / ||g||^2 over the whole model are estimated from --samples encodings.

    python bench/codecs.py [--models resnet18,vgg11_bn] [--batch 128] [--threads 2] [--device cuda] [--out FILE]

--device cuda measures on the GPU: the model, the batch, the gradients and the encoders run there (timings
synchronize the device), and the decoders add into gradient-shaped tensors on the GPU.

The quantizers run with each payload coding ("elias": on the host, Elias-coded where smaller; "fixed":
fixed-width fields packed on the gradients' device; their default "auto" is fixed on a GPU, elias on the
CPU). For every codec the rows also give, per encode of the whole model, the torch ops dispatched that are
not views (on a GPU each is about one kernel launch) and the reads of tensor values on the host (each a
host sync on a GPU; `.cpu()`/`.numpy()` of more than one value is a copy of data to the host), counted on
whatever device the run uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import median_time
from torch.utils._python_dispatch import TorchDispatchMode

import atomo_core
from atomo_core import atomic_probabilities, dense_nbytes, make_codec
from atomo_core.codecs import Codec
from atomo_core.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "codecs.json"


def codec_configs() -> list[tuple[str, Callable[[tuple[int, ...]], Codec]]]:
    """(label, shape -> codec). Entry-wise and Fourier budgets are a fraction of each layer's entries."""

    def fraction(name, rate, **params):
        return lambda shape: make_codec(name, budget=max(1.0, rate * torch.Size(shape).numel()), **params)

    def fixed(name, **params):
        return lambda shape: make_codec(name, **params)

    configs = [
        ("svd rows s=1", fixed("svd", budget=1, basis="exact")),
        ("svd rows s=3", fixed("svd", budget=3, basis="exact")),
        ("svd rows s=3 fp16", fixed("svd", budget=3, atom_dtype="float16", basis="exact")),
        ("svd paper s=3", fixed("svd", budget=3, reshape="paper", basis="exact")),
        # Stateless encode: every call is the warm route's first step (Q from Y Omega); bench/warm.py measures
        # the warm-started step at equal expected bytes.
        ("svd warm s=3 cold", fixed("svd", budget=3, basis="warm")),
        ("entrywise 1%", fraction("entrywise", 0.01)),
        ("entrywise 0.1%", fraction("entrywise", 0.001)),
        ("fourier 1%", fraction("fourier", 0.01)),
    ]
    quantizers = [
        ("qsgd", "qsgd 1 bit b=512 elias", {"bits": 1, "bucket_size": 512, "coding": "elias"}),
        ("qsgd", "qsgd 1 bit b=512 fixed", {"bits": 1, "bucket_size": 512, "coding": "fixed"}),
        ("qsgd", "qsgd 4 bits b=512 elias", {"bits": 4, "bucket_size": 512, "coding": "elias"}),
        ("qsgd", "qsgd 4 bits b=512 fixed", {"bits": 4, "bucket_size": 512, "coding": "fixed"}),
        ("terngrad", "terngrad", {}),
        ("lq", "lq q=2 elias", {"q": 2.0, "coding": "elias"}),
        ("lq", "lq q=2 fixed", {"q": 2.0, "coding": "fixed"}),
    ]
    configs += [(label, fixed(name, **p)) for name, label, p in quantizers if name in atomo_core.codec_names()]
    return configs


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` followed by waiting for the device, so that wall times include the GPU's work."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops dispatched (about one kernel each on a GPU) and the host reads of tensor
    values: `aten::_local_scalar_dense` (item, bool, int) and Tensor.cpu/numpy/tolist calls."""

    def __init__(self):
        super().__init__()
        self.ops = self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        elif not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


class HostReads(torch.overrides.TorchFunctionMode):
    """Tensor.cpu/numpy/tolist calls and the entries they read (on a CPU tensor they dispatch nothing)."""

    def __init__(self):
        super().__init__()
        self.calls = self.entries = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "numpy", "tolist") and args[0].device.type != "meta":
            self.calls += 1
            self.entries += args[0].numel()
        return func(*args, **(kwargs or {}))


def op_counts(fn: Callable[[], object]) -> dict:
    """Ops (non-view aten ops) and host reads of one call of `fn`."""
    with HostReads() as reads, OpCounter() as ops:
        fn()
    return {
        "ops": ops.ops,
        "scalar_reads": ops.scalar_reads,
        "host_copies": reads.calls,
        "host_copy_entries": reads.entries,
    }


def gradients(model_name: str, batch: int, device: torch.device) -> tuple[list[torch.Tensor], float, float]:
    """The model's gradients for one random batch, and the backward wall and CPU times (second of two passes)."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    x, y = torch.randn(batch, 3, 32, 32).to(device), torch.randint(0, 10, (batch,)).to(device)
    backward_s = backward_cpu_s = 0.0
    for _ in range(2):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        start, start_cpu = time.perf_counter(), time.process_time()
        synchronized(loss.backward, device)()
        backward_s, backward_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return [p.grad.detach().clone() for p in model.parameters()], backward_s, backward_cpu_s


def measure(grads, make: Callable[[tuple[int, ...]], Codec], repeats: int, samples: int) -> dict:
    codecs = [make(tuple(g.shape)) if g.dim() >= 2 else make_codec("dense") for g in grads]
    device = grads[0].device
    generator = torch.Generator(device=device).manual_seed(0)
    encode = synchronized(lambda: [c.encode(g, generator) for c, g in zip(codecs, grads, strict=True)], device)

    encode()  # warm-up: first calls initialize LAPACK/FFT plans and allocator pools
    encode_s = median_time(encode, repeats)
    encode_cpu_s = median_time(encode, repeats, cpu=True)
    wires = [bytes(m) for m in encode()]
    decode_s = median_time(lambda: [atomo_core.decode(w) for w in wires], repeats)
    outs = [torch.zeros_like(g) for g in grads]
    decode_add_s = median_time(synchronized(lambda: atomo_core.decode_add_(wires, outs), device), repeats)
    encode_counts = op_counts(encode)
    outs_counted = [torch.zeros_like(g) for g in grads]
    parsed = [atomo_core.wire.decode_message(w) for w in wires]  # the header parse on the host is not counted
    decode_counts = op_counts(
        lambda: [atomo_core.codecs.codec_for(m).decode_add_(m, o) for m, o in zip(parsed, outs_counted, strict=True)]
    )
    norm2 = sum(float(g.double().pow(2).sum()) for g in grads)
    errors, sizes = [], []
    for _ in range(samples):
        sample = [bytes(m) for m in encode()]
        sizes.append(sum(len(w) for w in sample))
        estimates = [atomo_core.decode(w) for w in sample]
        errors.append(
            sum(float((e.double() - g.double().cpu()).pow(2).sum()) for e, g in zip(estimates, grads, strict=True))
        )
    nbytes = statistics.mean(sizes)  # the number of atoms sent is random: its mean is the budget
    headers = sum(len(atomo_core.wire.decode_message(w).header()) for w in wires)
    expected = [
        dense_nbytes(tuple(g.shape)) if c.name == "dense" else c.expected_nbytes(tuple(g.shape))
        for c, g in zip(codecs, grads, strict=True)
    ]
    return {
        "encode_ms": 1e3 * encode_s,
        "encode_cpu_ms": 1e3 * encode_cpu_s,
        "decode_ms": 1e3 * decode_s,
        "decode_add_ms": 1e3 * decode_add_s,
        "bytes": nbytes,
        "bytes_min_max": [min(sizes), max(sizes)],
        "expected_bytes": None if None in expected else sum(expected),  # budget atoms per layer
        "header_fraction": headers / nbytes,
        "compression": sum(dense_nbytes(tuple(g.shape)) for g in grads) / nbytes,
        "relative_variance": statistics.mean(errors) / norm2,
        "relative_variance_se": (statistics.stdev(errors) / len(errors) ** 0.5 / norm2) if samples > 1 else None,
        "messages": len(grads),
        "encode_counts": encode_counts,
        "decode_add_counts": decode_counts,
    }


def _counts(c: dict) -> str:
    return f"{c['ops']}/{c['scalar_reads']}/{c['host_copies']}({c['host_copy_entries']})"


def fp16_rounding(grads) -> dict:
    """What float16 atoms do: with every atom kept (p = 1) the estimate is sum lam_i u~_i v~_i^T, exactly
    the gradient rebuilt from rounded atoms; its relative distance to the gradient is the bias that rounding
    introduces with respect to the true gradient."""
    matrices = [g for g in grads if g.dim() >= 2]
    error, norm2 = 0.0, 0.0
    for g in matrices:
        rows = g.shape[0]
        full = make_codec("svd", budget=min(rows, g[0].numel()), atom_dtype="float16", basis="exact")
        error += float((atomo_core.decode(full.encode(g)).double() - g.double()).pow(2).sum())
        norm2 += float(g.double().pow(2).sum())
    return {"relative_error_all_atoms_fp16": (error / norm2) ** 0.5}


def probabilities_timing(grads, repeats: int) -> dict:
    flat = torch.cat([g.reshape(-1) for g in grads])
    out = {"entries": flat.numel()}
    for label, budget in [("s=3", 3), ("s=1e-3 n", 1e-3 * flat.numel()), ("s=1e-2 n", 1e-2 * flat.numel())]:
        solve = synchronized(lambda b=budget: atomic_probabilities(flat, b), flat.device)
        out[label + " ms"] = 1e3 * median_time(solve, repeats)
        out[label + " cpu ms"] = 1e3 * median_time(solve, repeats, cpu=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg11_bn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=5, help="encodings per bytes and variance estimate")
    parser.add_argument("--codecs", default="", help="only the rows whose label starts with one of these (comma list)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"threads": args.threads, "batch": args.batch, "torch": torch.__version__, "device": name, "models": {}}
    for model_name in args.models.split(","):
        grads, backward_s, backward_cpu_s = gradients(model_name, args.batch, device)
        dense = sum(dense_nbytes(tuple(g.shape)) for g in grads)
        print(
            f"\n{model_name}: {len(grads)} tensors, {sum(g.numel() for g in grads):,} parameters, "
            f"dense {dense / 1e6:.2f} MB, "
            f"backward (batch {args.batch}) {1e3 * backward_s:.0f} ms wall, {1e3 * backward_cpu_s:.0f} ms CPU"
        )
        print(
            f"{'codec':<20} {'encode ms':>10} {'enc/bwd':>8} {'cpu e/b':>8} {'decode ms':>10} {'dec+add/bwd':>12} "
            f"{'KB':>9} {'E[KB]':>8} "
            f"{'ratio':>8} {'header':>7} {'rel var':>9} {'enc ops/reads/copies':>21} {'dec ops/reads/copies':>21}"
        )
        rows = {}
        prefixes = tuple(p for p in args.codecs.split(",") if p)
        for label, make in codec_configs():
            if prefixes and not label.startswith(prefixes):
                continue
            r = measure(grads, make, args.repeats, args.samples)
            r["encode_over_backward"] = r["encode_ms"] / (1e3 * backward_s)
            r["encode_over_backward_cpu"] = r["encode_cpu_ms"] / (1e3 * backward_cpu_s)
            r["decode_add_over_backward"] = r["decode_add_ms"] / (1e3 * backward_s)
            rows[label] = r
            print(
                f"{label:<20} {r['encode_ms']:>10.1f} {r['encode_over_backward']:>8.3f} "
                f"{r['encode_over_backward_cpu']:>8.3f} {r['decode_ms']:>10.1f} "
                f"{r['decode_add_over_backward']:>12.3f} {r['bytes'] / 1e3:>9.1f} "
                f"{(r['expected_bytes'] or float('nan')) / 1e3:>8.1f} {r['compression']:>8.1f} "
                f"{100 * r['header_fraction']:>6.2f}% {r['relative_variance']:>9.3g} "
                f"{_counts(r['encode_counts']):>21} {_counts(r['decode_add_counts']):>21}"
            )
        extra = {**fp16_rounding(grads), **{"probabilities": probabilities_timing(grads, args.repeats)}}
        print(f"fp16 atoms, all atoms kept: relative error {extra['relative_error_all_atoms_fp16']:.2e}")
        print(
            "Algorithm 1 on all",
            ", ".join(f"{k} {v:.1f}" if "ms" in k else f"{k} {v:,}" for k, v in extra["probabilities"].items()),
        )
        report["models"][model_name] = {
            "backward_ms": 1e3 * backward_s,
            "backward_cpu_ms": 1e3 * backward_cpu_s,
            "dense_bytes": dense,
            "codecs": rows,
            **extra,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
