"""The integration marker of tests/conftest.py: every test it names by hand still exists (a renamed test would
otherwise silently become a unit test), and the unit selection leaves out every test that loads real data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REAL_FIXTURES, REAL_TESTS

TESTS = Path(__file__).resolve().parent


def test_every_test_named_in_real_tests_exists():
    for relative, names in REAL_TESTS.items():
        path = TESTS / relative
        assert path.exists(), f"tests/conftest.py REAL_TESTS names {relative}, which does not exist"
        defined = {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.FunctionDef)}
        missing = sorted(set(names or ()) - defined)
        assert not missing, f"tests/conftest.py REAL_TESTS names {missing} in {relative}: renamed? update REAL_TESTS"


def test_the_real_data_fixtures_are_defined_in_conftest():
    tree = ast.parse((TESTS / "conftest.py").read_text(encoding="utf-8"))
    fixtures = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                and any("fixture" in ast.unparse(d) for d in node.decorator_list)}
    assert REAL_FIXTURES <= fixtures, f"REAL_FIXTURES names fixtures conftest.py does not define: {REAL_FIXTURES - fixtures}"


def test_unit_selection_excludes_the_integration_tests():
    """`pytest -m "not integration"` (make test-unit) on three files with integration tests keeps only the unit tests."""
    files = ["tests/test_demo.py", "tests/test_readme.py", "tests/test_real_models.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                             "-m", "not integration", *files], capture_output=True, text=True, cwd=TESTS.parent, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    unit = {line for line in result.stdout.splitlines() if "::" in line}
    assert {"tests/test_demo.py::test_plot_demo_refuses_losses_of_different_tokens",
            "tests/test_readme.py::test_cli_help_for_every_command"} <= unit, unit
    loading = ("test_demo.py::test_demo_ranks", "test_readme.py::test_readme_usage", "test_readme.py::test_readme_load",
               "test_real_models.py::")
    assert not [t for t in unit if any(name in t for name in loading)], unit
