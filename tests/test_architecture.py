"""The package's layers import each other in one direction only: server → runtime → artifact ← export.

Every ``.py`` file of the package is parsed with ``ast``; every import in it (module level, inside
functions, under ``if TYPE_CHECKING``) is mapped to the layer it reaches (the top-level folder:
``toolkit.runtime.engines.onnx_engine`` is layer ``runtime``) and checked against ``ALLOWED``.
``recipes`` is a leaf every layer may use; ``cli.py`` and the root ``__init__.py`` sit on top and
may import anything, and nothing may import them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "toolkit"
TOP = "(top)"  # cli.py, __init__.py: the command line and the package root
ROOT_PACKAGE = "(root)"  # ``import toolkit`` / ``from toolkit import __version__``: light, anyone may use it

ALLOWED: dict[str, set[str]] = {
    "recipes": set(),
    "artifact": {"recipes"},
    "export": {"artifact", "recipes"},
    "runtime": {"artifact", "recipes"},
    "server": {"runtime", "artifact", "recipes"},
    "bench": {"server", "runtime", "artifact", "recipes"},  # drives server/runtime from the outside
    "scale": {"server", "runtime", "artifact", "recipes"},  # Ray Serve replicas of the server's app
}

# Modules that must not be loaded by importing the light layers (see ``test_light_modules_import_nothing_heavy``).
HEAVY = ("torch", "onnxruntime", "optimum", "tensorrt_llm", "transformers", "onnx", "onnxruntime_genai")
LIGHT_MODULES = (
    "toolkit.artifact",
    "toolkit.artifact.layout",
    "toolkit.artifact.manifest",
    "toolkit.artifact.onnx_session",
    "toolkit.artifact.trtllm",
    "toolkit.recipes",
    "toolkit.recipes.registry",
    "toolkit.recipes.chat_format",
    "toolkit.runtime.types",
)


def package_files(root: Path = ROOT) -> dict[str, Path]:
    """``{relative path: file}`` of the package: the root's modules and every top-level folder with ``__init__.py``."""
    files = {p.name: p for p in root.glob("*.py")}
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and (d / "__init__.py").is_file()):
        files.update({p.relative_to(root).as_posix(): p for p in folder.rglob("*.py")})
    return files


def layer_of_file(rel_path: str) -> str:
    """The layer a package file belongs to: its top-level folder, or ``TOP`` for the root's modules."""
    parts = rel_path.split("/")
    return parts[0] if len(parts) > 1 else TOP


def layer_of_module(module: str) -> str | None:
    """The layer an absolute module name reaches, or None when it is not part of the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if parts[1:2] and parts[1] in ALLOWED:
        return parts[1]
    if parts[1:2] and ((ROOT / f"{parts[1]}.py").is_file() or (ROOT / parts[1]).is_dir()):
        return TOP  # toolkit.cli, or a folder missing from ALLOWED
    return ROOT_PACKAGE  # toolkit itself, or a name defined in its __init__ (``__version__``)


def _module_of(rel_path: str) -> list[str]:
    """Dotted package path of a file's package (``runtime/engines/x.py`` → ``[toolkit, runtime, engines]``)."""
    parts = rel_path[: -len(".py")].split("/")
    return [PACKAGE, *parts[:-1]]


def imported_modules(rel_path: str, source: str) -> list[tuple[int, str]]:
    """Every ``(line, absolute module)`` that ``source`` imports, at any depth, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source, filename=rel_path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _module_of(rel_path)
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from toolkit import export`` / ``from toolkit.runtime import engines``: the names may be modules
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def wrong_way_imports(rel_path: str, source: str) -> list[str]:
    """One line per import in ``source`` that goes against ``ALLOWED`` (empty when the file is fine)."""
    layer = layer_of_file(rel_path)
    if layer == TOP:
        return []
    if layer not in ALLOWED:
        return [f"{rel_path}: folder {layer!r} is not a known layer; add it to ALLOWED in {Path(__file__).name}"]
    problems, seen = [], set()
    for line, module in imported_modules(rel_path, source):
        target = layer_of_module(module)
        if target in (None, ROOT_PACKAGE, layer) or target in ALLOWED[layer] or (line, target) in seen:
            continue
        seen.add((line, target))  # ``from toolkit.export.x import a, b``: one report, naming the module
        allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing else in the package"
        problems.append(f"{rel_path}:{line}: {layer} imports {module} ({target}); {layer} may import {allowed}")
    return problems


def test_every_import_goes_the_right_way():
    files = package_files()
    assert {layer_of_file(rel) for rel in files} >= {"artifact", "export", "runtime", "server", "recipes"}
    problems = [p for rel, path in sorted(files.items()) for p in wrong_way_imports(rel, path.read_text())]
    assert not problems, "imports against the layering (server → runtime → artifact ← export):\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("rel_path", "source", "reported"),
    [
        ("runtime/x.py", "def f():\n    from toolkit.export.pipeline import run_export\n", "runtime imports toolkit.export.pipeline"),
        ("runtime/engines/x.py", "from ...export import manifest\n", "runtime imports toolkit.export"),
        ("runtime/x.py", "from toolkit import server\n", "runtime imports toolkit.server"),
        ("artifact/x.py", "import toolkit.runtime.types\n", "artifact imports toolkit.runtime.types"),
        ("export/x.py", "if True:\n    import toolkit.server.serve as s\n", "export imports toolkit.server.serve"),
        ("recipes/x.py", "from toolkit.artifact.layout import MODEL_FILE\n", "recipes imports toolkit.artifact.layout"),
        ("server/x.py", "from toolkit.cli import main\n", "server imports toolkit.cli"),
        ("newlayer/x.py", "", "not a known layer"),
    ],
)
def test_checker_reports_wrong_way_imports(rel_path, source, reported):
    problems = wrong_way_imports(rel_path, source)
    assert problems and reported in problems[0], problems


@pytest.mark.parametrize(
    ("rel_path", "source"),
    [
        ("server/x.py", "from toolkit.runtime import load_engine\nfrom toolkit.artifact.layout import MANIFEST_NAME\n"),
        ("runtime/engines/x.py", "from ..kv_cache import KvGeometry\nfrom . import common\nimport numpy\n"),
        ("export/x.py", "from toolkit import __version__\nfrom toolkit.recipes import get_recipe\n"),
        ("cli.py", "from toolkit.export.pipeline import run_export\nfrom toolkit.server.serve import serve\n"),
    ],
)
def test_checker_accepts_right_way_imports(rel_path, source):
    assert wrong_way_imports(rel_path, source) == []


def test_light_modules_import_nothing_heavy():
    code = (
        "import importlib, sys\n"
        f"for name in {LIGHT_MODULES!r}:\n    importlib.import_module(name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {', '.join(LIGHT_MODULES)} loaded {out.strip()}"
