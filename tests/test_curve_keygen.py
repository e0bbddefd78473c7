"""charts/atomo/files/keygen.py, the chart's pre-install/pre-upgrade hook that creates the API token Secret and
the CURVE key Secret once, run as the Job runs it (its command and arguments taken from the rendered Job) in a
real subprocess with the standard library only (`python -S`: no site-packages, as in the hook's small image),
against kmock's Kubernetes emulator over real HTTPS on loopback.

The script reaches the API server as a pod does: KUBERNETES_SERVICE_HOST/PORT, an https URL, the
ServiceAccount's token sent as a bearer token and the cluster CA checked. The emulator serves TLS with a
certificate from a CA made here; only the folder of `token` and `ca.crt` moves (ATOMO_SERVICE_ACCOUNT_DIR,
which the chart never sets), since /var/run/secrets/kubernetes.io/serviceaccount is the node's to mount.

Checked: the first run creates both Secrets (for each one GET, one POST, exactly): a 48-character token, and
the `atomo keys` layout with each pair a valid Z85 Curve25519 pair (the public key is the secret's, as
libzmq computes it) that the PS, the workers and the control service load from the items the chart mounts;
the pure-Python X25519 meets RFC 7748's test vectors; a second run keeps both (GETs only); a 409 on create
(another install won the race) is a success; a 403 fails with a one-line message and exit status 1; no secret
key or token ever appears in the output; and the hook's Role grants exactly the (apiGroup, resource, verb)
those requests need, `get` only on these Secrets.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import importlib.util
import ipaddress
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp.test_utils
import kmock
import pytest
import zmq
import zmq.auth
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_chart import CHART, by_kind, one, pod_specs, template  # helm template of the chart
from test_kubernetes_launcher import NS, Emulator, rbac_rules
from zmq.utils import z85

from services.common.transport import CurveKeys

SECRETS = kmock.resource("", "v1", "secrets")
NAME = "atomo-curve"
TOKEN_NAME = "atomo-token"
TOKEN = "keygen-service-account-token"
GET = ("GET", f"/api/v1/namespaces/{NS}/secrets/{NAME}", {}, None, None)
GET_TOKEN = ("GET", f"/api/v1/namespaces/{NS}/secrets/{TOKEN_NAME}", {}, None, None)
POST = ("POST", f"/api/v1/namespaces/{NS}/secrets")
LABELS = {"app.kubernetes.io/part-of": "atomo", "app.kubernetes.io/component": "curve-keys"}
TOKEN_LABELS = {"app.kubernetes.io/part-of": "atomo", "app.kubernetes.io/component": "api-token"}
SCRIPT = CHART / "files" / "keygen.py"
KEYS = {f"{n}.{s}" for n in ("server", "client-0", "client-1") for s in ("key", "key_secret")}


# -- a cluster CA, a serving certificate for 127.0.0.1, and the emulator over TLS ------------------------------


def certificate(subject: str, key, issuer: str, signer, *extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[Path, ssl.SSLContext]:
    """The ServiceAccount folder as the kubelet mounts it (token, ca.crt) and the API server's TLS context."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = dict(
        content_commitment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False
    )
    ca = certificate(
        "atomo test cluster CA",
        ca_key,
        "atomo test cluster CA",
        ca_key,
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (
            x509.KeyUsage(digital_signature=False, key_encipherment=False, key_cert_sign=True, crl_sign=True, **usage),
            True,
        ),
    )
    server = certificate(
        "kube-apiserver",
        server_key,
        "atomo test cluster CA",
        ca_key,
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (
            x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False, **usage),
            True,
        ),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    )
    account = directory / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (account / "token").write_text(TOKEN)
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    return account, context


class HttpsEmulator(Emulator):
    """The launcher tests' emulator, serving HTTPS with the given context."""

    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__()

    async def _serve(self):
        context = self._context

        class HttpsServer(aiohttp.test_utils.RawTestServer):
            async def start_server(self, loop=None, **kwargs):
                await super().start_server(loop=loop, ssl=context, **kwargs)

        async with (
            kmock.KubernetesEmulator() as handler,
            kmock.Server(handler, server_cls=HttpsServer) as server,
        ):
            self.handler, self.url, self._stop = handler, str(server.url).rstrip("/"), asyncio.Event()
            self._ready.set()
            await self._stop.wait()


@pytest.fixture
def emulator(tls):
    emu = HttpsEmulator(tls[1])
    try:
        yield emu
    finally:
        emu.stop()


