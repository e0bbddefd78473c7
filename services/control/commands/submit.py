"""`atomo submit [SPEC.yaml] [--set key=value ...]`: queue a run; prints its id."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from services.control.commands.common import FINAL, add_connection_arguments, client, progress_line, reports_errors

# flag -> dotted RunSpec field
FLAGS = {
    "name": "name",
    "model": "model",
    "dataset": "dataset",
    "codec": "codec.name",
    "budget": "codec.budget",
    "bits": "codec.bits",
    "workers": "workers",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
}
# more on some flags
HELP = {"dataset": ": digits, synthetic; cifar10, cifar100, svhn, mnist need torchvision (pip install -e '.[vision]')"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="a RunSpec as YAML or JSON (default: the embedded default run)")
    for flag in FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=f"set {FLAGS[flag]}{HELP.get(flag, '')}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="set any field, e.g. codec.budget=2"
    )
    parser.add_argument("--wait", action="store_true", help="wait until the run ends; exit 1 unless it succeeded")
    add_connection_arguments(parser)


def build_spec(args: argparse.Namespace) -> dict:
    """The spec file, then the flags, then --set; values are parsed as YAML scalars (2 -> int, 1e-3 -> float)."""
    spec = {}
    if args.spec:
        spec = yaml.safe_load(Path(args.spec).read_text()) or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{args.spec} does not hold a mapping of RunSpec fields")
    assignments = [(FLAGS[f], getattr(args, f)) for f in FLAGS if getattr(args, f) is not None]
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        assignments.append((field, value))
    for field, value in assignments:
        *parents, leaf = field.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return spec


@reports_errors("submit")
def run(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(args)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"atomo submit: {exc}", file=sys.stderr)
        return 2
    with client(args) as api:
        created = api.submit(spec)
        print(created["id"])
        if not args.wait:
            return 0
        while created["state"] not in FINAL:
            time.sleep(1.0)
            created = api.run(created["id"])
        print(progress_line(created), file=sys.stderr)
        print(json.dumps({"state": created["state"], "reason": created["reason"]}), file=sys.stderr)
        return 0 if created["state"] == "succeeded" else 1
