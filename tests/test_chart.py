"""The Helm chart charts/atomo, checked statically: `helm lint --strict` with helm 4 and helm 3, `helm template`
(helm 4; helm 3 must render the very same manifests, and refuse the same bad values) with the defaults and
with monitoring on, existing Secrets, GPUs off, an Ingress and extra worker groups; every rendered manifest
passes `kubernetes-validate --strict` for two Kubernetes versions and checkov (with the chart's stated skips);
the schema refuses bad values with a clear message; and the rendered objects say what the chart promises
(restricted pods, probes, threads from the CPU limit, least-privilege RBAC, network policies, monitoring).
The tools come from scripts/install-test-tools.sh (.tools/bin, or PATH)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "atomo"
NAMESPACE = "atomo"
KUBERNETES_VERSIONS = ("1.33.0", "1.35.0")

RENDERS = {
    "defaults": [],
    "monitoring": [
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "monitoring.prometheusRule.enabled=true",
    ],
    "existing-secrets": [
        "--set",
        "auth.existingSecret=my-token",
        "--set",
        "auth.existingSecretKey=api-token",
        "--set",
        "curve.existingSecret=my-curve",
        "--set",
        "curve.workerClient=worker",
        "--set",
        "curve.controlClient=control",
    ],
    "cpu-workers": ["--set", "workers.gpu=0", "--set-json", "workers.tolerations=[]"],
    "ingress": [
        "--set",
        "control.ingress.enabled=true",
        "--set",
        "control.ingress.className=nginx",
        "--set-json",
        'control.ingress.tls=[{"secretName": "atomo-tls", "hosts": ["atomo.example.com"]}]',
    ],
    "worker-groups": [
        "--set-json",
        'workers.nodeSelector={"pool": "main"}',
        "--set-json",
        'workers.affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, '
        '"preference": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}]}}',
        "--set",
        "additionalWorkerGroups.h100.disabled=false",
        "--set",
        "additionalWorkerGroups.h100.replicas=1",
        "--set-json",
        'additionalWorkerGroups.a10={"disabled": false, "gpu": 2, "maxReplicas": 3, "nodeSelector": {"pool": "a10"}, '
        '"affinity": {}, "tolerations": []}',
        "--set-json",
        'additionalWorkerGroups.t4={"disabled": true}',
    ],
    "no-launcher-no-curve": ["--set", "control.launcher=none", "--set", "curve.enabled=false"],
    # A shared GPU cluster: priorities, a gang scheduler's queues, spreading, cloud identities, MIG slices,
    # egress policies, and the worker replicas left to the launcher.
    "shared-cluster": [
        "--set",
        "scheduling.priorityClassName=training",
        "--set",
        "ps.priorityClassName=training-critical",
        "--set",
        "scheduling.schedulerName=volcano",
        "--set",
        "scheduling.volcano.queue=team-a",
        "--set",
        "scheduling.kueue.queueName=team-a-gpus",
        "--set",
        "scheduling.kueue.priorityClass=batch-high",
        "--set",
        "scheduling.workerWaitSeconds=900",
        "--set",
        "scheduling.releaseAfterSeconds=30",
        "--set-json",
        'workers.topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", '
        '"whenUnsatisfiable": "ScheduleAnyway"}]',
        "--set-json",
        'control.topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", '
        '"whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"team": "a"}}}]',
        "--set",
        "workers.gpuResource=nvidia.com/mig-1g.10gb",
        "--set",
        "workers.replicas=null",
        "--set",
        "ps.serviceAccount.create=true",
        "--set",
        "ps.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/atomo-ps",
        "--set",
        "workers.serviceAccount.create=true",
        "--set",
        "workers.serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=w@p.iam.gserviceaccount.com",
        "--set",
        "additionalWorkerGroups.h100.disabled=false",
        "--set",
        "networkPolicy.egress.enabled=true",
        "--set-json",
        'networkPolicy.egress.apiServer.cidrs=["10.0.0.1/32"]',
        "--set-json",
        'networkPolicy.egress.extra.worker=[{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], '
        '"ports": [{"port": 443, "protocol": "TCP"}]}]',
        "--set",
        "keygen.image.repository=registry.example.com/python",
        "--set",
        "keygen.image.digest=sha256:" + "ab" * 32,
    ],
    # Accounts made by the chart, RBAC bound elsewhere (and the reverse).
    "no-rbac": ["--set", "rbac.create=false"],
    "no-service-account": ["--set", "serviceAccount.create=false", "--set", "serviceAccount.name=platform-atomo"],
}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(ROOT / ".tools" / "bin"))
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/install-test-tools.sh")
    return path


# The chart is apiVersion v2 and supported on helm 3 and helm 4: .tools/bin/helm is v4.1.4, .tools/bin/helm3 v3.17.3.
HELMS = {"helm": "v4.", "helm3": "v3."}


def helm(*args: str, binary: str = "helm") -> subprocess.CompletedProcess:
    return subprocess.run([tool(binary), *args], capture_output=True, text=True, timeout=60)


def template(*values: str, binary: str = "helm") -> subprocess.CompletedProcess:
    return helm("template", "atomo", str(CHART), "--namespace", NAMESPACE, *values, binary=binary)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each rendering's manifests in a file, rendered once for the module."""
    directory = tmp_path_factory.mktemp("rendered")
    out = {}
    for name, values in RENDERS.items():
        result = template(*values)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        out[name] = directory / f"{name}.yaml"
        out[name].write_text(result.stdout)
    return out


