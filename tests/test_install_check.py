"""tools/install_check.py: what lets tools/install.sh skip `pip install -e .`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check(root: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install_check.py"), str(root)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_checkout_that_is_not_the_installed_one_needs_an_install(tmp_path):
    fake = tmp_path / "checkout"
    fake.mkdir()
    deps = '["pyyaml>=6", "surely-absent-package>=1; python_version>\'3\'"]'
    (fake / "pyproject.toml").write_text(f'[project]\nname = "x"\ndependencies = {deps}\n')
    proc = _check(fake, cwd=Path("/"))
    assert proc.returncode == 1
    assert f"not {fake.resolve()}" in proc.stderr  # dist_cosface comes from elsewhere
    assert "surely-absent-package is missing" in proc.stderr
    assert "pyyaml is missing" not in proc.stderr


def test_the_source_folder_alone_does_not_count_as_installed(tmp_path):
    """Run from inside a copy of the package with no install: the check must not be fooled."""
    copy = tmp_path / "copy"
    (copy / "dist_cosface").mkdir(parents=True)
    (copy / "dist_cosface" / "__init__.py").write_text("")
    (copy / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = []\n')
    proc = _check(copy, cwd=Path("/"))  # from /: the copy is not importable, so not installed
    assert proc.returncode == 1
