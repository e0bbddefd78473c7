"""Hostile but valid specs over the real REST API: `atomo serve` over HTTP, a real local PS and two workers.

Every spec the API accepts either trains or fails with a reason in the run's `error`; none may take the
PS down, and a normal run afterwards succeeds. Runs are a few steps of the MLP on digits, so the table
(one FIFO queue) takes well under a minute plus the 10 s a short-handed run waits for workers."""

from __future__ import annotations

import time

import httpx
import pytest
from helpers import strict_json

from services.common.spec import RunSpec
from services.control.client import Client
from services.control.launchers import ControlProcess, LocalLauncher

pytestmark = pytest.mark.slow

TOKEN = "hostile-token"
FINAL = ("succeeded", "failed", "cancelled")
RUN_BOUND_S = 60  # each run ends within this after the one before it
BASE = {"model": "mlp", "dataset": "digits", "workers": 2, "batch_size": 32, "steps": 4, "eval_every": 2}

# name -> (spec over BASE, the state it must end in: "succeeded", "failed", or None for either)
TABLE = {
    "svd budget 1e-6": ({"codec": {"name": "svd", "budget": 1e-6}}, "succeeded"),
    "svd budget 1e9": ({"codec": {"name": "svd", "budget": 1e9}}, "succeeded"),
    "entrywise budget 1e-6": ({"codec": {"name": "entrywise", "budget": 1e-6}}, "succeeded"),
    "fourier budget 1e9": ({"codec": {"name": "fourier", "budget": 1e9}}, "succeeded"),
    "qsgd bits 1": ({"codec": {"name": "qsgd", "bits": 1}}, "succeeded"),
    "qsgd bits 16, one bucket": ({"codec": {"name": "qsgd", "bits": 16, "bucket_size": 2**32 - 1}}, "succeeded"),
    "lq q tiny": ({"codec": {"name": "lq", "q": 1e-6}}, "succeeded"),
    "lq q huge": ({"codec": {"name": "lq", "q": 1e6}}, "succeeded"),
    "lq q inf": ({"codec": {"name": "lq", "q": "inf"}}, "succeeded"),
    "terngrad clip 1e-6": ({"codec": {"name": "terngrad", "clip": 1e-6}}, "succeeded"),
    "lr 10": ({"lr": 10}, None),
    "lr 1e-12": ({"lr": 1e-12}, "succeeded"),
    "batch_size = workers": ({"batch_size": 2}, "succeeded"),
    "batch_size 65536": ({"batch_size": 65536}, "failed"),
    "step schedule, warmup and milestones beyond steps": (
        {"lr_schedule": "step", "warmup_steps": 100, "step_milestones": [5, 10**6]},
        "succeeded",
    ),
    "cosine, warmup beyond steps": ({"lr_schedule": "cosine", "warmup_steps": 10**9}, "succeeded"),
    "eval and checkpoint every step": ({"eval_every": 1, "checkpoint_every": 1}, "succeeded"),
    "eval and checkpoint never": ({"eval_every": 10**12, "checkpoint_every": 10**12}, "succeeded"),
    "dense_steps beyond steps": ({"dense_steps": 10**9}, "succeeded"),
    "num_aggregate 1": ({"num_aggregate": 1}, "succeeded"),
    "epochs tiny": ({"steps": None, "epochs": 1e-9}, "succeeded"),
    "model downlink": ({"downlink": "model"}, "succeeded"),
    "momentum near 1, nesterov, weight decay near 1": (
        {"momentum": 0.999999, "nesterov": True, "weight_decay": 0.999},
        None,
    ),
    "diverging qsgd": (
        {"steps": 200, "lr": 10, "eval_every": 1, "codec": {"name": "qsgd", "bits": 2, "bucket_size": 2**32 - 1}},
        "failed",
    ),
    "5 workers on a 2-worker cluster": ({"workers": 5, "batch_size": 40}, "succeeded"),
}


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    with LocalLauncher(tmp_path_factory.mktemp("cluster"), workers=2, threads=1, metrics=False) as launcher:
        process = ControlProcess(
            tmp_path_factory.mktemp("control") / "control.db",
            launcher.control_endpoint,
            TOKEN,
            extra_args=("--poll-interval", "0.2"),
        ).start()
        yield process
        process.stop()


def test_every_hostile_spec_ends_with_a_reason_and_the_next_run_succeeds(control):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    submitted = {}
    with httpx.Client(base_url=control.url, headers=headers, timeout=30) as http:
        for name, (extra, _expected) in TABLE.items():
            spec = {k: v for k, v in (BASE | extra | {"name": name.replace(" ", "-")[:100]}).items() if v is not None}
            response = http.post("/v1/runs", json=spec)
            assert response.status_code == 201, (name, response.text)
            submitted[name] = strict_json(response.text)  # valid JSON, even for q = inf
            # the run resource holds the resolved spec, which validates back to the same spec
            assert submitted[name]["spec"] == RunSpec.model_validate(spec).model_dump(mode="json"), name
            assert RunSpec.model_validate(submitted[name]["spec"]) == RunSpec.model_validate(spec), name

    with Client(control.url, TOKEN) as api:
        ended = {}
        for name, (_extra, expected) in TABLE.items():  # FIFO: each run ends within the bound after the last
            deadline = time.monotonic() + RUN_BOUND_S
            while (run := api.run(submitted[name]["id"]))["state"] not in FINAL:
                assert time.monotonic() < deadline, f"{name}: still {run['state']} after {RUN_BOUND_S} s: {run}"
                time.sleep(0.2)
            ended[name] = run
            assert run["spec"] == submitted[name]["spec"], name
            assert run["state"] in ("succeeded", "failed"), (name, run)
            if run["state"] == "failed":
                assert run["error"], (name, run)
            if expected is not None:
                assert run["state"] == expected, (name, run)

        normal = api.submit(BASE | {"name": "normal", "steps": 10})["id"]
        deadline = time.monotonic() + RUN_BOUND_S
        while (run := api.run(normal))["state"] not in FINAL:
            assert time.monotonic() < deadline, run
            time.sleep(0.2)
        assert run["state"] == "succeeded" and run["step"] == 10, run

        assert "does not fit digits" in ended["batch_size 65536"]["error"]
        assert ended["diverging qsgd"]["error"].startswith("training diverged at step ")
        assert ended["epochs tiny"]["total_steps"] == ended["epochs tiny"]["step"] == 1
        q_inf = ended["lq q inf"]
        assert submitted["lq q inf"]["spec"]["codec"]["q"] == q_inf["spec"]["codec"]["q"] == "inf"
        short = [e for e in api.events(ended["5 workers on a 2-worker cluster"]["id"])["events"]]
        messages = [e["detail"].get("message") for e in short if e["type"] == "started_with_fewer_workers"]
        assert messages == ["started with 2 of 5 workers; shards 2,3,4 wait for workers"], short
