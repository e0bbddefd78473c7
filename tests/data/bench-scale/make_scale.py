"""Record tests/data/bench-scale/: real `atomo train` runs at 2, 3 and 4 workers, laid out as `atomo bench`'s
scale phase (case.json + metrics.jsonl per run), for the held-out test of services.bench.scale.

Loopback only (no namespaces). LeNet-5 on digits, batch 64, seed 0, lr 0.05, 40 steps: dense, svd s=3 and
qsgd b=4 with the `atoms` downlink and dense with the `model` downlink (so upload and download bytes vary
apart), at each worker count.

    flock /tmp/atomo-cpu.lock python tests/data/bench-scale/make_scale.py [RAW_DIR]

Run from the repository root; RAW_DIR (default /tmp/bench-scale-raw) keeps `atomo train`'s own folders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = ["--model", "lenet5", "--dataset", "digits", "--batch-size", "64", "--lr", "0.05", "--seed", "0"]
STEPS = 40
WORKERS = (2, 3, 4)
# (downlink, [(label, --compare entry)])
GROUPS = [
    ("atoms", [("dense", "dense"), ("svd s=3", "svd:budget=3"), ("qsgd b=4", "qsgd:bits=4")]),
    ("model", [("dense", "dense")]),
]


def main(raw: Path) -> None:
    shutil.rmtree(HERE / "runs", ignore_errors=True)
    for workers in WORKERS:
        for downlink, codecs in GROUPS:
            dest = raw / f"w{workers}-{downlink}"
            flags = ["--workers", str(workers), "--steps", str(STEPS), "--eval-every", str(STEPS)]
            flags += ["--downlink", downlink, "--out", str(dest), "--compare", *(entry for _, entry in codecs)]
            subprocess.run([sys.executable, "-m", "services", "train", *BASE, *flags], check=True)
            folder = max(dest.iterdir())  # the newest <stamp>-compare folder
            for label, entry in codecs:
                run = folder / entry.replace(":", "-").replace(",", "-").replace("=", "-")
                spec = json.loads((run / "spec.json").read_text())
                records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                suffix = "" if downlink == "atoms" else "-model"
                case_id = f"scale-w{workers}-{label.replace(' ', '-').replace('=', '')}{suffix}"
                case_dir = HERE / "runs" / case_id
                case_dir.mkdir(parents=True)
                shutil.copy(run / "metrics.jsonl", case_dir / "metrics.jsonl")
                case = {
                    "case_id": case_id,
                    "label": label,
                    "family": label.split()[0],
                    "biased": False,
                    "codec": spec["codec"],
                    "profile": "loopback",
                    "bandwidth_mbit": None,
                    "latency_ms": None,
                    "workers": workers,
                    "momentum": spec["momentum"],
                    "lr": spec["lr"],
                    "downlink": downlink,
                    "phase": "scale",
                    "steps": spec["steps"],
                    "state": "succeeded" if len(records) == spec["steps"] else "failed",
                    "error": None,
                    "wall_s": records[-1]["wall_s"] if records else None,
                }
                (case_dir / "case.json").write_text(json.dumps(case, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bench-scale-raw"))
