"""PS capacity: decoding and aggregating n workers' encoded gradients vs one worker's compute step.

One ResNet-18 forward and backward pass on a random CIFAR-shaped batch gives the gradient; each of the n
simulated workers encodes it with the run's per-layer policy and its own generator (wire bytes, as they
arrive at the PS). The PS's work per step is then timed exactly as the PS runs it
(`services.common.replica.Replica`): validate every message, decode it into the sums, check the sums are
finite, and the SGD step. Both are
measured in the same run; the figure of merit is aggregate time / compute time (target: <= 10%).

    python bench/ps_capacity.py [--workers 16] [--model resnet18] [--codec svd] [--budget 3] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from timing import median_time
from torch.nn import functional as F

from services.common.replica import Replica
from services.common.spec import CodecSpec, RunSpec
from services.worker.worker import DENSE_POLICY, gradient_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--codec", default="svd")
    parser.add_argument("--budget", type=float, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    codec = CodecSpec(name=args.codec, budget=args.budget if args.codec in ("svd", "entrywise", "fourier") else None)
    spec = RunSpec(model=args.model, codec=codec, workers=args.workers, batch_size=max(args.batch, args.workers))
    torch.manual_seed(0)
    worker = Replica(spec, 10, 3, torch.device("cpu"))
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(10, (args.batch,))

    def compute_step():
        worker.model.zero_grad(set_to_none=True)
        F.cross_entropy(worker.model(x), y).backward()

    compute_step()  # warm-up
    compute_s = median_time(compute_step, args.repeats)

    policy = gradient_policy(spec)
    grads = [p.grad for p in worker.params]
    buffers = [b.detach() for b in worker.buffers]
    encode_start = time.perf_counter()
    gradients = [
        [bytes(m) for m in policy.encode(grads, torch.Generator().manual_seed(i)) + DENSE_POLICY.encode(buffers)]
        for i in range(args.workers)
    ]
    encode_s = (time.perf_counter() - encode_start) / args.workers
    received = [[memoryview(frame) for frame in gradient] for gradient in gradients]

    ps = Replica(spec, 10, 3, torch.device("cpu"))
    decode_times: list[float] = []

    def aggregate():
        ps.begin_step()
        start = time.perf_counter()
        for frames in received:
            ps.accumulate(ps.parse_gradient(frames))
        assert ps.sums_finite()
        decode_times.append(time.perf_counter() - start)
        ps.finish_step(0.01)

    aggregate()  # warm-up
    decode_times.clear()
    aggregate_s = median_time(aggregate, args.repeats)
    decode_s = statistics.median(decode_times)
    dense_bytes = ps.dense_bytes
    message_bytes = statistics.mean(sum(len(f) for f in g) for g in gradients)
    result = {
        "model": args.model,
        "codec": codec.model_dump(exclude_none=True),
        "workers": args.workers,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "compute_step_s": compute_s,
        "encode_s_per_worker": encode_s,
        "decode_and_sum_s": decode_s,
        "aggregate_and_sgd_step_s": aggregate_s,
        "decode_s_per_worker": decode_s / args.workers,
        "bytes_per_gradient": message_bytes,
        "dense_bytes_per_gradient": dense_bytes,
        "ratio_aggregate_to_compute": aggregate_s / compute_s,
    }
    print(json.dumps(result, indent=2))
    print(
        f"{args.workers} workers' {args.model} {args.codec} gradients: decode+sum {decode_s * 1e3:.0f} ms, "
        f"with the SGD step {aggregate_s * 1e3:.0f} ms; one worker's batch-{args.batch} step {compute_s * 1e3:.0f} ms; "
        f"ratio {aggregate_s / compute_s:.1%} (target <= 10%)"
    )


if __name__ == "__main__":
    main()
