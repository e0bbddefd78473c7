"""`atomo keys DIR [--clients N]`: write CURVE key pairs for the PS and its workers.

Layout (read by `services.common.transport.CurveKeys.load`)::

    DIR/server.key, DIR/server.key_secret              the PS's pair
    DIR/clients/client-<i>.key, client-<i>.key_secret  one pair per worker; the PS accepts these public keys

Give each worker its own `clients/client-<i>.key_secret` and `server.key`; the PS needs `server.key_secret`
and the public `clients/*.key`. Secret files are written readable by their owner only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq.auth


def write_keys(directory, clients: int) -> list[Path]:
    """Write the server pair and `clients` client pairs; refuses to overwrite existing keys."""
    if clients < 1:
        raise ValueError(f"need at least one client key, got {clients}")
    directory = Path(directory)
    client_dir = directory / "clients"
    names = [(directory, "server")] + [(client_dir, f"client-{i}") for i in range(clients)]
    existing = [d / f"{n}.key_secret" for d, n in names if (d / f"{n}.key_secret").exists()]
    if existing:
        raise FileExistsError(f"keys already exist (not overwritten): {', '.join(map(str, existing))}")
    client_dir.mkdir(parents=True, exist_ok=True)
    written = []
    umask = os.umask(0o077)  # no moment where a secret is readable by others
    try:
        for where, name in names:
            public, secret = zmq.auth.create_certificates(where, name)
            os.chmod(public, 0o644)
            written += [Path(public), Path(secret)]
    finally:
        os.umask(umask)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="where to write the keys")
    parser.add_argument("--clients", type=int, default=1, help="number of client (worker) key pairs (default 1)")


def run(args: argparse.Namespace) -> int:
    try:
        written = write_keys(args.directory, args.clients)
    except (ValueError, FileExistsError) as exc:
        print(f"atomo keys: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} key files under {args.directory} (server, client-0..client-{args.clients - 1})")
    return 0
