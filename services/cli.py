"""`atomo`: one command line for the library, the runtime and the control service.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "codecs": ("services.codecs_demo", "each codec's bytes, compression ratio and variance on one real gradient"),
    "keys": ("services.common.keys", "write CURVE key pairs for the PS and its workers"),
    "ps": ("services.ps.main", "the parameter server: workers' ROUTER port, control port, run directories"),
    "worker": ("services.worker.main", "a worker: connects to the PS, trains on its shard, sends encoded gradients"),
    "train": ("services.train", "train on a local PS and workers, show progress, write results and plots"),
    "bench": ("services.bench.cli", "every codec over emulated networks: time to accuracy, time split, report"),
    "serve": ("services.control.commands.serve", "the control service (REST API) for a PS control endpoint"),
    "up": ("services.control.commands.up", "a PS, N workers and the control service on this machine"),
    "submit": ("services.control.commands.submit", "submit a run (a RunSpec file and/or flags) to the control service"),
    "runs": ("services.control.commands.runs", "list runs"),
    "status": ("services.control.commands.status", "a run's progress, live until it ends"),
    "cancel": ("services.control.commands.cancel", "cancel a run"),
    "logs": ("services.control.commands.logs", "a run's events: state changes, worker joins and losses"),
}


def _installed(name: str) -> str:
    """The installed version of distribution `name` (read from its metadata: nothing is imported), or
    'not installed'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _atomo_version() -> str:
    """The project's version: from the pyproject.toml beside the package when it runs from a source tree (an
    editable install or PYTHONPATH), else from the installed metadata."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else _installed("atomo")


def version() -> str:
    """'atomo 0.1.0 (python 3.11.2, torch 2.13.0, torchvision not installed)': what a bug report needs."""
    return (
        f"atomo {_atomo_version()} (python {platform.python_version()}, torch {_installed('torch')}, "
        f"torchvision {_installed('torchvision')})"
    )


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `selected`, only that command's module is imported (torch loads only if it needs it)."""
    parser = argparse.ArgumentParser(prog="atomo", description="ATOMO: communication-efficient distributed training")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        if selected in (None, name):
            importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(selected).parse_args(argv)
    try:
        code = importlib.import_module(args._module).run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`atomo runs | head`): stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere at exit
        return 128 + 13  # killed by SIGPIPE, in the shell's terms


if __name__ == "__main__":
    sys.exit(main())