# -- the chart's hook, as rendered ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> list[dict]:
    import yaml

    result = template()
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def job_command(chart) -> list[str]:
    """The keygen Job's command line, with this interpreter and the chart's copy of the script."""
    container = one(chart, "Job", "atomo-keygen")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python3", "/opt/atomo-keygen/keygen.py"]
    assert container["args"] == [NS, f"--token-secret={TOKEN_NAME}", f"--curve-secret={NAME}", "--clients=2"]
    # -S: no site-packages (no pyzmq, no kubernetes client), the standard library alone, as in the small image.
    return [sys.executable, "-S", str(SCRIPT), *container["args"]]


@pytest.fixture
def keygen(emulator, tls, job_command, tmp_path):
    """Run the hook as a subprocess against the emulator; returns the CompletedProcess."""

    def run() -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(urlsplit(emulator.url).port),
            ATOMO_SERVICE_ACCOUNT_DIR=str(tls[0]),
            HOME=str(tmp_path),
        )
        assert emulator.url.startswith("https://127.0.0.1:")
        return subprocess.run(job_command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)

    return run


def created_keys(request_body: dict) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in request_body["data"].items()}


def secret_strings(keys: dict[str, bytes], directory: Path) -> list[str]:
    """Every form in which a secret key could leak: Z85, its file's text and base64."""
    out = []
    for name, content in keys.items():
        if name.endswith(".key_secret"):
            (directory / name).write_bytes(content)
            out += [zmq.auth.load_certificate(directory / name)[1].decode(), base64.b64encode(content).decode()]
    return out


def assert_no_secret_in(result: subprocess.CompletedProcess, secrets: list[str]) -> None:
    assert len(secrets) == 6
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr


# -- the tests --------------------------------------------------------------------------------------------------


def test_x25519_meets_the_rfc_7748_test_vectors():
    spec = importlib.util.spec_from_file_location("keygen", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # RFC 7748, section 6.1: Alice's and Bob's key pairs.
    for secret, public in (
        (
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        ),
        (
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
            "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        ),
    ):
        assert module.x25519_public(bytes.fromhex(secret)).hex() == public
    for _ in range(20):  # libzmq's own computation, and its Z85
        secret = os.urandom(32)
        assert module.z85(secret).encode() == z85.encode(secret)
        assert zmq.curve_public(z85.encode(secret)) == module.z85(module.x25519_public(secret)).encode()


def test_first_run_creates_the_secrets_with_a_token_and_valid_curve_pairs(emulator, keygen, chart, tmp_path):
    result = keygen()

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"Secret {NS}/{TOKEN_NAME}: created with a new API token\nSecret {NS}/{NAME}: created with new CURVE keys\n"
    )
    requests = emulator.requests()
    assert [r[:2] for r in requests] == [GET_TOKEN[:2], POST, GET[:2], POST]
    assert requests[0] == GET_TOKEN and requests[2] == GET  # 404: not there yet
    method, path, query, content_type, token_body = requests[1]
    assert (method, path, query, content_type) == (*POST, {}, "application/json")
    assert token_body == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": TOKEN_NAME, "labels": TOKEN_LABELS},
        "type": "Opaque",
        "data": token_body["data"],
    }
    api_token = base64.b64decode(token_body["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", api_token) and set(token_body["data"]) == {"token"}
    assert api_token not in result.stdout + result.stderr
    method, path, query, content_type, body = requests[3]
    assert (method, path, query, content_type) == (*POST, {}, "application/json")
    assert body == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": NAME, "labels": LABELS},
        "type": "Opaque",
        "data": body["data"],
    }
    assert set(body["data"]) == KEYS
    for headers in emulator.headers():  # the ServiceAccount's token, as the in-cluster loader sends it
        assert headers["Authorization"].lower() == f"bearer {TOKEN}"
    assert emulator.get(SECRETS, NAME)["data"] == body["data"]  # stored as sent
    assert emulator.get(SECRETS, TOKEN_NAME)["data"] == token_body["data"]

    keys = created_keys(body)
    publics = set()
    for name in ("server", "client-0", "client-1"):
        (tmp_path / f"{name}.key").write_bytes(keys[f"{name}.key"])
        (tmp_path / f"{name}.key_secret").write_bytes(keys[f"{name}.key_secret"])
        public, secret = zmq.auth.load_certificate(tmp_path / f"{name}.key_secret")
        assert len(public) == len(secret) == 40 and len(z85.decode(secret)) == 32, name
        assert zmq.curve_public(secret) == public, f"{name}: the public key is not the secret's"
        assert zmq.auth.load_certificate(tmp_path / f"{name}.key") == (public, None), name
        publics.add(public)
    assert len(publics) == 3
    assert_no_secret_in(result, secret_strings(keys, tmp_path))

    # Each pod's items of the Secret form a folder that it loads as its role does.
    loaded = {}
    for owner, spec in pod_specs(chart).items():
        for volume in spec.get("volumes", []):
            if volume.get("secret", {}).get("secretName") == NAME:
                folder = tmp_path / owner
                for item in volume["secret"]["items"]:
                    assert item["key"] in keys, f"{owner} mounts {item['key']}, which the hook does not write"
                    (folder / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (folder / item["path"]).write_bytes(keys[item["key"]])
                loaded[owner] = folder
    assert set(loaded) == {"atomo-ps", "atomo-workers", "atomo-control"}
    token_volume = next(v for v in pod_specs(chart)["atomo-control"]["volumes"] if v["name"] == "token")
    assert token_volume["secret"]["secretName"] == TOKEN_NAME
    assert [i["key"] for i in token_volume["secret"]["items"]] == list(token_body["data"])
    server = CurveKeys.load(loaded["atomo-ps"], "server")
    worker = CurveKeys.load(loaded["atomo-workers"], "client")
    control = CurveKeys.load(loaded["atomo-control"], "client")
    assert server.authorized == {worker.public, control.public} and worker.public != control.public
    assert worker.server_public == control.server_public == server.public


def test_a_second_run_keeps_the_secrets_and_the_role_grants_exactly_what_the_hook_uses(emulator, keygen, chart):
    assert keygen().returncode == 0
    data = emulator.get(SECRETS, NAME)["data"]
    token = emulator.get(SECRETS, TOKEN_NAME)["data"]
    first = emulator.requests()

    result = keygen()

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Secret {NS}/{TOKEN_NAME}: exists, kept\nSecret {NS}/{NAME}: exists, kept\n"
    assert emulator.requests()[len(first) :] == [GET_TOKEN, GET]  # no POST, no PATCH, no PUT
    assert emulator.get(SECRETS, NAME)["data"] == data
    assert emulator.get(SECRETS, TOKEN_NAME)["data"] == token

    role = one(chart, "Role", "atomo-keygen")
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert granted == rbac_rules(emulator.requests()) == {("", "secrets", "get"), ("", "secrets", "create")}
    get_rule = next(rule for rule in role["rules"] if "get" in rule["verbs"])
    assert get_rule["resourceNames"] == [TOKEN_NAME, NAME]  # reading is limited to these Secrets
    assert {r[1].rsplit("/", 1)[1] for r in emulator.requests() if r[0] == "GET"} == {TOKEN_NAME, NAME}
    binding = one(chart, "RoleBinding", "atomo-keygen")
    job = one(chart, "Job", "atomo-keygen")["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": job["serviceAccountName"], "namespace": NS}]
    assert job["automountServiceAccountToken"] is True
    assert set(by_kind(chart, "ServiceAccount")) >= {job["serviceAccountName"]}


