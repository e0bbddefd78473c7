"""The README's Python blocks run as pasted: the library snippet, and the checkpoint example in the results
folder of a real (short) `atomo train` run."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """The results folder of the default run cut to 3 steps (the README's checkpoint example loads its file)."""
    out = tmp_path_factory.mktemp("readme") / "runs"
    quick = ["--steps", "3", "--eval-every", "3", "--checkpoint-every", "3", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "services", "train", *quick],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (folder,) = out.iterdir()
    return folder


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(BLOCKS) == 2
    assert sorted("checkpoint.pt" in block for block in BLOCKS) == [False, True]  # one loads the checkpoint
    assert any("LayerPolicy" in block for block in BLOCKS)  # the other is the library snippet


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_python_block_runs_as_pasted(index, run_folder, monkeypatch):
    monkeypatch.chdir(run_folder)
    printed = io.StringIO()
    namespace: dict = {"__name__": f"readme_block_{index}"}
    with contextlib.redirect_stdout(printed):
        exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    if "checkpoint.pt" in BLOCKS[index]:
        assert printed.getvalue().startswith("step 3: test accuracy 0."), printed.getvalue()
    else:  # the library snippet: an estimate per layer; 1-D tensors go dense, so theirs is the gradient itself
        params = list(namespace["model"].parameters())
        assert [s.shape for s in namespace["sums"]] == [p.shape for p in params]
        assert all(bool(s.isfinite().all()) for s in namespace["sums"])
        assert all(torch.equal(s, p.grad) for s, p in zip(namespace["sums"], params, strict=True) if p.dim() == 1)
