"""The import layers of docs/architecture.md ("Layers"), read from the source with ``ast``.

A module imports only from a lower layer, or from its own layer inside its own package (the
modules of ``eval``'s files-and-ranks layer import each other; ``models`` and ``data``, both
components, never do). The project's own modules are imported at module top; inside a
function only where the import IS an optional dependency (``LAZY_PROJECT_MODULES``) or for a
reason named in ``FUNCTION_IMPORTS_ALLOWED``. The optional dependencies themselves (DALI,
DeepSpeed, onnx, triton, matplotlib, webdataset) are imported inside the functions that use
them: checked by importing every module, and running ``dist-cosface --help``, with them
blocked.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dist_cosface"

# Lowest first. Names are relative to dist_cosface ("" is dist_cosface/__init__.py): "x" is
# that module (or package), "x.*" package x and every module in it not matched by a longer
# name. Every module must match one: a new module gets its place here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("", "configtools", "seeding", "imageio", "sharding", "cliargs")),
    ("shared", ("distributed", "agreement", "align")),
    ("components", ("models.*", "classifier.*", "data.*", "metrics.*", "export", "engine.config")),
    (
        "eval: files and ranks",
        (
            "eval.config",
            "eval.verification_set",
            "eval.bin_file",
            "eval.pairs_file",
            "eval.targets",
            "eval.make_set",
            "eval.images",
            "eval.ijb_meta",
            "eval.ytf_pairs",
            "eval.ranks",
            "eval.results",
        ),
    ),
    ("eval: embedding", ("eval.embedding",)),
    ("eval: search and metrics", ("eval.topk", "eval.roc")),
    ("eval: benchmarks", ("eval.pair_verification", "eval.megaface", "eval.ijb", "eval.ytf")),
    ("eval: command", ("eval", "eval.cli")),
    ("run config", ("config",)),
    ("engine", ("engine.*",)),
    ("clean", ("clean.*",)),
    ("experiments", ("experiments.*",)),
    ("command line", ("cli",)),
)

# project modules that import an optional dependency at their top: importing one is importing
# that dependency, so it happens inside the function that needs it
LAZY_PROJECT_MODULES = {"classifier.triton_kernels": "triton"}

# TODO(issue 19, engine part): import these at module top and empty the engine entries.
FUNCTION_IMPORTS_ALLOWED: dict[str, set[str]] = {
    # its compile workers are spawned and re-import this script: they load only triton
    "tools.compile_gate": {"classifier", "classifier.triton_loss", "config"},
    # the import is the probe: is the package installed, and from where
    "tools.install_check": {""},
}

OPTIONAL = ("deepspeed", "nvidia.dali", "onnx", "onnxruntime", "onnxscript", "triton")
OPTIONAL += ("matplotlib", "webdataset")


def _module_name(path: Path) -> str:
    """dist_cosface/eval/cli.py -> "eval.cli"; tools/x.py -> "tools.x"; a package's __init__
    is the package ("" for dist_cosface itself)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == PACKAGE:
        parts.pop(0)
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / PACKAGE).rglob("*.py"))}


def _layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if name == module:
                return index
            prefix = name[:-2]
            inside = module == prefix or module.startswith(prefix + ".")
            if name.endswith(".*") and inside and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"dist_cosface.{module} has no layer: add it to LAYERS")
    return best


def _relative(name: str) -> str | None:
    """dist_cosface.eval.cli -> "eval.cli", dist_cosface -> ""; None outside the package."""
    if name == PACKAGE:
        return ""
    return name[len(PACKAGE) + 1 :] if name.startswith(PACKAGE + ".") else None


def _targets(node: ast.Import | ast.ImportFrom, where: str, known: frozenset[str]) -> list[str]:
    """The project modules an import statement loads (``from pkg import sub``: the sub)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        assert node.level == 0, f"{where}: relative import; the project imports absolutely"
        subs = [f"{node.module}.{a.name}" for a in node.names]
        names = [s if _relative(s) in known else node.module for s in subs]
    return sorted({r for r in map(_relative, names) if r is not None})


@functools.cache
def _imports(path: Path, known: frozenset[str]) -> list[tuple[int, str, bool]]:
    """(line, imported project module, inside a function) of every import in one file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                where = f"{path.relative_to(REPO)}:{child.lineno}"
                found.extend((child.lineno, t, in_function) for t in _targets(child, where, known))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def test_no_module_imports_from_a_higher_layer():
    sources = _sources()
    known = frozenset(sources)
    wrong = []
    for module, path in sources.items():
        layer = _layer_of(module)
        for line, target, _ in _imports(path, known):
            other = _layer_of(target)
            sideways = other == layer and _package(target) != _package(module)
            if other > layer or sideways:
                wrong.append(
                    f"{path.relative_to(REPO)}:{line}: {module} ({LAYERS[layer][0]}) imports "
                    f"{target} ({LAYERS[other][0]})"
                )
    assert not wrong, "\n".join(wrong)


def test_own_modules_are_imported_at_module_top():
    sources = _sources()
    known = frozenset(sources)
    files = dict(sources)
    files.update({f"tools.{p.stem}": p for p in sorted((REPO / "tools").glob("*.py"))})
    found: dict[str, set[str]] = {}
    lines = []
    for module, path in files.items():
        for line, target, in_function in _imports(path, known):
            if not in_function or target in LAZY_PROJECT_MODULES:
                continue
            found.setdefault(module, set()).add(target)
            if target not in FUNCTION_IMPORTS_ALLOWED.get(module, set()):
                lines.append(f"{path.relative_to(REPO)}:{line}: {target} imported in a function")
    assert not lines, "\n".join(lines)
    stale = {m: sorted(t - found.get(m, set())) for m, t in FUNCTION_IMPORTS_ALLOWED.items()}
    stale = {m: t for m, t in stale.items() if t}
    assert not stale, f"allowed but no longer imported in a function, remove them: {stale}"


def test_every_module_and_cli_help_without_optional_dependencies():
    """One interpreter: every module imported, then ``dist-cosface --help``, with DALI,
    DeepSpeed, onnx, triton, matplotlib and webdataset blocked (``sys.modules[name] = None``
    makes their import fail)."""
    lazy = {f"{PACKAGE}.{m}" for m in LAZY_PROJECT_MODULES}
    modules = sorted(f"{PACKAGE}.{m}".rstrip(".") for m in _sources())
    code = "\n".join(
        [
            "import importlib, sys",
            f"for name in {OPTIONAL!r}:",
            "    sys.modules[name] = None",
            f"for name in {sorted(set(modules) - lazy)!r}:",
            "    importlib.import_module(name)",
            "from dist_cosface.cli import main",
            "try:",
            "    main(['--help'])",
            "except SystemExit as exc:",
            "    sys.exit(exc.code)",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("usage: dist-cosface"), out.stdout[:500]