def test_a_conflict_on_create_is_another_install_that_won(emulator, keygen, tmp_path):
    conflict = kmock.KubernetesError(status=409, reason="AlreadyExists", message="secrets already exists")
    emulator.react(("post", SECRETS), conflict)

    result = keygen()

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Secret {NS}/{TOKEN_NAME}: exists, kept\nSecret {NS}/{NAME}: exists, kept\n"
    requests = emulator.requests()
    assert [r[:2] for r in requests] == [GET_TOKEN[:2], POST, GET[:2], POST]
    assert_no_secret_in(result, secret_strings(created_keys(requests[3][4]), tmp_path))


def test_forbidden_create_fails_with_a_clear_message_and_no_secret(emulator, keygen, tmp_path):
    token = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": TOKEN_NAME, "namespace": NS}, "data": {}}
    emulator.put(SECRETS, TOKEN_NAME, token)  # made by an earlier install
    message = f'secrets is forbidden: User "system:serviceaccount:{NS}:atomo-keygen" cannot create resource'
    emulator.react(("post", SECRETS), kmock.KubernetesError(status=403, reason="Forbidden", message=message))

    result = keygen()

    assert result.returncode == 1
    assert result.stdout == f"Secret {NS}/{TOKEN_NAME}: exists, kept\n"
    assert result.stderr == (
        f"keygen: Secret {NS}/{NAME} not ensured: 403 Forbidden: {message} "
        "(the hook's Role must allow get and create on Secrets)\n"
    )
    requests = emulator.requests()
    assert [r[:2] for r in requests] == [GET_TOKEN[:2], GET[:2], POST]
    assert_no_secret_in(result, secret_strings(created_keys(requests[2][4]), tmp_path))


def test_forbidden_read_fails_before_anything_is_made(emulator, keygen):
    message = f'secrets "{TOKEN_NAME}" is forbidden: cannot get resource "secrets"'
    emulator.react(("get", SECRETS), kmock.KubernetesError(status=403, reason="Forbidden", message=message))

    result = keygen()

    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"keygen: Secret {NS}/{TOKEN_NAME} not ensured: 403 Forbidden: {message} "
        "(the hook's Role must allow get and create on Secrets)\n"
    )
    assert emulator.requests() == [GET_TOKEN]
