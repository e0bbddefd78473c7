"""Record tests/data/bench-sample/: real `atomo train` runs arranged as `atomo bench` lays out its results.

Loopback only (no namespaces): every case's profile is "loopback". LeNet-5 on digits, 2 workers, batch 64,
seed 0: the main runs (momentum 0.9, 60 steps, an evaluation every 20), momentum-off runs, a timing run,
3-worker scale runs and model-downlink runs (30 steps each), then the gradient study in quick mode.

    flock /tmp/atomo-cpu.lock python tests/data/bench-sample/make_sample.py [RAW_DIR] [--study-only]

--study-only reruns only the gradient study (gradients.json). RAW_DIR (default /tmp/bench-sample-raw)
keeps `atomo train`'s own folders; only the files the report reads are copied here. Run from the repository root.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for services.bench
BASE = ["--model", "lenet5", "--dataset", "digits", "--batch-size", "64", "--lr", "0.05", "--seed", "0"]
# (phase, extra flags, [(label, --compare entry)])
GROUPS = [
    (
        "main",
        ["--workers", "2", "--steps", "60", "--eval-every", "20"],
        [
            ("dense", "dense"),
            ("qsgd b=4", "qsgd:bits=4"),
            ("svd s=3", "svd:budget=3"),
            ("svd s=3 paper", "svd:budget=3,reshape=paper"),
        ],
    ),
    (
        "momentum_off",
        ["--workers", "2", "--steps", "60", "--eval-every", "20", "--momentum", "0"],
        [("dense", "dense"), ("svd s=3", "svd:budget=3")],
    ),
    ("timing", ["--workers", "2", "--steps", "30", "--eval-every", "30"], [("qsgd b=4", "qsgd:bits=4")]),
    (
        "scale",
        ["--workers", "3", "--steps", "30", "--eval-every", "30"],
        [("dense", "dense"), ("svd s=3", "svd:budget=3"), ("qsgd b=4", "qsgd:bits=4")],
    ),
    (
        "downlink",
        ["--workers", "2", "--steps", "30", "--eval-every", "30", "--downlink", "model"],
        [("dense", "dense"), ("svd s=3", "svd:budget=3")],
    ),
]
KEEP = ("spec.json", "metrics.jsonl")  # summary.json is left out: the report does not read it


def family(label: str) -> str:
    return label.split()[0]


def main(raw: Path, study_only: bool) -> None:
    out = HERE
    if study_only:
        from services.bench.gradients import run_study

        run_study(out, quick=True)
        return
    shutil.rmtree(out / "runs", ignore_errors=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    phases: dict[str, float] = {}
    for phase, flags, codecs in GROUPS:
        t0 = time.monotonic()
        dest = raw / phase
        argv = [sys.executable, "-m", "services", "train", *BASE, *flags, "--out", str(dest), "--compare"]
        subprocess.run([*argv, *(entry for _, entry in codecs)], check=True)
        folder = max(dest.iterdir())  # the newest <stamp>-compare folder
        for label, entry in codecs:
            run = folder / entry.replace(":", "-").replace(",", "-").replace("=", "-")
            spec = json.loads((run / "spec.json").read_text())
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            case_id = f"{phase}-{label.replace(' ', '-').replace('=', '')}"
            case_dir = out / "runs" / case_id
            case_dir.mkdir(parents=True)
            for name in KEEP:
                if (run / name).exists():
                    shutil.copy(run / name, case_dir / name)
            case = {
                "case_id": case_id,
                "label": label,
                "family": family(label),
                "biased": False,
                "codec": spec["codec"],
                "profile": "loopback",
                "bandwidth_mbit": None,
                "latency_ms": None,
                "workers": spec["workers"],
                "momentum": spec["momentum"],
                "lr": spec["lr"],
                "downlink": spec["downlink"],
                "phase": phase,
                "steps": spec["steps"],
                "state": "succeeded" if len(records) == spec["steps"] else "failed",
                "error": None,
                "wall_s": records[-1]["wall_s"] if records else None,
            }
            (case_dir / "case.json").write_text(json.dumps(case, indent=2) + "\n")
        phases[phase] = round(time.monotonic() - t0, 1)
    import torch
    import zmq

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    bench = {
        "command": "python tests/data/bench-sample/make_sample.py",
        "argv": sys.argv,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": __import__("os").cpu_count(),
            "memory_gib": None,
            "os": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyzmq": zmq.__version__,
            "git_commit": commit,
        },
        "network": {
            "emulated": False,
            "reason": "the recorded test sample runs over loopback (no namespaces)",
            "profiles": {},
        },
        "headline_profile": "loopback",
        "model": "lenet5",
        "dataset": "digits",
        "workers": 2,
        "targets": [0.4, 0.6, 0.8],
        "regime": {
            "dense_comm_share": {},
            "paper_comm_share": None,
            "how": "not chosen: a loopback sample for the report's tests",
        },
        "lr_rule": "fixed lr 0.05 (no tuning in the sample)",
        "lrs": {},
        "phases": phases,
        "quick": True,
    }
    (out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    t0 = time.monotonic()
    from services.bench.gradients import run_study

    run_study(out, quick=True)
    bench["phases"]["gradients"] = round(time.monotonic() - t0, 1)
    bench["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--study-only"]
    main(Path(args[0]) if args else Path("/tmp/bench-sample-raw"), "--study-only" in sys.argv)
