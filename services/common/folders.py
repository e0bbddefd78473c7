"""The folders that atomo makes in the working directory by default (`atomo train`'s results root
./atomo-runs, `atomo up`'s state directory ./atomo-state) must not end up in a commit: when atomo creates
one of them it writes a `.gitignore` holding `*` in it, so git ignores it in whatever repository it lands
(as a virtual environment or pytest's cache does). A folder named by the user (--out, --state-dir) is left as
it is."""

from __future__ import annotations

from pathlib import Path

RESULTS_DIR = Path("atomo-runs")  # `atomo train --out`'s default
STATE_DIR = Path("atomo-state")  # `atomo up --state-dir`'s default
GITIGNORE = "# made by atomo: run results and state, not sources (delete this file to commit them)\n*\n"


def make_default_folder(path: Path, default: Path) -> None:
    """If `path` is the default `default` and missing: create it, with a `.gitignore` that ignores everything
    in it. Any other path, or one that already exists, is not touched here."""
    path = Path(path)
    if path != default or path.is_dir():
        return
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: it will hold checkpoints and logs
    (path / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
