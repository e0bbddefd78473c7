"""Faulty plugin codecs against a real PS and worker: a plugin whose decode hangs, and one that rejects its own
messages, each fail their run with an error (and a run_state event) naming the plugin and why; the PS's loop
goes on, and serves the next run."""

from __future__ import annotations

import os

import pytest

from services.common.launch import LocalCluster

pytestmark = pytest.mark.slow

PLUGIN = '''
from atomo_core.codecs import DenseCodec
from atomo_core.wire import WireFormatError


class Hang(DenseCodec):
    """Encodes like dense; its decode never returns (a pure-Python loop)."""

    name = "hang"
    codec_id = 201

    def decode_message(self, msg):
        while True:
            pass


class Garbled(DenseCodec):
    """Encodes like dense; its decode rejects every message it reads."""

    name = "garbled"
    codec_id = 202

    def decode_message(self, msg):
        raise WireFormatError("section 2 holds 7 values, the header promises 9")
'''
DECODE_TIMEOUT_S = 2.0
SPEC = {"model": "mlp", "workers": 1, "batch_size": 32, "steps": 20, "eval_every": 20}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A PS and one worker that both see the installed plugins (an entry-point folder on PYTHONPATH)."""
    site = tmp_path_factory.mktemp("site")
    (site / "atomo_faulty.py").write_text(PLUGIN)
    info = site / "atomo_faulty-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: atomo-faulty\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[atomo.codecs]\nhang = atomo_faulty:Hang\ngarbled = atomo_faulty:Garbled\n")
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    c = LocalCluster(
        tmp_path_factory.mktemp("plugin-faults"),
        workers=1,
        threads=1,
        metrics=False,
        env={"PYTHONPATH": path},
        ps_args=("--plugin-decode-timeout-s", str(DECODE_TIMEOUT_S)),
    )
    c.start()
    yield c
    c.stop()


def failed_run(cluster: LocalCluster, run_id: str, codec: str) -> tuple[dict, list[dict]]:
    cluster.client().call("submit", run_id=run_id, spec=SPEC | {"codec": {"name": codec}})
    run = cluster.wait_for_run(run_id, 120)
    events = cluster.client().call("events", run_id=run_id, since=0)["events"]
    return run, events


def test_a_plugin_whose_decode_hangs_fails_its_run_and_the_ps_goes_on(cluster):
    run, events = failed_run(cluster, "hang", "hang")
    assert run["state"] == "failed" and run["step"] == 0, run
    assert run["error"].startswith(
        f"plugin codec 'hang' did not decode worker worker-0's gradient of step 0 within {DECODE_TIMEOUT_S:g} s"
    ), run["error"]
    final = [e for e in events if e["type"] == "run_state" and e["detail"]["state"] == "failed"]
    assert final[0]["detail"]["error"] == run["error"]
    assert cluster.client().ping()["ps"]["state"] == "idle"  # the loop answers: it is not wedged
    cluster.client().call("submit", run_id="after-hang", spec=SPEC | {"codec": {"name": "qsgd", "bits": 4}})
    assert cluster.wait_for_run("after-hang", 120)["state"] == "succeeded"


def test_a_plugin_that_rejects_its_own_messages_fails_its_run_naming_it(cluster):
    run, events = failed_run(cluster, "garbled", "garbled")
    assert run["state"] == "failed" and run["step"] == 0, run
    assert run["error"] == (
        "plugin codec 'garbled' could not decode worker worker-0's gradient of step 0: "
        "section 2 holds 7 values, the header promises 9"
    ), run["error"]
    final = [e for e in events if e["type"] == "run_state" and e["detail"]["state"] == "failed"]
    assert final[0]["detail"]["error"] == run["error"]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("1e308", "expected at most 86400 seconds, got 1e+308"),
        ("86401", "expected at most 86400 seconds, got 86401"),
        ("0", "expected a positive number, got 0"),
        ("nan", "expected a positive number, got 'nan'"),
    ],
)
def test_the_plugin_decode_time_limit_is_bounded(value, error):
    """A limit SIGALRM's timer cannot hold (1e308 s overflowed it and failed every plugin run) or a
    non-positive one is a usage error of `atomo ps`, from the flag and from the environment alike."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "services", "ps"]
    for args, env in (
        ([*command, "--plugin-decode-timeout-s", value], {}),
        (command, {"ATOMO_PLUGIN_DECODE_TIMEOUT_S": value}),
    ):
        done = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (value, done.stderr)
        assert error in done.stderr, done.stderr


@pytest.mark.parametrize("role", ["ps", "worker"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("1e308", "expected a number of seconds from 0.01 to 3600, got 1e+308"),
        ("0.001", "expected a number of seconds from 0.01 to 3600, got 0.001"),
        ("inf", "expected a number of seconds from 0.01 to 3600, got 'inf'"),
    ],
)
def test_the_heartbeat_interval_is_bounded(role, value, error):
    """ZeroMQ takes the heartbeat interval in whole milliseconds: 1e308 s overflowed the socket option, and
    under 10 ms it rounds to 0 (no heartbeats). Both are usage errors of `atomo ps` and `atomo worker`, from
    the flag and from the environment alike."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "services", role]
    for args, env in (([*command, "--heartbeat-s", value], {}), (command, {"ATOMO_HEARTBEAT_S": value})):
        done = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (value, done.stderr)
        assert error in done.stderr, done.stderr
