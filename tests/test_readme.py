"""The README's usage example runs as written (extracted and executed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path):
    text = README.read_text(encoding="utf-8")
    marker = text.index("<!-- readme-example")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    assert 6 <= len(code.strip().splitlines()) <= 12
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout and (tmp_path / "plan.json").exists()
    ppl = float(result.stdout.rsplit("perplexity", 1)[1].split()[0])
    assert 1.0 < ppl < 100.0  # a patched model that still models real text


def test_cli_help_for_every_command():
    from hf_sparse_attn.cli import COMMANDS, build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for name in COMMANDS:
        assert name in help_text, f"command {name} is missing from --help (its module failed to import?)"
