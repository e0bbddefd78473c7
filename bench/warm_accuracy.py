"""Does the warm spectral basis train as well as the exact one? `atomo train --compare` per seed, end to end.

For each seed, one `atomo train` run (a real PS and workers on loopback) per basis of svd s=3 (`exact`,
`warm`), same spec otherwise; the final test accuracies are collected and compared: per-basis median and
range, the mean difference warm - exact over the paired seeds and its standard error (the seeds' spread of
the paired differences). "Same within noise": |mean difference| <= 2 standard errors.

    python bench/warm_accuracy.py [--model resnet18] [--dataset digits] [--seeds 0,1,2] [--steps 150]
        [--batch-size 16] [--lr 0.05] [--out bench/results/warm_accuracy]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASES = ("exact", "warm")


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Final test accuracy of each basis at this seed (one `atomo train --compare` run)."""
    out = args.out / f"seed{seed}"
    command = [
        sys.executable, "-m", "services", "train",
        "--model", args.model, "--dataset", args.dataset, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed),
        "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps), "--out", str(out),
        "--compare", *(f"svd:budget={args.budget:g},basis={basis}" for basis in BASES),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    accuracies = {}
    for summary in sorted(out.glob("*/*/summary.json")):
        record = json.loads(summary.read_text())
        if record["state"] != "succeeded":
            raise SystemExit(f"{summary}: run {record['state']}: {record.get('error')}")
        accuracies[record["spec"]["codec"]["basis"]] = record["test_accuracy"]
    if set(accuracies) != set(BASES):
        raise SystemExit(f"{out}: expected one run per basis {BASES}, found {sorted(accuracies)}")
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_accuracy"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.model} on {args.dataset}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}, "
          f"svd s={args.budget:g}, bases {', '.join(BASES)}, seeds {seeds}", flush=True)  # fmt: skip
    results, start = {}, time.perf_counter()
    for i, seed in enumerate(seeds):
        results[seed] = run_seed(args, seed)
        elapsed = time.perf_counter() - start
        eta = elapsed / (i + 1) * (len(seeds) - i - 1)
        line = "  ".join(f"{b} {results[seed][b]:.4f}" for b in BASES)
        print(f"seed {seed}: {line}   ({elapsed:.0f} s, about {eta:.0f} s left)", flush=True)
    print()
    for basis in BASES:
        values = [results[s][basis] for s in seeds]
        print(f"{basis:6s} median {statistics.median(values):.4f}  range {min(values):.4f}..{max(values):.4f}")
    differences = [results[s]["warm"] - results[s]["exact"] for s in seeds]
    mean = statistics.fmean(differences)
    stderr = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.inf
    verdict = "same within noise" if abs(mean) <= 2 * stderr else "DIFFERENT beyond noise"
    print(f"warm - exact: mean {mean:+.4f}, standard error {stderr:.4f} over {len(seeds)} paired seeds: {verdict}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": results, "difference_mean": mean,
              "difference_stderr": stderr, "verdict": verdict}  # fmt: skip
    (args.out / "warm_accuracy.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
