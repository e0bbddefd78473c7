"""What a new user meets first, run as they run it: the `atomo` command in a fresh process, in a folder that is
a git repository, the README's example spec, a data set that needs the `vision` extra, `atomo codecs`, and the
events of a run whose PS was killed and restarted under `atomo up`, read over real HTTP."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from helpers import wait_until

from atomo_core.data import torchvision_problem
from services.common.folders import GITIGNORE, RESULTS_DIR, make_default_folder
from services.common.launch import free_port
from services.common.spec import RunSpec
from services.control.client import Client
from services.control.launchers import ControlProcess

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "spec.yaml"
QUICK = ["--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--batch-size", "32"]
VISION_INSTALL = "pip install -e '.[vision]'"
FINAL = ("succeeded", "failed", "cancelled")
needs_no_torchvision = pytest.mark.skipif(
    torchvision_problem() is None, reason="checks the refusal where torchvision does not import"
)


def atomo_command() -> list[str]:
    """The installed `atomo` script, as a user types it (python -m services where it is not installed)."""
    script = shutil.which("atomo")
    return [script] if script else [sys.executable, "-m", "services"]


def env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ATOMO_")}, "PYTHONUNBUFFERED": "1"}


def atomo(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*atomo_command(), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


def git_repository(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def untracked(repo: Path) -> str:
    """`git status --porcelain` of everything, ignored files left out: empty when git would commit nothing."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_version_names_atomo_python_torch_and_torchvision(tmp_path):
    result = atomo("--version", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    line = result.stdout.strip()
    assert line.startswith(f"atomo {version} (python {sys.version.split()[0]}, torch {torch.__version__}, ")
    try:
        expected = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        expected = "not installed"
    assert line.endswith(f"torchvision {expected})")


@needs_no_torchvision
def test_atomo_train_refuses_a_vision_data_set_naming_the_extra(tmp_path):
    spec = tmp_path / "svhn.yaml"
    spec.write_text("dataset: svhn\nmodel: lenet5\n")
    for args, name in ((["--dataset", "cifar10"], "cifar10"), ([str(spec)], "svhn")):
        result = atomo("train", *args, "--out", "runs", cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "dataset" in result.stderr and f"{name} needs torchvision" in result.stderr
        assert VISION_INSTALL in result.stderr
        assert not (tmp_path / "runs").exists()  # refused before any folder or process


@needs_no_torchvision
def test_rest_submission_refuses_a_vision_data_set_naming_the_extra(tmp_path):
    token = "newcomer-token-0123456789"
    control = ControlProcess(
        tmp_path / "control.db", f"tcp://127.0.0.1:{free_port()}", token, log_path=tmp_path / "control.log"
    ).start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        response = httpx.post(f"{control.url}/v1/runs", json={"dataset": "mnist"}, headers=headers, timeout=30)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert [d["field"] for d in error["details"]] == ["dataset"]
        assert "mnist needs torchvision" in error["details"][0]["message"]
        assert VISION_INSTALL in error["details"][0]["message"]
        assert httpx.get(f"{control.url}/v1/runs", headers=headers, timeout=30).json()["runs"] == []  # nothing queued

        result = subprocess.run(
            [*atomo_command(), "submit", "--dataset", "cifar100", "--url", control.url],
            env={**env(), "ATOMO_API_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "(422 " in result.stderr, result.stderr
        assert re.search(r"^  dataset: .*cifar100 needs torchvision", result.stderr, re.MULTILINE), result.stderr
        assert VISION_INSTALL in result.stderr
    finally:
        control.stop()


def test_the_readme_example_spec_trains_and_the_results_stay_out_of_git(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "atomo train examples/spec.yaml --steps 1000" in readme and "atomo submit examples/spec.yaml" in readme
    assert RunSpec.model_validate(yaml.safe_load(EXAMPLE.read_text())) == RunSpec()  # the default run, written out

    repo = git_repository(tmp_path / "project")
    (repo / "examples").mkdir()
    shutil.copy(EXAMPLE, repo / "examples" / "spec.yaml")
    subprocess.run(["git", "add", "examples"], cwd=repo, check=True)
    result = atomo("train", "examples/spec.yaml", *QUICK, cwd=repo)  # the default --out: ./atomo-runs
    assert result.returncode == 0, result.stdout + result.stderr
    (folder,) = [p for p in (repo / "atomo-runs").iterdir() if p.is_dir()]
    ran = RunSpec.model_validate_json((folder / "spec.json").read_text())
    flags = {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "batch_size": 32}
    assert ran == RunSpec.model_validate(yaml.safe_load(EXAMPLE.read_text()) | flags)
    assert len((folder / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert (repo / "atomo-runs" / ".gitignore").read_text() == GITIGNORE
    assert untracked(repo) == "A  examples/spec.yaml\n"  # the results are not offered for a commit


def test_only_a_missing_default_folder_gets_the_gitignore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_default_folder(Path("results"), RESULTS_DIR)  # a folder the user named: not made, not marked
    assert not Path("results").exists()
    Path(RESULTS_DIR).mkdir()
    make_default_folder(RESULTS_DIR, RESULTS_DIR)  # the user's own existing folder keeps its git status
    assert not (RESULTS_DIR / ".gitignore").exists()
    Path(RESULTS_DIR).rmdir()
    make_default_folder(RESULTS_DIR, RESULTS_DIR)
    assert (RESULTS_DIR / ".gitignore").read_text() == GITIGNORE


def test_a_run_with_no_steps_writes_the_csv_header(tmp_path):
    # A global batch larger than the digits training set: the PS fails the run before its first step.
    result = atomo("train", "--batch-size", "4096", "--out", "runs", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "does not fit digits" in result.stderr
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    header = (folder / "metrics.csv").read_text().splitlines()
    assert len(header) == 1 and header[0].startswith("step,time,wall_s,loss,")
    assert "test_accuracy" in header[0].split(",")


def test_atomo_codecs_explains_its_ratio_and_trains_on_request(tmp_path):
    result = atomo("codecs", "--model", "mlp", "--samples", "2", "--steps", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("mlp after 3 local SGD steps, a batch of 32 digits images")
    assert "atomo train's ratio is over a whole run" in out and "qsgd and lq (Elias-coded)" in out
    assert re.search(r"^qsgd 4 bits \(default\)\s+[\d,]+\s+[\d.]+\s", out, re.MULTILINE)
    refused = atomo("codecs", "--steps", "-1", cwd=tmp_path, timeout=60)
    assert refused.returncode != 0 and "--steps within 0..100000" in refused.stderr


@pytest.mark.slow
def test_events_are_in_time_order_after_a_ps_restart_and_atomo_state_stays_out_of_git(tmp_path):
    repo = git_repository(tmp_path / "project")
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "w") as out:  # the default --state-dir: ./atomo-state
        up = subprocess.Popen(
            [*atomo_command(), "up", "--workers", "2", "--threads", "1", "--port", str(port)]
            + ["--poll-interval", "0.2", "--log-level", "warning"],
            cwd=repo,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        text = wait_until(lambda: "# the token" in log.read_text() and log.read_text(), 120, "atomo up's output")
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.MULTILINE))
        url, token = exports["ATOMO_URL"], exports["ATOMO_API_TOKEN"]
        with Client(url, token) as api:
            wait_until(api.ready, 60, "ready")
            spec = {"model": "mlp", "workers": 2, "batch_size": 32, "eval_every": 1000, "steps": 20000}
            run_id = api.submit(spec | {"checkpoint_every": 20})["id"]
            wait_until(lambda: (api.run(run_id)["step"] or 0) >= 30, 120, "the run to train")
            os.kill(api.cluster()["ps"]["process"]["pid"], signal.SIGKILL)

            def types() -> list[str]:
                return [e["type"] for e in api.events(run_id)["events"]]

            wait_until(lambda: {"ps_exited", "ps_restarted", "resumed"} <= set(types()), 120, "the resume")
            wait_until(lambda: types().count("worker_joined") >= 4, 60, "the workers to rejoin")
            api.cancel(run_id)
            wait_until(lambda: api.run(run_id)["state"] in FINAL, 60, "the cancel")

            events = api.events(run_id)["events"]
            times = [e["time"] for e in events]
            assert times == sorted(times), [(e["seq"], e["time"], e["type"]) for e in events]
            assert sorted(e["seq"] for e in events) == list(range(1, len(events) + 1))
            # The PS resumed the run before the service saw it ready again: its own events come first.
            order = [e["type"] for e in events]
            assert order.index("ps_exited") < order.index("ps_restarted") < order.index("resumed")
            # Paging with `since` (a seq cursor) still serves every event once.
            paged, since = [], 0
            while page := httpx.get(
                f"{url}/v1/runs/{run_id}/events",
                params={"since": since, "limit": 3},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            ).json():
                if not page["events"]:
                    break
                paged += page["events"]
                since = page["next_since"]
            assert sorted(e["seq"] for e in paged) == list(range(1, len(events) + 1))

            logs = subprocess.run(
                [*atomo_command(), "logs", run_id, "--url", url],
                env={**env(), "ATOMO_API_TOKEN": token},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert logs.returncode == 0, logs.stderr
            assert [line.split()[2] for line in logs.stdout.splitlines()] == order
        assert (repo / "atomo-state" / ".gitignore").read_text() == GITIGNORE
        assert (repo / "atomo-state" / "api-token").exists()
        assert untracked(repo) == ""  # the state directory (token, runs, logs, store) is not offered for a commit
    finally:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait(timeout=30)
