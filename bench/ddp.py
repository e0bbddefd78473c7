"""DDP gradient exchange: allreduce, PyTorch's PowerSGD hook and the ATOMO hook on the same training run.

Every method trains LeNet-5 on the digits set (the same initial weights, shards, batches and seed) with 2 or
more ranks over gloo, first on loopback, then with every rank in its own network namespace behind a
rate-limited link (services.bench.netem; skipped, with the reason, where it cannot run). Per method:

- bytes/step: what one rank contributes to the exchange per compressed step. Allreduce: its dense fp32
  gradients. PowerSGD: 4 bytes x the elements it allreduces (P and Q, plus the tensors it leaves
  uncompressed), read from its own counter `total_numel_after_compression`. ATOMO: the exact length of the
  rank's encoded messages (`AtomoHookState.last_step_bytes`). On the wire an allreduce (ring) sends about
  2 (n-1)/n times this per rank, an all-gather (n-1) times the largest rank's buffer.
- step ms: median wall time of a training step (forward, backward and exchange, optimizer) on rank 0.
- encode ms: ATOMO's encoding per step; sync ms: its synchronous fingerprint exchange per step. PowerSGD's
  compression runs inside its collectives' callbacks and is not separated (-).
- accuracy: test accuracy after --steps steps; time to target: training time (evaluations excluded) until
  the test accuracy, evaluated every --eval-every steps, first reaches --target.

The compressed methods all start after --start-step steps of allreduce (PowerSGD's start_powerSGD_iter,
ATOMO's start_step). One run per method and link: the ratios between rows come from the same run.

    python bench/ddp.py [--world 2] [--steps 300] [--link edge] [--out FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ddp.json"
PORT = 29531

# (label, kind, options): kind "allreduce", "powersgd" (options: rank) or a codec name (options: its params)
METHODS = [
    ("allreduce", "allreduce", {}),
    ("PowerSGD rank 1", "powersgd", {"rank": 1}),
    ("PowerSGD rank 2", "powersgd", {"rank": 2}),
    ("PowerSGD rank 4", "powersgd", {"rank": 4}),
    ("ATOMO svd s=1", "svd", {"budget": 1}),
    ("ATOMO svd s=2", "svd", {"budget": 2}),
    ("ATOMO svd s=3", "svd", {"budget": 3}),
    ("ATOMO svd s=4", "svd", {"budget": 4}),
    ("QSGD 4 bits", "qsgd", {"bits": 4}),
]


# -- one rank ----------------------------------------------------------------------------------------------------


def rank_main(config: dict) -> None:
    """One rank's training run (a process started by `run_method`); rank 0 writes the results to config['out']."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel

    from atomo_core import make_codec
    from atomo_core.data import BatchStream, load_dataset
    from atomo_core.ddp import AtomoHookState, atomo_hook
    from atomo_core.models import LeNet5

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, test, info = load_dataset("digits")
    torch.manual_seed(config["seed"])
    model = LeNet5(num_classes=info.num_classes, in_channels=info.in_channels)
    ddp = DistributedDataParallel(model)
    kind, options, start = config["kind"], config["options"], config["start_step"]
    state = None
    if kind == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            None, matrix_approximation_rank=options["rank"], start_powerSGD_iter=start, random_seed=config["seed"]
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif kind != "allreduce":
        state = AtomoHookState(make_codec(kind, **options), seed=config["seed"], start_step=start)
        ddp.register_comm_hook(state, atomo_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    batches = BatchStream(train, rank, world, config["batch"], seed=config["seed"])
    dense = sum(4 * p.numel() for p in model.parameters())

    step_s, trained_s, reached, accuracy = [], 0.0, None, 0.0
    for step in range(1, config["steps"] + 1):
        x, y = next(batches)
        begin = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        elapsed = time.perf_counter() - begin
        trained_s += elapsed
        if step > start:
            step_s.append(elapsed)
        if step % config["eval_every"] == 0 or step == config["steps"]:
            with torch.no_grad():
                accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
            if reached is None and accuracy >= config["target"]:
                reached = {"step": step, "seconds": trained_s}
    compressed = config["steps"] - start
    if kind == "allreduce":
        nbytes, encode_ms, sync_ms = dense, None, None
    elif kind == "powersgd":
        nbytes, encode_ms, sync_ms = 4 * state.total_numel_after_compression / compressed, None, None
    else:  # the ATOMO counters also hold the allreduce steps' bytes: count the compressed steps only
        nbytes = (state.bytes_sent - start * dense) / compressed
        encode_ms, sync_ms = 1e3 * state.encode_seconds / compressed, 1e3 * state.sync_seconds / compressed
    if rank == 0:
        result = {
            "bytes_per_step": nbytes,
            "dense_bytes": dense,
            "step_ms": 1e3 * statistics.median(step_s),
            "encode_ms": encode_ms,
            "sync_ms": sync_ms,
            "accuracy": accuracy,
            "reached": reached,
        }
        Path(config["out"]).write_text(json.dumps(result))
    dist.destroy_process_group()


# -- the driver --------------------------------------------------------------------------------------------------


def run_method(kind: str, options: dict, args, network=None, timeout_s: float = 300) -> dict:
    """Start args.world ranks of one method (in the network's namespaces if given); rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        config = {
            "kind": kind,
            "options": options,
            "seed": args.seed,
            "steps": args.steps,
            "start_step": args.start_step,
            "batch": args.batch,
            "lr": args.lr,
            "eval_every": args.eval_every,
            "target": args.target,
            "out": str(out),
        }
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "WORLD_SIZE": str(args.world),
            "MASTER_ADDR": network.address("r0") if network else "127.0.0.1",
            "MASTER_PORT": str(PORT),
            "OMP_NUM_THREADS": "1",
        }
        if network is not None:
            env["GLOO_SOCKET_IFNAME"] = network.interface("r0")
        processes = []
        for rank in range(args.world):
            argv = [sys.executable, str(Path(__file__).resolve()), "--rank-config", json.dumps(config)]
            if network is not None:
                argv = network.command(f"r{rank}", argv)
            processes.append(subprocess.Popen(argv, env={**env, "RANK": str(rank)}))
        try:
            codes = [p.wait(timeout=timeout_s) for p in processes]
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes):
            raise RuntimeError(f"{kind} {options}: ranks exited with {codes}")
        return json.loads(out.read_text())


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict, links: list[str], target: float) -> str:
    """The markdown table: one row per method, the link-dependent columns once per link."""
    head = ["method", "bytes/step", "x less", "encode ms", "sync ms", "accuracy"]
    for link in links:
        head += [f"step ms ({link})", f"s to {target:.0%} ({link})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, per_link in results.items():
        first = per_link[links[0]]
        row = [
            label,
            f"{first['bytes_per_step']:,.0f}",
            f"{first['dense_bytes'] / first['bytes_per_step']:.1f}",
            fmt(first["encode_ms"], ".2f"),
            fmt(first["sync_ms"], ".2f"),
            f"{first['accuracy']:.3f}",
        ]
        for link in links:
            r = per_link[link]
            reached = r["reached"]
            row += [
                f"{r['step_ms']:.1f}",
                f"{reached['seconds']:.2f} ({reached['step']})" if reached else "not reached",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (each one CPU thread)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--start-step", type=int, default=10, help="allreduce steps before compressing")
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy for the time-to-target column")
    parser.add_argument("--link", default="edge", help="a services.bench.netem profile, or 'none' (loopback only)")
    parser.add_argument("--methods", default="", help="only the methods whose label starts with one of these")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rank-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_config:
        rank_main(json.loads(args.rank_config))
        return 0

    links = ["loopback"]
    network_reason = None
    if args.link != "none":
        sys.path.insert(0, str(ROOT))
        from services.bench.netem import PROFILES, Network

        if args.link not in PROFILES:
            parser.error(f"--link must be one of {', '.join(PROFILES)} or none, got {args.link!r}")
        network_reason = Network.check()
        if network_reason is None:
            profile = PROFILES[args.link]
            links.append(args.link)
            latency = "" if Network.latency_unavailable() is None else " (no added latency: the kernel lacks netem)"
            print(f"emulated link {args.link}: {profile.bandwidth_mbit} Mbit/s, {profile.latency_ms} ms{latency}")
        else:
            print(f"no emulated link: {network_reason}")
    prefixes = tuple(p for p in args.methods.split(",") if p)
    methods = [m for m in METHODS if not prefixes or m[0].startswith(prefixes)]
    results = {label: {} for label, _, _ in methods}
    total, done, begin = len(methods) * len(links), 0, time.perf_counter()
    for link in links:
        network = None
        if link != "loopback":
            network = Network([f"r{r}" for r in range(args.world)], PROFILES[link], name="atomo-ddp").start()
        try:
            for label, kind, options in methods:
                r = run_method(kind, options, args, network)
                results[label][link] = r
                done += 1
                print(
                    f"[{done}/{total} {time.perf_counter() - begin:.0f} s] {label} on {link}: "
                    f"{r['bytes_per_step']:,.0f} B/step, {r['step_ms']:.1f} ms/step, accuracy {r['accuracy']:.3f}",
                    flush=True,
                )
        finally:
            if network is not None:
                network.close()
    print(f"\n{args.world} ranks, LeNet-5 on digits, {args.steps} steps, batch {args.batch} per rank\n")
    print(table(results, links, args.target))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "network": network_reason, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
