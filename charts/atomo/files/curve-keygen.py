"""Create the release's CURVE key Secret once (a Helm pre-install/pre-upgrade hook runs this in the atomo image).

Sprig cannot compute a Curve25519 public key, so the pairs come from `atomo keys` (services.common.keys):
`server` and `client-0` .. `client-<N-1>`, each as NAME.key (public) and NAME.key_secret. A Secret that already
exists is left as it is, so upgrades keep the keys. Usage: curve-keygen.py NAMESPACE SECRET_NAME CLIENTS
"""

import base64
import sys
import tempfile

from kubernetes import client, config
from kubernetes.client.rest import ApiException

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
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels=labels), type="Opaque", data=data)
    try:
        api.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status != 409:  # created meanwhile by another run of this hook: keep that one
            raise
        return False
    return True


def main(argv: list[str]) -> int:
    namespace, name, clients = argv[0], argv[1], int(argv[2])
    config.load_incluster_config()
    labels = {"app.kubernetes.io/part-of": "atomo", "app.kubernetes.io/component": "curve-keys"}
    created = ensure_secret(client.CoreV1Api(), namespace, name, clients, labels)
    print(f"Secret {namespace}/{name}: {'created with new CURVE keys' if created else 'exists, kept'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
