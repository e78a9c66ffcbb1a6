"""The CLI starts without heavy imports and every subcommand's --help works."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolkit.cli import main

HEAVY = ("torch", "onnxruntime", "optimum", "tensorrt_llm", "transformers", "onnx")


def _subcommands():
    return sorted(main.commands)


@pytest.mark.parametrize("args", [[], *[[name] for name in _subcommands()]])
def test_help_does_not_import_heavy_modules(args):
    code = (
        "import sys\n"
        "from toolkit.cli import main\n"
        f"try:\n    main({args + ['--help']!r})\nexcept SystemExit:\n    pass\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out
    assert "LOADED []" in out


def test_import_toolkit_is_light():
    code = "import sys, toolkit, toolkit.recipes; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_recipes_lists_every_recipe():
    from toolkit.recipes import all_recipes

    result = CliRunner().invoke(main, ["recipes"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for recipe in all_recipes():
        assert recipe.hf_id in result.output
