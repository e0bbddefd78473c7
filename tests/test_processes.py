"""Processes, ports and tokens, with real processes: `atomo train` and `atomo up` as a user runs them.

Children die with their launcher (SIGKILL of `atomo train` / `atomo up`); a killed worker does not end an
`atomo train` run above min_workers; every process's metrics endpoint is printed and answers; `atomo up`
binds its port before it shows a token and keeps the token; its PS supervisor reports a killed PS at once,
restarts it (the run resumes), and fails a run whose PS keeps dying so that the next run is served.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.cli import main
from services.common.launch import free_port
from services.common.spec import CodecSpec, RunSpec
from services.control.auth import stored_token
from services.control.client import Client
from services.train import describe

FINAL = ("succeeded", "failed", "cancelled")
MLP = {"model": "mlp", "dataset": "digits", "workers": 2, "batch_size": 32, "eval_every": 1000}
EXIT_WITHIN_S = 10.0  # the parent-death grace (5 s) plus interpreter exit on a busy machine


def clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ATOMO_")}, "PYTHONUNBUFFERED": "1"}


def children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is `pid` (a /proc scan)."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found[int(path.parent.name)] = (path.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it has exited, only its status waits to be read)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.1, process=None):
    """`condition()`'s first true value within `timeout_s`; fails early if `process` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"exited with {process.returncode} waiting for {what}"
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def assert_exit_after_parent_kill(parent: subprocess.Popen, pids: list[int]) -> None:
    parent.kill()
    parent.wait(10)
    killed_at = time.monotonic()
    wait_until(lambda: not any(alive(p) for p in pids), EXIT_WITHIN_S + 20, "the children to exit")
    assert time.monotonic() - killed_at < EXIT_WITHIN_S, "children outlived their parent by too long"


