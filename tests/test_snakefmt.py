"""Style of the workflow code: the Snakefile and workflow/ are formatted by snakefmt (settings in
pyproject.toml, [tool.snakefmt]) and `snakemake --lint` finds nothing to say about them, for the default
config and for the paper config (which takes other branches: fetched backbone, GPU rules, image folders)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_CLEAN = "Congratulations, your workflow is in a good condition!"


@pytest.mark.skipif(importlib.util.find_spec("snakefmt") is None,
                    reason="snakefmt is not installed (it is in the test extra: pip install -e '.[test]')")
def test_workflow_is_snakefmt_formatted():
    # Run from the project root so that snakefmt reads pyproject.toml there.
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--diff", "Snakefile", "workflow"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        "snakefmt would reformat the workflow; run `snakefmt Snakefile workflow` in the project root:\n"
        + (result.stdout + result.stderr)[-5000:])


@pytest.mark.parametrize("configfile", [None, "config/paper.yaml"], ids=["default", "paper"])
def test_snakemake_lint_reports_nothing(tmp_path, configfile):
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
               str(tmp_path), "--lint"]
    if configfile:
        command.append(f"--configfile={ROOT / configfile}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    # Any lint (a rule without log, an absolute path, a long run directive, ...) is printed under a
    # "Lints for rule ..." or "Lints for snakefile ..." heading and makes --lint exit 1.
    assert "Lints for" not in output, output[-5000:]
    assert result.returncode == 0 and LINT_CLEAN in output, output[-5000:]
