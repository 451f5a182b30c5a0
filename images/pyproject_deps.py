"""Print the project's dependencies from pyproject.toml, one requirement a line (builder stages).

    python3 images/pyproject_deps.py pyproject.toml [--extra train ...]

The Dockerfiles install these (with requirements/lock.txt as constraints) before copying the
source, so a code change rebuilds only the small layers after it, not the dependency layer.
Standard library only (tomllib: Python 3.11+).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """[project] dependencies plus those of each named optional-dependencies extra."""
    project = tomllib.loads(pyproject.read_text()).get("project")
    if not isinstance(project, dict) or "dependencies" not in project:
        raise SystemExit(f"{pyproject}: no [project] dependencies")
    found = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no optional-dependencies extra {extra!r}; "
                             f"known: {', '.join(sorted(optional))}")
        found += optional[extra]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{line}\n" for line in requirements(args.pyproject, args.extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