def get_metrics(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    return response.text


# -- atomo train --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_goes_on_without_a_killed_worker_and_its_processes_die_with_it(tmp_path):
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        train = subprocess.Popen(
            [sys.executable, "-m", "services", "train", "--model", "mlp", "--steps", "20000"]
            + ["--eval-every", "1000", "--checkpoint-every", "20", "--out", "runs", "--metrics"],
            cwd=tmp_path,
            env=clean_env(),
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        text = wait_until(
            lambda: re.search(r"step \d+/20000", stdout.read_text()) and stdout.read_text(), 90, "steps", process=train
        )
        ports = dict(re.findall(r"(ps|worker-\d) http://127\.0\.0\.1:(\d+)/metrics", text))
        assert sorted(ports) == ["ps", "worker-0", "worker-1"]
        assert "atomo_ps_step_seconds" in get_metrics(int(ports["ps"]))
        assert "atomo_worker_compute_seconds" in get_metrics(int(ports["worker-0"]))

        procs = children(train.pid)
        worker = next(pid for pid, cmd in procs.items() if "--id worker-1" in cmd)
        os.kill(worker, signal.SIGKILL)
        wait_until(
            lambda: "worker worker-1 exited with status -9" in stderr.read_text(), 30, "the report", process=train
        )
        folder = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())  # the PS writes here directly
        events = lambda: [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]  # noqa: E731
        lost = wait_until(lambda: [e for e in events() if e["type"] == "worker_lost"], 30, "worker_lost")
        assert lost[0]["detail"]["worker"] == "worker-1"
        steps = lambda: len((folder / "metrics.jsonl").read_text().splitlines())  # noqa: E731
        after_loss = steps()
        wait_until(lambda: steps() > after_loss + 20, 60, "training to go on with one worker")
        assert train.poll() is None  # the run goes on

        assert_exit_after_parent_kill(train, list(procs))
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
    names = {p.name for p in folder.iterdir()}
    assert {"spec.json", "metrics.jsonl", "events.jsonl", "checkpoint.pt"} <= names, names


# -- atomo up -----------------------------------------------------------------------------------------------


def start_up(state_dir: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services", "up", "--workers", "2", "--threads", "1", "--port", str(port)]
            + ["--state-dir", str(state_dir), "--poll-interval", "0.2", "--log-level", "warning"],
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def ps_process(api: Client) -> dict:
    return api.cluster()["ps"]["process"]


def kill_ps_and_see_it_reported(api: Client, url: str, run_id: str, restarts: int) -> None:
    """SIGKILL the PS: /readyz and the cluster say so at once; the supervisor restarts it."""
    os.kill(ps_process(api)["pid"], signal.SIGKILL)
    ready = wait_until(lambda: (r := httpx.get(url + "/readyz")).status_code == 503 and r.json(), 5, "/readyz 503")
    assert ready["reason"].startswith("the PS process exited with status -9"), ready
    down = api.cluster()["ps"]
    assert down["state"] == "down" and down["process"]["exit_status"] == -9 and down["process"]["log_tail"]
    wait_until(lambda: ps_process(api)["restarts"] == restarts and api.ready(), 60, "the PS restarted")
    exited = wait_until(
        lambda: [
            e for e in api.events(run_id)["events"] if e["type"] == "ps_exited" and e["detail"]["deaths"] == restarts
        ],
        10,
        f"the ps_exited event of death {restarts}",
    )
    assert exited[-1]["detail"]["log_tail"]


@pytest.mark.slow
def test_up_supervises_the_ps_and_a_crash_loop_fails_only_its_run(tmp_path):
    port = free_port()
    up = start_up(tmp_path / "state", port, tmp_path / "up.log")
    try:
        text = wait_until(
            lambda: "# the token" in (tmp_path / "up.log").read_text() and (tmp_path / "up.log").read_text(),
            90,
            "atomo up's output",
        )
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.MULTILINE))
        url, token = exports["ATOMO_URL"], exports["ATOMO_API_TOKEN"]
        token_file = tmp_path / "state" / "api-token"
        assert token_file.read_text().strip() == token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
        ports = {name: int(p) for name, p in re.findall(r"(ps|worker-\d) http://127\.0\.0\.1:(\d+)/metrics", text)}
        with Client(url, token) as api:
            wait_until(api.ready, 30, "ready")
            cluster = api.cluster()
            assert cluster["ps"]["metrics_port"] == ports["ps"]
            assert {w["id"]: w["metrics_port"] for w in cluster["workers"]} == {
                "worker-0": ports["worker-0"],
                "worker-1": ports["worker-1"],
            }
            for p in ports.values():
                assert "# TYPE" in get_metrics(p)

            doomed = api.submit(MLP | {"steps": 20000, "checkpoint_every": 20})["id"]
            following = api.submit(MLP | {"steps": 10})["id"]
            wait_until(lambda: (api.run(doomed)["step"] or 0) >= 30, 90, "the first run to train")
            kill_ps_and_see_it_reported(api, url, doomed, 1)
            resumed = wait_until(
                lambda: [e for e in api.events(doomed)["events"] if e["type"] == "resumed"], 60, "resume"
            )
            assert resumed[0]["detail"]["step"] >= 20 and api.run(doomed)["state"] == "running"
            for death in (2, 3):
                kill_ps_and_see_it_reported(api, url, doomed, death)
            failed = api.run(doomed)
            assert failed["state"] == "failed" and "the PS died 3 times during this run" in failed["error"]
            assert '"ready": true' in failed["error"]  # the end of the PS's log is quoted
            done = wait_until(lambda: api.run(following)["state"] in FINAL and api.run(following), 120, "the next run")
            assert done["state"] == "succeeded" and done["step"] == 10

        procs = list(children(up.pid))
        assert len(procs) == 3
        assert_exit_after_parent_kill(up, procs)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_up_refuses_a_busy_port_before_it_shows_a_token_or_starts_anything(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services", "up", "--port", str(port), "--state-dir", str(tmp_path)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot bind 127.0.0.1:{port} (Address already in use); choose another --port" in result.stderr
    assert "ATOMO_API_TOKEN" not in result.stdout + result.stderr
    assert not (tmp_path / "logs").exists()  # no PS or worker was started


def test_the_token_is_kept_private_reused_and_rotated_on_request(tmp_path):
    path = tmp_path / "state" / "api-token"
    token, reused = stored_token(path)
    assert not reused and len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    assert stored_token(path) == (token, True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rotated, reused = stored_token(path, rotate=True)
    assert not reused and rotated != token and path.read_text().strip() == rotated


# -- the command line ---------------------------------------------------------------------------------------


def test_ps_refuses_a_public_bind_without_keys_naming_the_flags(tmp_path, capsys):
    assert main(["ps", "--bind", "0.0.0.0", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--keys DIR" in err and "--allow-remote-without-keys" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--target-accuracy", "1.5"], "argument --target-accuracy: expected a number in (0, 1], got 1.5"),
        (["train", "--metrics", "-1"], "argument --metrics: expected a port number from 0 to 65535, got -1"),
        (["up", "--workers", "-2"], "argument --workers: expected a positive integer, got -2"),
        (["up", "--port", "70000"], "argument --port: expected a port number from 0 to 65535, got 70000"),
        (["ps", "--threads", "0"], "argument --threads: expected a positive integer, got 0"),
        (["ps", "--heartbeat-s", "nan"], "argument --heartbeat-s: expected a number of seconds from 0.01 to 3600"),
        (["worker", "--metrics-port", "-5"], "argument --metrics-port: expected a port number from 0 to 65535"),
        (["serve", "--poll-interval", "0"], "argument --poll-interval: expected a positive number, got 0"),
    ],
)
def test_out_of_range_values_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_describe_writes_numbers_as_people_do():
    spec = RunSpec(codec=CodecSpec(name="svd", budget=3.0), lr=0.05)
    text = describe(spec)
    assert "budget=3," in text or "budget=3)" in text
    assert "lr 0.05," in text and "3.0" not in text
