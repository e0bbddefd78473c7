"""Create the release's CURVE key Secret once (a Helm pre-install/pre-upgrade hook runs this in the atomo image).

Sprig cannot compute a Curve25519 public key, so the pairs come from `atomo keys` (services.common.keys):
`server` and `client-0` .. `client-<N-1>`, each as NAME.key (public) and NAME.key_secret. A Secret that already
exists is left as it is, so upgrades keep the keys. Usage: curve-keygen.py NAMESPACE SECRET_NAME CLIENTS
"""

import base64
import json
import os
import sys
import tempfile

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader

from services.common.keys import write_keys


def ensure_secret(api: client.CoreV1Api, namespace: str, name: str, clients: int, labels: dict) -> bool:
    """Create the Secret unless it exists; True when this call created it. Key material is never printed."""
    try:
        api.read_namespaced_secret(name, namespace)
        return False
    except ApiException as exc:
        if exc.status != 404:
            raise
    with tempfile.TemporaryDirectory() as directory:
        data = {path.name: base64.b64encode(path.read_bytes()).decode() for path in write_keys(directory, clients)}
    metadata = client.V1ObjectMeta(name=name, labels=labels)
    body = client.V1Secret(api_version="v1", kind="Secret", metadata=metadata, type="Opaque", data=data)
    try:
        api.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:  # created meanwhile by another run of this hook: keep that one
            raise
        return False
    return True


def load_config() -> None:
    """The pod's in-cluster configuration: https://KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT with the
    ServiceAccount's token and CA. ATOMO_SERVICE_ACCOUNT_DIR (never set by the chart) reads that token and
    ca.crt from another folder than /var/run/secrets/kubernetes.io/serviceaccount, for the tests only."""
    directory = os.environ.get("ATOMO_SERVICE_ACCOUNT_DIR")
    if not directory:
        config.load_incluster_config()
        return
    token, ca = os.path.join(directory, "token"), os.path.join(directory, "ca.crt")
    InClusterConfigLoader(token_filename=token, cert_filename=ca).load_and_set()


def refusal(exc: ApiException) -> str:
    """The API server's answer in one line: its status and its own message (never our request body)."""
    try:
        message = json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = ""
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def main(argv: list[str]) -> int:
    namespace, name, clients = argv[0], argv[1], int(argv[2])
    load_config()
    labels = {"app.kubernetes.io/part-of": "atomo", "app.kubernetes.io/component": "curve-keys"}
    try:
        created = ensure_secret(client.CoreV1Api(), namespace, name, clients, labels)
    except ApiException as exc:
        hint = " (the hook's Role must allow get and create on Secrets)" if exc.status == 403 else ""
        print(f"curve-keygen: Secret {namespace}/{name} not ensured: {refusal(exc)}{hint}", file=sys.stderr)
        return 1
    print(f"Secret {namespace}/{name}: {'created with new CURVE keys' if created else 'exists, kept'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
