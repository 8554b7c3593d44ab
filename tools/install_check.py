"""Exit 0 when this checkout is installed with every runtime dependency of its pyproject.toml.

Used by tools/install.sh to skip a redundant `pip install -e .`. It must run from outside the
checkout: there the source folder (and the egg-info an editable install leaves in it) would
count as "installed" although a fresh virtualenv holds none of the dependencies.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from pathlib import Path


def missing(root: Path) -> list[str]:
    """What stops this checkout from running: an install elsewhere, or absent dependencies."""
    problems = []
    try:
        import dist_cosface
    except ImportError:
        return ["dist_cosface is not installed"]
    where = Path(dist_cosface.__file__).resolve().parents[1]
    if where != root:
        problems.append(f"dist_cosface is installed from {where}, not {root}")
    try:
        import tomllib
    except ImportError:  # Python 3.10: cannot read pyproject.toml, so let pip decide
        return problems + ["cannot read pyproject.toml without tomllib (Python < 3.11)"]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is missing")
    return problems


if __name__ == "__main__":
    found = missing(Path(sys.argv[1]).resolve())
    for problem in found:
        print(f"install.sh: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
