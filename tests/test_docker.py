"""The image, built and run for real: a private Docker engine (scripts/docker-image.sh, bridge and iptables off),
the Dockerfile linted by hadolint, then the control service, a PS and two workers as containers on the host's
loopback (read-only root filesystem, UID 10001, all capabilities dropped, CURVE keys and a token file mounted
as the chart mounts them), a short run submitted over REST with its metrics and checkpoint, and every role
stopped by SIGTERM.

When the engine cannot start, the test fails with the reason; ATOMO_SKIP_DOCKER=1 skips it instead (for
machines that cannot run a Docker engine at all)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.control.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docker-image.sh"
SOCKET = "/tmp/atomo-docker/docker.sock"
IMAGE = "atomo:test"
UID = 10001
OPT_OUT = "ATOMO_SKIP_DOCKER"
FINAL = ("succeeded", "failed", "cancelled")
STEPS = 20


def _docker_cli() -> str:
    """The engine package's own client when there is one (the engine and the client then match)."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else (shutil.which("docker") or "docker")


DOCKER = _docker_cli()
ENV = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} ... exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def engine():
    """The private engine: started here and stopped by its pid at the end, whatever happens."""
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{OPT_OUT}=1: the image is not built or run")
    missing = [tool for tool in ("dockerd", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run scripts/install-test-tools.sh (or set {OPT_OUT}=1)")
    result = subprocess.run(["bash", str(SCRIPT), "engine-start"], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"the Docker engine did not start (set {OPT_OUT}=1 to skip): {result.stderr.strip()[-2000:]}")
    pid = int(result.stdout.split()[-1])
    ours = "already running" not in result.stderr  # an engine left by an earlier run is left as it is
    try:
        yield pid
    finally:
        if ours:
            _stop_pid(pid)


def _stop_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def image(engine) -> str:
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(SCRIPT), "build"],
        capture_output=True,
        text=True,
        timeout=840,
        env={**os.environ, "ATOMO_IMAGE": IMAGE},
    )
    assert result.returncode == 0, f"scripts/docker-image.sh build failed:\n{result.stderr[-4000:]}"
    steps = [line for line in result.stderr.splitlines() if line.startswith("docker-image:")]
    print("\n".join([*steps, f"image {IMAGE} ready in {time.monotonic() - started:.0f} s"]), file=sys.stderr)
    return IMAGE


