"""Print the requirements of pyproject.toml (the project's dependencies, then those of the named
extras), one per line, for `pip install -r`. The Dockerfile installs them in a layer of their own
before it copies the code, so a code change rebuilds in seconds instead of reinstalling every
dependency. pyproject.toml stays their one owner.

    python requirements.py [EXTRA ...] > requirements.txt

An extra that pyproject.toml does not define is reported on stderr and skipped, as pip does.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            print(f"requirements.py: pyproject.toml has no extra {extra!r}", file=sys.stderr)
        out += optional.get(extra, [])
    return out


if __name__ == "__main__":
    here = Path(sys.argv[0]).resolve().parent
    path = next(p for p in (here / "pyproject.toml", here.parent / "pyproject.toml") if p.is_file())
    print("\n".join(requirements(path, sys.argv[1:])))
