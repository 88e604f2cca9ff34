"""Run test code in a child Python with TRITON_INTERPRET=1 set before Triton is imported (so that it never leaks into
the other tests); the Triton tests' shared runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_under_interpreter(code: str, timeout: int = 600) -> str:
    """The child's stdout; skips the test when Triton does not import in the child, fails it when the child fails
    without printing TRITON_OK."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 and "TRITON_OK" not in proc.stdout:
        err = proc.stderr[-3000:]
        if "ModuleNotFoundError: No module named 'triton'" in err:
            pytest.skip("triton does not import in the subprocess")
        raise AssertionError(f"child failed:\n{proc.stdout[-2000:]}\n{err}")
    return proc.stdout