def test_hadolint_passes_the_dockerfile():
    hadolint = ROOT / ".tools" / "bin" / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint not found: run scripts/install-test-tools.sh")
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_image_is_configured_as_the_chart_assumes(image):
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["dumb-init", "--"]
    assert sorted(config["ExposedPorts"]) == ["5555/tcp", "5556/tcp", "8080/tcp", "9090/tcp", "9091/tcp"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"] == "/tmp/.cache" and env["MPLCONFIGDIR"] == "/tmp/matplotlib"
    # As the image's own user, on a read-only root: who it is, no compilers, the package importable.
    probe = (
        "id -u; id -g; for tool in gcc cc g++ make; do command -v $tool && exit 1; done; "
        "python -c 'import atomo_core, services.cli, kubernetes, torch; print(torch.__version__)'; "
        "test -w /var/lib/atomo || echo 'state dir not writable'"
    )
    result = docker("run", "--rm", "--network", "none", "--read-only", "-v", "/var/lib/atomo", image, "sh", "-c", probe)
    lines = result.stdout.split()
    assert lines[:2] == [str(UID), str(UID)] and lines[2].startswith("2."), result.stdout
    assert "not writable" not in result.stdout


class Containers:
    """Containers and volumes made by the test, removed by id at the end."""

    def __init__(self, image: str):
        self.image = image
        self.prefix = f"atomo-test-{uuid.uuid4().hex[:8]}"
        self.ids: dict[str, str] = {}
        self.volumes: list[str] = []

    def volume(self, role: str) -> str:
        name = docker("volume", "create", f"{self.prefix}-{role}").stdout.strip()
        self.volumes.append(name)
        return name

    def run(self, role: str, args: list[str], env: dict[str, str], mounts: list[str], entrypoint=None) -> str:
        command = ["run", "--detach", "--name", f"{self.prefix}-{role}", "--network", "host", "--read-only"]
        command += ["--user", f"{UID}:{UID}", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        command += ["--tmpfs", "/tmp:rw,nosuid,nodev,size=256m,mode=1777", "--shm-size", "64m"]
        for key, value in {"ATOMO_THREADS": "1", "OMP_NUM_THREADS": "1", **env}.items():
            command += ["--env", f"{key}={value}"]
        for mount in mounts:
            command += ["--volume", mount]
        if entrypoint:
            command += ["--entrypoint", entrypoint]
        container = docker(*command, self.image, *args).stdout.strip()
        self.ids[role] = container
        return container

    def logs(self, role: str) -> str:
        result = docker("logs", self.ids[role], check=False)
        return result.stdout + result.stderr

    def all_logs(self) -> str:
        return "\n".join(f"--- {role}\n{self.logs(role)[-3000:]}" for role in self.ids)

    def remove(self) -> None:
        for container in self.ids.values():
            docker("rm", "--force", container, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "--force", volume, check=False)


@pytest.fixture
def containers(image):
    made = Containers(image)
    try:
        yield made
    finally:
        made.remove()


def _secrets(tmp_path: Path) -> tuple[str, Path, Path]:
    """A token file and CURVE keys, readable by the image's user only, as the chart's Secrets are."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    (token_dir / "token").write_text(token)
    keys = tmp_path / "curve"
    result = subprocess.run(
        [sys.executable, "-m", "services", "keys", str(keys), "--clients", "2"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for folder in (token_dir, keys):
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, UID, UID)
    return token, token_dir, keys


def _wait(what: str, check, timeout_s: float, containers: Containers):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s\n{containers.all_logs()}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_control_ps_and_workers_train_a_run_in_containers(containers, tmp_path):
    http, data, control, ps_metrics, metrics_0, metrics_1 = free_ports(6)
    token, token_dir, keys = _secrets(tmp_path)
    curve = f"{keys}:/etc/atomo/curve:ro"
    endpoint = f"tcp://127.0.0.1:{data}"

    containers.run(
        "ps",
        ["atomo", "ps"],
        {
            "ATOMO_PS_BIND": "127.0.0.1",
            "ATOMO_PS_PORT": str(data),
            "ATOMO_PS_CONTROL_PORT": str(control),
            "ATOMO_METRICS_PORT": str(ps_metrics),
            "ATOMO_KEYS": "/etc/atomo/curve",
        },
        [f"{containers.volume('ps')}:/var/lib/atomo", curve],
    )
    for i, metrics in enumerate((metrics_0, metrics_1)):
        worker_env = {
            "ATOMO_PS": endpoint,
            "ATOMO_WORKER_ID": f"worker-{i}",
            "ATOMO_METRICS_PORT": str(metrics),
            "ATOMO_METRICS_HOST": "127.0.0.1",
            "ATOMO_KEYS": "/etc/atomo/curve",
            "ATOMO_KEY_NAME": "client-0",
        }
        # worker-0 under the image's entry point (dumb-init); worker-1 as the chart starts it, its command
        # (`dumb-init -- atomo worker`) replacing the entry point.
        if i == 0:
            containers.run("worker-0", ["atomo", "worker"], worker_env, [curve])
        else:
            containers.run("worker-1", ["--", "atomo", "worker"], worker_env, [curve], entrypoint="dumb-init")
    containers.run(
        "control",
        [
            "--",
            "atomo",
            "serve",
            "--host=127.0.0.1",
            f"--port={http}",
            "--db=/var/lib/atomo/control.db",
            "--token-file=/etc/atomo/token/token",
            "--curve-keys=/etc/atomo/curve",
            "--curve-client=client-1",
        ],
        {"ATOMO_PS_CONTROL": f"tcp://127.0.0.1:{control}"},
        [f"{containers.volume('control')}:/var/lib/atomo", f"{token_dir}:/etc/atomo/token:ro", curve],
        entrypoint="dumb-init",
    )

    url = f"http://127.0.0.1:{http}"
    _wait("the control service ready (/readyz 200)", lambda: _ready(url), 120, containers)
    with Client(url, token) as api:
        _wait("both workers registered", lambda: len(api.cluster().get("workers") or []) == 2, 120, containers)
        spec = {"name": "docker", "steps": STEPS, "eval_every": 10, "checkpoint_every": 10, "batch_size": 32}
        run_id = api.submit(spec)["id"]
        run = _wait("the run finished", lambda: (r := api.run(run_id))["state"] in FINAL and r, 240, containers)
        assert run["state"] == "succeeded" and run["step"] == STEPS, (run, containers.all_logs())

        records = api.metrics(run_id, since=0)["records"]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert all(r["bytes_up"] > 0 for r in records)
        checkpoint = torch.load(io.BytesIO(api.checkpoint(run_id)), map_location="cpu", weights_only=False)
        assert checkpoint["run_id"] == run_id and checkpoint["step"] == STEPS and checkpoint["model"]

    ps = _scrape(ps_metrics)
    assert ps["atomo_ps_received_bytes_total"] > 0 and ps["atomo_run_step"] == STEPS, ps
    assert _scrape(metrics_0)["atomo_worker_sent_bytes_total"] > 0

    # SIGTERM reaches each role (through dumb-init, or as PID 1 when the command replaces the entry point): each
    # exits promptly with 0 or 143 (128 + SIGTERM), not after docker's 30 s grace period with a SIGKILL.
    for role in ("worker-0", "worker-1", "ps", "control"):
        started = time.monotonic()
        docker("stop", "--time", "30", containers.ids[role], timeout=60)
        elapsed = time.monotonic() - started
        code = int(docker("inspect", "--format", "{{.State.ExitCode}}", containers.ids[role]).stdout)
        assert code in (0, 143) and elapsed < 15, f"{role}: exit {code} after {elapsed:.1f} s\n{containers.logs(role)}"

    logs = containers.all_logs()
    assert token not in logs  # the API token is never logged
    for path in keys.rglob("*.key_secret"):  # nor the CURVE secret keys
        (secret,) = re.findall(r'secret-key = "(.+)"', path.read_text())
        assert secret not in logs
