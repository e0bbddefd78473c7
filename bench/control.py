"""The control service under polling load while a run trains.

A local PS and workers train one long run; `atomo serve` (a child process) follows it. Three phases of
equal length: quiet, loaded (CLIENTS concurrent clients, each sending one request every INTERVAL seconds,
alternating GET /v1/runs/{id} and GET /v1/runs), quiet again. Reported: request latency p50/p99 and
errors under load, and the training step time (the PS's per-step `step_s`, median) and steps per second
in the quiet phases against the loaded one, from the same run.

    python bench/control.py [--clients 200] [--interval 1.0] [--phase-s 20] [--workers 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from services.control.client import Client
from services.control.launchers import ControlProcess, LocalLauncher

TOKEN = "bench-token"
SPEC = {
    "name": "bench-control",
    "model": "mlp",
    "dataset": "digits",
    "steps": 10_000_000,
    "batch_size": 32,
    "eval_every": 1_000_000,
    "checkpoint_every": 1_000_000,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Connection:
    """One keep-alive HTTP/1.1 connection. The load generator shares the two cores with the service and the
    training it measures; httpx costs about as much CPU per request as the server, this about a tenth."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def get(self, path: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def poll(url: str, run_id: str, clients: int, interval: float, duration: float) -> dict:
    """`clients` concurrent pollers, each on its own keep-alive connection; latencies per route, errors."""
    host, port = url.removeprefix("http://").split(":")
    latencies: dict[str, list[float]] = {"GET /v1/runs/{id}": [], "GET /v1/runs": []}
    errors: list[str] = []

    async def client(i: int) -> None:
        await asyncio.sleep(interval * i / clients)  # spread the clients over one interval
        connection, end, n = Connection(host, int(port)), time.monotonic() + duration, i
        while time.monotonic() < end:
            route, path = ("GET /v1/runs/{id}", f"/v1/runs/{run_id}") if n % 2 == 0 else ("GET /v1/runs", "/v1/runs")
            start = time.perf_counter()
            try:
                status = await connection.get(path)
                if status != 200:
                    errors.append(f"{route}: {status}")
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{route}: {type(exc).__name__}")
                connection.close()
                connection = Connection(host, int(port))
            latencies[route].append(time.perf_counter() - start)
            n += 1
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))
        connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"latencies": latencies, "errors": errors}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_figures(records: list[dict], start: float, end: float) -> dict:
    """Median step time and steps per second over the records whose step ended in [start, end)."""
    window = [r for r in records if start <= r["time"] < end]
    return {
        "steps": len(window),
        "median_step_s": statistics.median(r["step_s"] for r in window),
        "steps_per_s": len(window) / (end - start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between one client's requests")
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--history", type=int, default=20, help="finished runs in the store (listing size)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, LocalLauncher(f"{tmp}/state", args.workers) as cluster:
        control = ControlProcess(f"{tmp}/control.db", cluster.control_endpoint, TOKEN, log_path=f"{tmp}/c.log")
        control.start()
        try:
            with Client(control.url, TOKEN) as api:
                run_id = api.submit(SPEC | {"workers": args.workers})["id"]
                while (api.run(run_id)["step"] or 0) < 20:  # past the first steps' warm-up
                    time.sleep(0.5)
                for i in range(args.history):  # queued behind the run, so cancelled at once
                    api.cancel(api.submit(SPEC | {"name": f"history-{i}"})["id"])
                t0 = time.time()
                time.sleep(args.phase_s)
                cpu0, own0 = cpu_seconds(control.proc.pid), time.process_time()
                t1 = time.time()
                load = asyncio.run(poll(control.url, run_id, args.clients, args.interval, args.phase_s))
                t2 = time.time()
                service_cpu, bench_cpu = cpu_seconds(control.proc.pid) - cpu0, time.process_time() - own0
                time.sleep(args.phase_s)
                t3 = time.time()
                api.cancel(run_id)
                records, since = [], -1
                while page := api.metrics(run_id, since, limit=10_000)["records"]:
                    records += page
                    since = page[-1]["step"]
        finally:
            control.stop()

    quiet = [step_figures(records, t0, t1), step_figures(records, t2, t3)]
    loaded = step_figures(records, t1, t2)
    quiet_step_s = statistics.mean(q["median_step_s"] for q in quiet)
    quiet_rate = statistics.mean(q["steps_per_s"] for q in quiet)
    requests = sum(len(v) for v in load["latencies"].values())
    results = {
        "clients": args.clients,
        "interval_s": args.interval,
        "phase_s": args.phase_s,
        "requests": requests,
        "requests_per_s": requests / (t2 - t1),
        "errors": len(load["errors"]),
        "service_cpu_ms_per_request": 1e3 * service_cpu / requests,
        "service_cores_used": service_cpu / (t2 - t1),
        "load_generator_cores_used": bench_cpu / (t2 - t1),
        "error_kinds": sorted(set(load["errors"]))[:10],
        "latency_ms": {
            route: {"p50": 1e3 * percentile(v, 0.50), "p99": 1e3 * percentile(v, 0.99), "n": len(v)}
            for route, v in load["latencies"].items()
        },
        "quiet": quiet,
        "loaded": loaded,
        "step_time_ratio_loaded_over_quiet": loaded["median_step_s"] / quiet_step_s,
        "steps_per_s_ratio_loaded_over_quiet": loaded["steps_per_s"] / quiet_rate,
    }
    everything = [x for v in load["latencies"].values() for x in v]
    print(f"control service: {args.clients} clients, one request each per {args.interval} s, {args.phase_s:.0f} s")
    print(f"  requests {requests} ({results['requests_per_s']:.0f}/s), errors {results['errors']}")
    print(
        f"  service CPU {results['service_cpu_ms_per_request']:.2f} ms per request "
        f"({results['service_cores_used']:.2f} cores); load generator {results['load_generator_cores_used']:.2f} cores"
    )
    for route, figures in results["latency_ms"].items():
        print(f"  {route:<20} p50 {figures['p50']:7.1f} ms   p99 {figures['p99']:7.1f} ms   (n={figures['n']})")
    p50, p99 = 1e3 * percentile(everything, 0.5), 1e3 * percentile(everything, 0.99)
    print(f"  {'all':<20} p50 {p50:7.1f} ms   p99 {p99:7.1f} ms")
    print("training (same run):")
    for label, f in [("quiet before", quiet[0]), ("loaded", loaded), ("quiet after", quiet[1])]:
        print(f"  {label:<13} median step {1e3 * f['median_step_s']:6.1f} ms   {f['steps_per_s']:5.2f} steps/s")
    print(
        f"  loaded / quiet: step time x{results['step_time_ratio_loaded_over_quiet']:.3f}, "
        f"steps per second x{results['steps_per_s_ratio_loaded_over_quiet']:.3f}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
