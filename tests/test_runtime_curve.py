"""CURVE on a real local cluster: workers holding a listed key train; a worker with another key never joins."""

import shutil
import subprocess
import sys
import time

import pytest

from services.common.keys import write_keys
from services.common.launch import LocalCluster

pytestmark = pytest.mark.slow


def test_workers_with_listed_keys_train_and_a_stranger_is_refused(tmp_path):
    write_keys(tmp_path / "keys", clients=1)
    write_keys(tmp_path / "stranger", clients=1)  # its own client key, but our PS's public server key:
    shutil.copyfile(tmp_path / "keys" / "server.key", tmp_path / "stranger" / "server.key")  # only ZAP stops it
    with LocalCluster(tmp_path / "state", workers=2, threads=1, keys=tmp_path / "keys") as cluster:
        stranger = subprocess.Popen(
            [sys.executable, "-m", "services", "worker", "--ps", f"tcp://127.0.0.1:{cluster.port}", "--id", "stranger"]
            + ["--keys", str(tmp_path / "stranger"), "--key-name", "client-0", "--threads", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            cluster.client().call("submit", run_id="curve", spec={"model": "mlp", "steps": 20, "eval_every": 20})
            run = cluster.wait_for_run("curve", 120)
            assert run["state"] == "succeeded", run
            time.sleep(2)  # the stranger has had every chance to register by now
            workers = {w["id"] for w in cluster.client().status()["workers"]}
            assert workers == {"worker-0", "worker-1"}
        finally:
            stranger.kill()
            stranger.wait()