@pytest.fixture(scope="module")
def objects(rendered) -> dict[str, list[dict]]:
    return {name: [d for d in yaml.safe_load_all(path.read_text()) if d] for name, path in rendered.items()}


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = by_kind(docs, kind)
    assert name in found, f"no {kind} {name}: {sorted(found)}"
    return found[name]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec rendered, by owner name (Deployments, StatefulSets, Jobs, bare Pods)."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            out[d["metadata"]["name"]] = d["spec"]
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# -- the tools ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", HELMS)
def test_helm_lint_strict(binary):
    version = helm("version", "--short", binary=binary)
    assert version.stdout.startswith(HELMS[binary]), f"{tool(binary)} is {version.stdout}"
    for values in (
        RENDERS["defaults"],
        RENDERS["monitoring"] + RENDERS["ingress"] + RENDERS["worker-groups"],
        RENDERS["shared-cluster"] + RENDERS["no-rbac"],
    ):
        result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values, binary=binary)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


def test_renders_are_deterministic_and_helm_3_renders_exactly_what_helm_4_renders(rendered):
    """Nothing random and nothing read from a cluster is rendered (the API token and the CURVE keys come from
    the keygen hook, replicas from values, never `lookup`): every rendering is the same byte for byte, again and
    with helm 3, so that a GitOps tool sees no change between two renders of the same values."""
    for name, values in RENDERS.items():
        helm4 = rendered[name].read_text()
        again = template(*values)
        assert again.returncode == 0 and again.stdout == helm4, name
        result = template(*values, binary="helm3")
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert result.stdout == helm4, name
        assert "kind: Secret\n" not in helm4, name  # no Secret is rendered: the hook makes them


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(rendered, version):
    result = subprocess.run(
        [
            tool("kubernetes-validate"),
            "--kubernetes-version",
            version,
            "--strict",
            "--quiet",
            *map(str, rendered.values()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the Prometheus Operator's custom resources lack a schema here (checked below against their CRD).
    for line in (result.stdout + result.stderr).splitlines():
        assert "monitoring.coreos.com" in line and line.startswith("WARN"), line


@pytest.fixture(scope="module")
def checkov_report(rendered) -> dict:
    """One checkov run over every rendering (BC_SKIP_MAPPING: no network look-up of guideline ids)."""
    result = subprocess.run(
        [tool("checkov"), "--config-file", str(CHART / ".checkov.yaml"), "--skip-download", "-o", "json"]
        + [arg for path in rendered.values() for arg in ("-f", str(path))],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "BC_SKIP_MAPPING": "TRUE", "HOME": str(rendered["defaults"].parent)},
    )
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_checkov_passes_with_every_skip_explained(checkov_report):
    summary = checkov_report["summary"]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in checkov_report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0 and summary["passed"] > 100
    # Skips inside the chart are annotations with a reason: "CKV_K8S_n=why".
    for check in checkov_report["results"]["skipped_checks"]:
        assert check["check_id"].startswith("CKV") and len(check["check_result"].get("suppress_comment", "")) > 20, (
            check["check_id"]
        )
    config = (CHART / ".checkov.yaml").read_text()
    for check_id in yaml.safe_load(config)["skip-check"]:
        assert f"# {check_id} " in config, f"{check_id} is skipped without a reason"


# -- the schema ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    (["--set", "workers.replicas=-1"], "/workers/replicas", "minimum"),
    (["--set", "control.launcher=slurm"], "/control/launcher", "'kubernetes', 'none'"),
    (["--set", "ps.ports.data=70000"], "/ps/ports/data", "maximum"),
    (["--set", "image.digest=latest"], "/image/digest", "does not match pattern"),
    (["--set", "workers.resources.limits.cpu=null"], "/workers/resources/limits", "missing property 'cpu'"),
    (["--set-json", 'additionalWorkerGroups={"GPU_pool": {"disabled": false}}'], "GPU_pool", "propertyName"),
    (["--set-json", 'additionalWorkerGroups={"default": {"disabled": false}}'], "default", "propertyName"),
    (["--set", "securityContext.allowPrivilegeEscalation=true"], "/securityContext/allowPrivilegeEscalation", "false"),
    (["--set", "podSecurityContext.runAsUser=0"], "/podSecurityContext/runAsUser", "minimum"),
    (["--set", "workers.gpus=1"], "gpus", "additional properties"),
    (["--set", "control.persistence.size=lots"], "/control/persistence/size", "does not match pattern"),
    (["--set", "workers.gpuResource=nvidia com/gpu"], "/workers/gpuResource", "does not match pattern"),
    (["--set", "scheduling.workerWaitSeconds=0"], "/scheduling/workerWaitSeconds", "exclusiveMinimum"),
    (["--set", "keygen.activeDeadlineSeconds=10"], "/keygen/activeDeadlineSeconds", "minimum: got 10, want 60"),
    (
        ["--set", "ps.podDisruptionBudget.unhealthyPodEvictionPolicy=Never"],
        "/ps/podDisruptionBudget/unhealthyPodEvictionPolicy",
        "'AlwaysAllow', 'IfHealthyBudget'",
    ),
    (["--set", "scheduling.priorityClassName=Bad_Name"], "/scheduling/priorityClassName", "'anyOf' failed"),
    (
        ["--set-json", 'workers.topologySpreadConstraints=[{"maxSkew": 1}]'],
        "/workers/topologySpreadConstraints/0",
        "missing properties 'topologyKey', 'whenUnsatisfiable'",
    ),
]


@pytest.mark.parametrize(("values", "where", "message"), BAD_VALUES, ids=[v[1] for v in BAD_VALUES])
def test_the_schema_refuses_bad_values(values, where, message):
    result = template(*values)
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert where in result.stderr and message in result.stderr, result.stderr


# helm 3 checks values.schema.json with another JSON Schema library: the same refusals, in its own words.
BAD_VALUES_HELM3 = [
    "- workers.replicas: Must be greater than or equal to 0",
    '- control.launcher: control.launcher must be one of the following: "kubernetes", "none"',
    "- ps.ports.data: Must be less than or equal to 65535",
    "- image.digest: Does not match pattern",
    "- workers.resources.limits: cpu is required",
    '- additionalWorkerGroups: Property name of "GPU_pool" does not match',
    '- additionalWorkerGroups: Property name of "default" does not match',
    "- securityContext.allowPrivilegeEscalation: securityContext.allowPrivilegeEscalation does not match: false",
    "- podSecurityContext.runAsUser: Must be greater than or equal to 1",
    "- workers: Additional property gpus is not allowed",
    "- control.persistence.size: Does not match pattern",
    "- workers.gpuResource: Does not match pattern",
    "- scheduling.workerWaitSeconds: Must be greater than 0",
    "- keygen.activeDeadlineSeconds: Must be greater than or equal to 60",
    "- ps.podDisruptionBudget.unhealthyPodEvictionPolicy: ps.podDisruptionBudget.unhealthyPodEvictionPolicy "
    'must be one of the following: "", "AlwaysAllow", "IfHealthyBudget"',
    "- scheduling.priorityClassName: Must validate at least one schema (anyOf)",
    "- workers.topologySpreadConstraints.0: topologyKey is required",
]


@pytest.mark.parametrize(
    ("values", "message"),
    [(bad[0], message) for bad, message in zip(BAD_VALUES, BAD_VALUES_HELM3, strict=True)],
    ids=[v[1] for v in BAD_VALUES],
)
def test_helm_3_refuses_the_same_bad_values(values, message):
    result = template(*values, binary="helm3")
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("binary", HELMS)
def test_renamed_client_keys_need_an_existing_secret(binary):  # the hook generates client-0 and client-1
    result = template("--set", "curve.workerClient=w", binary=binary)
    assert result.returncode != 0 and "the generated Secret holds client-0 (workers)" in result.stderr


# -- what the rendered objects promise ----------------------------------------------------------------------


def test_every_pod_is_restricted_read_only_and_probed(objects):
    for render, docs in objects.items():
        for owner, spec in pod_specs(docs).items():
            where = f"{render}: {owner}"
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
            assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True, where
                assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"], where
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert "/tmp" in mounts, where
                if spec.get("restartPolicy") != "Never":  # long-running containers
                    assert "livenessProbe" in c and "readinessProbe" in c, where
                    assert env_of(c)["ATOMO_THREADS"]["valueFrom"]["resourceFieldRef"] == {
                        "containerName": c["name"],
                        "resource": "limits.cpu",
                        "divisor": "1",
                    }, where
                    assert env_of(c)["OMP_NUM_THREADS"]["valueFrom"] == env_of(c)["ATOMO_THREADS"]["valueFrom"]
            if owner.endswith(("-ps", "-workers")) or "-workers-" in owner:
                assert spec["automountServiceAccountToken"] is False, where


def test_roles_commands_ports_and_probes(objects):
    docs = objects["defaults"]
    control = one(docs, "Deployment", "atomo-control")
    assert control["spec"]["replicas"] == 1 and control["spec"]["strategy"]["type"] == "Recreate"
    c = control["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["dumb-init", "--", "atomo", "serve"]  # the image's init stays PID 1
    assert "--token-file=/etc/atomo/token/token" in c["args"] and "--launcher=kubernetes" in c["args"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert env_of(c)["ATOMO_PS_CONTROL"]["value"] == "tcp://atomo-ps.atomo.svc:5556"

    ps = one(docs, "StatefulSet", "atomo-ps")
    assert ps["spec"]["replicas"] == 1
    p = ps["spec"]["template"]["spec"]["containers"][0]
    assert p["command"] == ["dumb-init", "--", "atomo", "ps"]
    assert {e: env_of(p)[e]["value"] for e in ("ATOMO_PS_BIND", "ATOMO_KEYS", "ATOMO_STATE_DIR")} == {
        "ATOMO_PS_BIND": "0.0.0.0",
        "ATOMO_KEYS": "/etc/atomo/curve",
        "ATOMO_STATE_DIR": "/var/lib/atomo",
    }
    service = one(docs, "Service", "atomo-ps")
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {
        ("data", 5555),
        ("control", 5556),
        ("metrics", 9090),
    }

    workers = one(docs, "StatefulSet", "atomo-workers")
    assert workers["spec"]["replicas"] == 2 and workers["spec"]["serviceName"] == "atomo-workers"
    spec = workers["spec"]["template"]["spec"]
    w = spec["containers"][0]
    assert w["command"] == ["dumb-init", "--", "atomo", "worker"]
    assert env_of(w)["ATOMO_PS"]["value"] == "tcp://atomo-ps.atomo.svc:5555"
    assert env_of(w)["ATOMO_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env_of(w)["ATOMO_KEY_NAME"]["value"] == "client-0"
    assert w["resources"]["requests"]["nvidia.com/gpu"] == 1 and w["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert w["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    shm = {v["name"]: v for v in spec["volumes"]}["dshm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in w["volumeMounts"]
    headless = one(docs, "Service", "atomo-workers")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True


def test_curve_keys_are_laid_out_per_role(objects):
    docs = objects["defaults"]

    def items(owner):
        volumes = {v["name"]: v for v in pod_specs(docs)[owner]["volumes"]}
        return {i["path"] for i in volumes["curve-keys"]["secret"]["items"]}

    assert items("atomo-ps") == {"server.key", "server.key_secret", "clients/client-0.key", "clients/client-1.key"}
    assert "clients/client-1.key_secret" not in items("atomo-workers")
    assert {"clients/client-0.key", "clients/client-0.key_secret"} <= items("atomo-workers")
    assert {"clients/client-1.key", "clients/client-1.key_secret"} <= items("atomo-control")
    assert "server.key_secret" not in items("atomo-workers") | items("atomo-control")  # clients: public key only
    job = one(docs, "Job", "atomo-keygen")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "atomo",
        "--token-secret=atomo-token",
        "--curve-secret=atomo-curve",
        "--clients=2",
    ]
    script = one(docs, "ConfigMap", "atomo-keygen")["data"]["keygen.py"]
    assert script == (CHART / "files" / "keygen.py").read_text()
    keygen_role = one(docs, "Role", "atomo-keygen")
    assert keygen_role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": ["atomo-token", "atomo-curve"],
        },
    ]


def test_the_keygen_hook_runs_a_small_image_with_a_deadline_for_a_cold_pull(objects):
    job = one(objects["defaults"], "Job", "atomo-keygen")
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    # The standard library only: not the multi-GB training image.
    assert container["image"] == "python:3.13-alpine" and container["command"][0] == "python3"
    assert job["spec"]["activeDeadlineSeconds"] == 900 and job["spec"]["backoffLimit"] == 3
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "128Mi"}
    assert {e["name"]: e["value"] for e in container["env"]} == {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    custom = one(objects["shared-cluster"], "Job", "atomo-keygen")["spec"]["template"]["spec"]
    assert custom["containers"][0]["image"] == "registry.example.com/python@sha256:" + "ab" * 32
    assert custom["priorityClassName"] == "training"
    result = template("--set", "keygen.activeDeadlineSeconds=1200", "--set", "keygen.image.tag=3.12-slim")
    job = one([d for d in yaml.safe_load_all(result.stdout) if d], "Job", "atomo-keygen")
    assert job["spec"]["activeDeadlineSeconds"] == 1200
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "python:3.12-slim"
    # Only the token to make (the CURVE keys given): the hook makes the token alone.
    result = template("--set", "curve.existingSecret=my-curve", "--set", "curve.workerClient=w")
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert one(docs, "Job", "atomo-keygen")["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "atomo",
        "--token-secret=atomo-token",
    ]
    assert one(docs, "Role", "atomo-keygen")["rules"][1]["resourceNames"] == ["atomo-token"]


def test_generated_token_and_existing_secrets(objects):
    # The token is the hook's: the control pod mounts the Secret the hook creates.
    volumes = {v["name"]: v for v in pod_specs(objects["defaults"])["atomo-control"]["volumes"]}
    assert volumes["token"]["secret"] == {
        "secretName": "atomo-token",
        "defaultMode": 0o440,
        "items": [{"key": "token", "path": "token"}],
    }
    docs = objects["existing-secrets"]
    assert "Secret" not in {d["kind"] for d in docs} and "Job" not in {d["kind"] for d in docs}
    volumes = {v["name"]: v for v in pod_specs(docs)["atomo-control"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "my-token"
    assert volumes["token"]["secret"]["items"] == [{"key": "api-token", "path": "token"}]
    assert volumes["curve-keys"]["secret"]["secretName"] == "my-curve"
    assert {"clients/control.key", "clients/control.key_secret"} <= {
        i["path"] for i in volumes["curve-keys"]["secret"]["items"]
    }
    ps_volumes = {v["name"]: v for v in pod_specs(docs)["atomo-ps"]["volumes"]}
    assert {"clients/worker.key", "clients/control.key"} <= {
        i["path"] for i in ps_volumes["curve-keys"]["secret"]["items"]
    }


def test_the_control_role_grants_exactly_what_the_launcher_uses(objects):
    role = one(objects["defaults"], "Role", "atomo-control")
    # services/control/kubernetes.py REQUIRED_RULES, limited to this release's worker StatefulSets.
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get"], "resourceNames": ["atomo-workers"]},
        {
            "apiGroups": ["apps"],
            "resources": ["statefulsets/scale"],
            "verbs": ["patch"],
            "resourceNames": ["atomo-workers"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    ]
    from services.control.kubernetes import REQUIRED_RULES  # what the launcher's tests saw it send

    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert granted == REQUIRED_RULES
    binding = one(objects["defaults"], "RoleBinding", "atomo-control")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "atomo-control", "namespace": NAMESPACE}]
    assert pod_specs(objects["defaults"])["atomo-control"]["automountServiceAccountToken"] is True
    env = env_of(pod_specs(objects["defaults"])["atomo-control"]["containers"][0])
    assert env["ATOMO_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["ATOMO_K8S_WORKER_STATEFULSET"]["value"] == "atomo-workers"
    assert env["ATOMO_K8S_WORKER_STATEFULSETS"]["value"] == "atomo-workers"
    assert env["ATOMO_K8S_IDLE_REPLICAS"]["value"] == "0"
    # Without the Kubernetes launcher: no Role, no token in the pod, no launcher flag.
    docs = objects["no-launcher-no-curve"]
    assert set(by_kind(docs, "Role")) == {"atomo-keygen"}  # the hook's own (the token), nothing for the launcher
    spec = pod_specs(docs)["atomo-control"]
    assert spec["automountServiceAccountToken"] is False
    assert "--launcher=kubernetes" not in spec["containers"][0]["args"]
    assert "ATOMO_K8S_NAMESPACE" not in env_of(spec["containers"][0])
    assert "--allow-remote-without-keys" in pod_specs(docs)["atomo-ps"]["containers"][0]["args"]


def test_extra_worker_groups(objects):
    docs = objects["worker-groups"]
    sets = by_kind(docs, "StatefulSet")
    assert set(sets) == {"atomo-ps", "atomo-workers", "atomo-workers-a10", "atomo-workers-h100"}
    a10 = sets["atomo-workers-a10"]["spec"]
    assert a10["replicas"] == 2 and a10["serviceName"] == "atomo-workers"
    # Placement is replaced, never merged: the group's own nodeSelector alone, its empty affinity and
    # tolerations clear the workers: ones.
    main = sets["atomo-workers"]["spec"]["template"]["spec"]
    assert main["nodeSelector"] == {"pool": "main"} and main["affinity"] and main["tolerations"]
    assert a10["template"]["spec"]["nodeSelector"] == {"pool": "a10"}
    assert "affinity" not in a10["template"]["spec"] and "tolerations" not in a10["template"]["spec"]
    assert a10["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    h100 = sets["atomo-workers-h100"]["spec"]
    assert h100["replicas"] == 1
    assert h100["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # A key the group does not set is the workers: one.
    assert h100["template"]["spec"]["affinity"] == main["affinity"]
    assert h100["template"]["spec"]["tolerations"] == main["tolerations"]
    selectors = [s["spec"]["selector"]["matchLabels"]["atomo/worker-group"] for n, s in sets.items() if n != "atomo-ps"]
    assert sorted(selectors) == ["a10", "default", "h100"]
    role = one(docs, "Role", "atomo-control")
    for rule in role["rules"][:2]:
        assert rule["resourceNames"] == ["atomo-workers", "atomo-workers-a10", "atomo-workers-h100"]
    env = env_of(pod_specs(docs)["atomo-control"]["containers"][0])
    assert env["ATOMO_K8S_WORKER_STATEFULSETS"]["value"] == "atomo-workers,atomo-workers-a10=3,atomo-workers-h100"


def test_gpus_off(objects):
    spec = pod_specs(objects["cpu-workers"])["atomo-workers"]
    resources = spec["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "tolerations" not in spec


def test_ingress(objects):
    ingress = one(objects["ingress"], "Ingress", "atomo-control")["spec"]
    assert ingress["ingressClassName"] == "nginx" and ingress["tls"][0]["secretName"] == "atomo-tls"
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "atomo-control", "port": {"name": "http"}}
    assert "Ingress" not in {d["kind"] for d in objects["defaults"]}


def test_network_policies(objects):
    policies = by_kind(objects["defaults"], "NetworkPolicy")
    assert policies["atomo-default-deny"]["spec"] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "atomo", "app.kubernetes.io/instance": "atomo"}},
        "policyTypes": ["Ingress"],
    }
    ps = {r["ports"][0]["port"]: r["from"] for r in policies["atomo-ps"]["spec"]["ingress"]}
    assert set(ps) == {"data", "control", "metrics"}
    assert ps["data"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert ps["control"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "control"
    assert ps["metrics"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring"]
    workers = policies["atomo-workers"]["spec"]["ingress"]
    assert [r["ports"][0]["port"] for r in workers] == ["metrics"]
    control = policies["atomo-control"]["spec"]["ingress"]
    assert len(control) == 1 and control[0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {"podSelector": {}} in control[0]["from"]
    assert not by_kind(
        [d for d in yaml.safe_load_all(template("--set", "networkPolicy.enabled=false").stdout) if d],
        "NetworkPolicy",
    )


def test_monitoring(objects):
    for render, docs in objects.items():
        for owner, d in ((d["metadata"]["name"], d) for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
            annotations = d["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
            ports = {p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            assert int(annotations["prometheus.io/port"]) in ports, f"{render}: {owner}"
    kinds = {d["kind"] for d in objects["defaults"]}
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds
    dashboards = {n: c for n, c in by_kind(objects["defaults"], "ConfigMap").items() if "dashboard" in n}
    committed = sorted((ROOT / "dashboards").glob("*.json"))
    assert len(dashboards) == len(committed)
    for path in committed:
        config_map = dashboards[f"atomo-dashboard-{path.stem}"]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
    docs = objects["monitoring"]
    monitor = one(docs, "ServiceMonitor", "atomo")["spec"]
    assert {(e["port"], e["path"]) for e in monitor["endpoints"]} == {("metrics", "/metrics"), ("http", "/metrics")}
    # Every series carries the release (and the operator's `namespace`): the dashboards and rules group by both.
    for endpoint in monitor["endpoints"]:
        assert endpoint["relabelings"] == [
            {
                "action": "replace",
                "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                "targetLabel": "release",
            }
        ]
    rule = one(docs, "PrometheusRule", "atomo")["spec"]
    # The generator's rules, scoped to this release (its namespace and name in every selector).
    scoped = (CHART / "files" / "alerts.yaml").read_text()
    scoped = scoped.replace("RELEASE_NAMESPACE", NAMESPACE).replace("RELEASE_NAME", "atomo")
    assert rule == yaml.safe_load(scoped)
    unscoped = yaml.safe_load((ROOT / "dashboards" / "alerts.yaml").read_text())
    assert [r["alert"] for r in rule["groups"][0]["rules"]] == [r["alert"] for r in unscoped["groups"][0]["rules"]]


def test_helm_test_hook_checks_readyz(objects):
    pod = one(objects["defaults"], "Pod", "atomo-test-readyz")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert "/readyz" in container["args"][0] and container["args"][1] == "http://atomo-control.atomo.svc:8080"
    compile(container["args"][0], "helm-test", "exec")


def test_labels_come_from_the_helpers(objects):
    for docs in objects.values():
        for d in docs:
            labels = d["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "atomo" and labels["app.kubernetes.io/instance"] == "atomo"
            assert labels["app.kubernetes.io/managed-by"] == "Helm" and labels["helm.sh/chart"] == "atomo-0.1.0"
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]


# -- a shared GPU cluster -----------------------------------------------------------------------------------


def test_priority_scheduler_and_topology_spread(objects):
    specs = pod_specs(objects["shared-cluster"])
    assert specs["atomo-control"]["priorityClassName"] == "training"  # the scheduling: default
    assert specs["atomo-workers"]["priorityClassName"] == "training"
    assert specs["atomo-ps"]["priorityClassName"] == "training-critical"  # the role's own wins
    for owner in ("atomo-control", "atomo-ps", "atomo-workers", "atomo-workers-h100"):
        assert specs[owner]["schedulerName"] == "volcano", owner
    # A constraint without a labelSelector gets the group's own pod labels; one with a selector keeps it.
    workers = specs["atomo-workers"]["topologySpreadConstraints"]
    assert workers == [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "atomo",
                    "app.kubernetes.io/instance": "atomo",
                    "app.kubernetes.io/component": "worker",
                    "atomo/worker-group": "default",
                }
            },
        }
    ]
    h100 = specs["atomo-workers-h100"]["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
    assert h100["atomo/worker-group"] == "h100"
    assert specs["atomo-control"]["topologySpreadConstraints"][0]["labelSelector"] == {"matchLabels": {"team": "a"}}
    assert "topologySpreadConstraints" not in specs["atomo-ps"]
    for spec in pod_specs(objects["defaults"]).values():  # nothing of this by default
        assert not {"priorityClassName", "schedulerName", "topologySpreadConstraints"} & set(spec)


def test_gang_scheduler_labels_and_the_all_or_nothing_wait(objects):
    docs = objects["shared-cluster"]
    for name in ("atomo-workers", "atomo-workers-h100"):
        sts = one(docs, "StatefulSet", name)
        # Kueue's StatefulSet integration admits the pods of a labelled StatefulSet as one group.
        assert sts["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus", name
        assert sts["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "batch-high", name
        assert sts["spec"]["template"]["metadata"]["annotations"]["scheduling.volcano.sh/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in one(docs, "StatefulSet", "atomo-ps")["metadata"]["labels"]
    # The launcher's wait: a run fails when its workers have not all registered in time, and the workers are
    # released once the queue is empty.
    args = pod_specs(docs)["atomo-control"]["containers"][0]["args"]
    assert "--worker-wait-timeout=900" in args and "--release-after=30" in args
    default_args = pod_specs(objects["defaults"])["atomo-control"]["containers"][0]["args"]
    assert "--worker-wait-timeout=600" in default_args and "--release-after=60" in default_args
    no_launcher = pod_specs(objects["no-launcher-no-curve"])["atomo-control"]["containers"][0]["args"]
    assert not [a for a in no_launcher if a.startswith(("--worker-wait-timeout", "--release-after"))]
    for sts in by_kind(objects["defaults"], "StatefulSet").values():
        assert not [k for k in sts["metadata"]["labels"] if k.startswith("kueue.")]


def test_worker_replicas_come_from_values_or_are_left_to_the_launcher(objects):
    for path in (CHART / "templates").rglob("*.yaml"):  # nothing is read from the cluster at render time
        assert 'lookup "' not in path.read_text(), path
    assert one(objects["defaults"], "StatefulSet", "atomo-workers")["spec"]["replicas"] == 2
    # null: no replicas in the manifest, so no upgrade or GitOps sync resets what the launcher set.
    assert "replicas" not in one(objects["shared-cluster"], "StatefulSet", "atomo-workers")["spec"]
    assert one(objects["shared-cluster"], "StatefulSet", "atomo-workers-h100")["spec"]["replicas"] == 0
    assert one(objects["shared-cluster"], "StatefulSet", "atomo-ps")["spec"]["replicas"] == 1


def test_the_ps_has_a_disruption_budget(objects):
    pdb = one(objects["defaults"], "PodDisruptionBudget", "atomo-ps")["spec"]
    assert pdb == {
        "maxUnavailable": 0,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "atomo",
                "app.kubernetes.io/instance": "atomo",
                "app.kubernetes.io/component": "ps",
            }
        },
    }
    ps_labels = one(objects["defaults"], "StatefulSet", "atomo-ps")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= ps_labels.items()
    docs = [d for d in yaml.safe_load_all(template("--set", "ps.podDisruptionBudget.enabled=false").stdout) if d]
    assert not by_kind(docs, "PodDisruptionBudget")


def test_gpu_resource_name(objects):
    for owner in ("atomo-workers", "atomo-workers-h100"):
        resources = pod_specs(objects["shared-cluster"])[owner]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/mig-1g.10gb"] == 1 and "nvidia.com/gpu" not in resources["limits"]
        assert resources["requests"]["nvidia.com/mig-1g.10gb"] == 1


def test_per_role_service_accounts_and_rbac_apart(objects):
    docs = objects["shared-cluster"]
    accounts = by_kind(docs, "ServiceAccount")
    assert set(accounts) == {"atomo-control", "atomo-ps", "atomo-workers", "atomo-workers-h100", "atomo-keygen"}
    assert accounts["atomo-ps"]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/atomo-ps"
    }
    gke = {"iam.gke.io/gcp-service-account": "w@p.iam.gserviceaccount.com"}
    assert accounts["atomo-workers"]["metadata"]["annotations"] == gke
    assert accounts["atomo-workers-h100"]["metadata"]["annotations"] == gke
    specs = pod_specs(docs)
    for owner in ("atomo-ps", "atomo-workers", "atomo-workers-h100"):
        assert specs[owner]["serviceAccountName"] == owner and specs[owner]["automountServiceAccountToken"] is False
        assert accounts[owner]["automountServiceAccountToken"] is False
    for owner in ("atomo-ps", "atomo-workers"):  # by default: the namespace's default account
        assert "serviceAccountName" not in pod_specs(objects["defaults"])[owner]
    # rbac.create false: the accounts, no Role or RoleBinding (bound elsewhere).
    docs = objects["no-rbac"]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert {"atomo-control", "atomo-keygen"} <= set(by_kind(docs, "ServiceAccount"))
    assert pod_specs(docs)["atomo-control"]["serviceAccountName"] == "atomo-control"
    # serviceAccount.create false: the chart's Role bound to an account made elsewhere.
    docs = objects["no-service-account"]
    assert "atomo-control" not in by_kind(docs, "ServiceAccount")
    assert pod_specs(docs)["atomo-control"]["serviceAccountName"] == "platform-atomo"
    binding = one(docs, "RoleBinding", "atomo-control")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "platform-atomo", "namespace": NAMESPACE}]


def test_egress_policies(objects):
    policies = by_kind(objects["shared-cluster"], "NetworkPolicy")
    assert policies["atomo-default-deny"]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    dns = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
    }
    api = {
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
        "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
    }

    def to(component, port):
        selector = {"app.kubernetes.io/name": "atomo", "app.kubernetes.io/instance": "atomo"}
        return {
            "to": [{"podSelector": {"matchLabels": {**selector, "app.kubernetes.io/component": component}}}],
            "ports": [{"port": port, "protocol": "TCP"}],
        }

    egress = {n.removeprefix("atomo-egress-"): p["spec"] for n, p in policies.items() if n.startswith("atomo-egress-")}
    assert set(egress) == {"control", "ps", "worker", "keygen", "test"}
    for component, spec in egress.items():
        assert spec["policyTypes"] == ["Egress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    storage = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    assert egress["worker"]["egress"] == [dns, to("ps", 5555), storage]
    assert egress["control"]["egress"] == [dns, to("ps", 5556), api]
    assert egress["ps"]["egress"] == [dns]
    assert egress["keygen"]["egress"] == [dns, api]
    assert egress["test"]["egress"] == [dns, to("control", 8080)]
    # The hook's policy is a hook too: in place before the hook Job runs, on install and on upgrade.
    keygen = policies["atomo-egress-keygen"]["metadata"]["annotations"]
    assert keygen["helm.sh/hook"] == "pre-install,pre-upgrade" and int(keygen["helm.sh/hook-weight"]) < int(
        one(objects["shared-cluster"], "Job", "atomo-keygen")["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    # Each pod the policies select carries the labels they select by.
    for owner in pod_specs(objects["shared-cluster"]):
        labels = next(
            d["spec"]["template"]["metadata"]["labels"] if d["kind"] != "Pod" else d["metadata"]["labels"]
            for d in objects["shared-cluster"]
            if d["metadata"]["name"] == owner and d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")
        )
        assert labels["app.kubernetes.io/component"] in egress, owner
    # Off by default: ingress only, no egress policy.
    defaults = by_kind(objects["defaults"], "NetworkPolicy")
    assert defaults["atomo-default-deny"]["spec"]["policyTypes"] == ["Ingress"]
    assert not [n for n in defaults if "egress" in n]
    # No API server addresses given: any address on the API server's ports.
    docs = [d for d in yaml.safe_load_all(template("--set", "networkPolicy.egress.enabled=true").stdout) if d]
    assert one(docs, "NetworkPolicy", "atomo-egress-keygen")["spec"]["egress"][1] == {"ports": api["ports"]}
