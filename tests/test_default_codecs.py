"""Defaults that converge: the default run (`atomo train`: LeNet-5 on digits, 300 steps, 2 workers) with every
built-in codec at its default parameters, and the README's REST example `codec.bits=2`, all in one
`atomo train --compare` (one PS and one pair of workers for every run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.common.spec import CODECS

pytestmark = pytest.mark.slow

# Measured with these defaults (seed 0): dense 0.947, svd 0.953, entrywise 0.950, fourier 0.943, qsgd, terngrad
# and lq all above 0.9; the biased baselines with error feedback, topk (k=300) 0.963 and powersgd (r=4) 0.970.
# A run that diverges fails; one that trains but learns little (entrywise at budget 100 stays at 0.10, chance
# on ten digits) is far below the bound, while 0.85 leaves room for a worse seed.
MIN_FINAL_ACCURACY = 0.85
ENTRIES = [*CODECS, "qsgd:bits=2"]


def test_every_builtin_codec_converges_at_its_defaults(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services", "train", "--compare", *ENTRIES, "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (comparison,) = (tmp_path / "runs").iterdir()
    summaries = {p.parent.name: json.loads(p.read_text()) for p in comparison.glob("*/summary.json")}
    assert len(summaries) == len(ENTRIES), sorted(summaries)
    for folder, summary in summaries.items():
        assert summary["state"] == "succeeded" and summary["step"] == 300, (folder, summary["error"])
        assert summary["test_accuracy"] > MIN_FINAL_ACCURACY, (folder, summary["test_accuracy"])
    assert {s["spec"]["codec"]["name"] for s in summaries.values()} == set(CODECS)


@pytest.mark.parametrize("seed", [1, 2])
def test_fourier_at_its_defaults_trains_at_other_seeds(tmp_path, seed):
    """Fourier's default budget was 300 until it diverged (loss 9e26) at seed 1 and stayed at chance at seed 2 of
    the default run; at its default now it trains at both (measured 95.7% and 96.0%)."""
    out = tmp_path / "runs"
    argv = [sys.executable, "-m", "services", "train", "--codec", "fourier", "--seed", str(seed), "--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (summary,) = (json.loads(p.read_text()) for p in out.glob("*/summary.json"))
    assert summary["spec"]["codec"]["budget"] == 600
    assert summary["state"] == "succeeded" and summary["test_accuracy"] > MIN_FINAL_ACCURACY, summary
