"""Plugin codecs: the Haar codec of docs/custom-decomposition.md, packaged as that page says (its pyproject.toml
and module, installed with pip), then used by name in `atomo train` and over REST on real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import atomo_core
from atomo_core import codecs as codecs_module
from services.common import spec as spec_module
from services.common.spec import CodecSpec, RunSpec
from services.control.client import ApiError, Client
from services.control.launchers import ControlProcess, LocalLauncher

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-decomposition.md"
TOKEN = "plugin-token-0123456789"
FINAL = ("succeeded", "failed", "cancelled")
# A few quick steps of the MLP on digits: the plugin's messages cross the real wire and are decoded by the PS.
TINY = {"model": "mlp", "workers": 2, "batch_size": 32, "steps": 6, "eval_every": 3, "checkpoint_every": 3}


def doc_block(language: str) -> str:
    """The first fenced block of `language` in the documentation page."""
    return re.search(rf"```{language}\n(.*?)```", DOC.read_text(), re.S).group(1)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The documented package (pyproject.toml and atomo_haar.py from the page) installed into a folder."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "atomo-haar"
    package.mkdir()
    (package / "pyproject.toml").write_text(doc_block("toml"))
    (package / "atomo_haar.py").write_text(doc_block("python"))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--target", str(site), str(package)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (site / "atomo_haar.py").exists()
    return site


@pytest.fixture
def plugin_env(plugin_site, monkeypatch) -> Path:
    """The plugin visible to this process (sys.path) and to every process it starts (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")])))
    return plugin_site


def test_the_group_name_has_one_value():
    assert spec_module.PLUGIN_GROUP == atomo_core.PLUGIN_GROUP == "atomo.codecs"


def test_an_unknown_codec_is_refused_listing_builtins_and_plugins(plugin_env):
    with pytest.raises(ValueError) as error:
        CodecSpec(name="wavelet9")
    message = str(error.value)
    assert "unknown codec 'wavelet9'" in message and "svd" in message and "plugin codecs: haar" in message
    with pytest.raises(ValueError, match="unknown codec 'wavelet9'.*installed plugin codecs: haar"):
        atomo_core.make_codec("wavelet9")


def test_an_installed_plugin_validates_by_name_and_its_params_are_bounded(plugin_env):
    codec = CodecSpec(name="haar", params="budget=8,label=x")  # the command-line form
    assert codec.codec_params() == {"budget": 8, "label": "x"}
    assert RunSpec.model_validate_json(RunSpec(codec=codec).model_dump_json()).codec == codec  # round trip
    too_many = {f"p{i}": i for i in range(spec_module.MAX_PLUGIN_PARAMS + 1)}
    for bad in (too_many, {"budget": float("nan")}, {"1x": 1}, {"x" * 33: 1}, {"v": "y" * 257}, {"v": [1]}):
        with pytest.raises(ValueError, match="params"):
            CodecSpec(name="haar", params=bad)
    with pytest.raises(ValueError, match="takes its parameters in codec.params"):
        CodecSpec(name="haar", budget=8)
    with pytest.raises(ValueError, match="takes no params"):
        CodecSpec(name="svd", params={"budget": 8})


def test_the_plugin_loads_by_name_and_decodes_from_the_bytes(plugin_env):
    codec = atomo_core.make_codec("haar", budget=8)
    assert type(codec).codec_id == 200 and "haar" in atomo_core.codec_names()
    gradient = torch.randn(6, 5)  # 30 entries: not a power of two
    estimate = atomo_core.decode(bytes(codec.encode(gradient, torch.Generator().manual_seed(0))))
    assert estimate.shape == gradient.shape and torch.isfinite(estimate).all()
    full = atomo_core.make_codec("haar", budget=1e9)  # every atom kept: the exact gradient comes back
    assert torch.allclose(atomo_core.decode(bytes(full.encode(gradient))), gradient, atol=1e-5)


def test_broken_plugins_are_named_in_the_error(tmp_path, monkeypatch):
    """A plugin that fails to import, one that is not a codec, and one with a reserved id."""
    (tmp_path / "atomo_bad.py").write_text(
        "from atomo_core.codecs import DenseCodec\n"
        "class LowId(DenseCodec):\n    name = 'lowid'\n    codec_id = 7\n"
        "NotACodec = object\n"
    )
    info = tmp_path / "atomo_bad-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: atomo-bad\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[atomo.codecs]\nmissing = atomo_no_such_module:Codec\n"
        "notcodec = atomo_bad:NotACodec\nlowid = atomo_bad:LowId\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"missing", "notcodec", "lowid"} <= set(atomo_core.plugin_codec_names())
    with pytest.raises(ValueError, match=r"plugin codec 'missing' \(atomo_no_such_module:Codec\) failed to load"):
        atomo_core.make_codec("missing")
    with pytest.raises(ValueError, match="'notcodec'.*is not a Codec subclass"):
        atomo_core.make_codec("notcodec")
    with pytest.raises(ValueError, match=r"'lowid'.*codec id 7 is not in 128\.\.255"):
        atomo_core.make_codec("lowid")
    assert "lowid" not in atomo_core.codec_names()
    monkeypatch.setattr(codecs_module, "_plugins_scanned", False)
    monkeypatch.setattr(codecs_module, "_plugin_errors", {})
    message = atomo_core.Message(250, (3,), torch.float32, (), [torch.zeros(3)])
    with pytest.raises(atomo_core.WireFormatError, match="unknown codec id 250.*'missing'"):
        atomo_core.decode(bytes(message))


@pytest.mark.slow
def test_atomo_train_runs_the_plugin_codec(plugin_env, tmp_path):
    args = ["--model", "mlp", "--steps", "6", "--eval-every", "3", "--checkpoint-every", "3", "--batch-size", "32"]
    result = subprocess.run(
        [sys.executable, "-m", "services", "train", "--codec", "haar", "--params", "budget=8", *args]
        + ["--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["codec"]["name"] == "haar" and spec["codec"]["params"] == {"budget": 8}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["state"] == "succeeded", summary
    assert "codec haar (budget=8)" in result.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "services", "train", "--codec", "haar9", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 2 and "unknown codec 'haar9'" in wrong.stderr and "plugin codecs: haar" in wrong.stderr


@pytest.mark.slow
def test_a_rest_run_with_the_plugin_codec_succeeds(plugin_env, tmp_path):
    with LocalLauncher(tmp_path / "cluster", workers=2, threads=1, metrics=False) as cluster:
        control = ControlProcess(
            tmp_path / "control.db", cluster.control_endpoint, TOKEN, extra_args=("--poll-interval", "0.2")
        ).start()
        try:
            with Client(control.url, TOKEN) as api:
                with pytest.raises(ApiError) as unknown:
                    api.submit(TINY | {"codec": {"name": "haar9"}})
                assert unknown.value.status == 422 and unknown.value.details[0]["field"] == "codec.name"
                assert "plugin codecs: haar" in unknown.value.details[0]["message"]
                run = api.submit(TINY | {"codec": {"name": "haar", "params": {"budget": 8}}})
                deadline = time.monotonic() + 120
                while run["state"] not in FINAL:
                    assert time.monotonic() < deadline, run
                    time.sleep(0.3)
                    run = api.run(run["id"])
            assert run["state"] == "succeeded", run
            assert run["step"] == 6 and run["compression_ratio"] > 1
            assert run["spec"]["codec"]["params"] == {"budget": 8}
        finally:
            control.stop()
