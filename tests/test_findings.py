"""benchmarks/findings.py checks the README's findings on a run: it prints them and leaves the checkout as it
was; it writes its results file only when asked (--record)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "findings.py"


def finished_run(run: Path) -> Path:
    """The per-episode accuracies of the models the findings compare, for the datasets of config/ci.yaml:
    PMF 10 points above Pre in-domain, SMAT 1 point above PMF out of domain; returns the run's config."""
    config = yaml.safe_load((ROOT / "config" / "ci.yaml").read_text())
    smat = config["models"]["smat"]
    offsets = {"pre": (0, 0), "pmf/seed~0": (10, -2), "ablation/row~4/seed~0": (9, -2),
               f"smat/tau~{smat['tau']}/experts~{smat['experts']}/seed~0": (10, -1)}
    rng = np.random.default_rng(0)
    for name, dataset in config["datasets"].items():
        if dataset["role"] == "pretrain":
            continue
        base = rng.uniform(30, 60, size=20)
        for model_id, (in_domain, out_of_domain) in offsets.items():
            shift = in_domain if dataset["role"] == "id" else out_of_domain
            folder = run / "results" / "eval" / model_id / name
            folder.mkdir(parents=True)
            pd.DataFrame({"episode": range(20), "accuracy": base + shift + rng.normal(0, 0.5, 20)}).to_csv(
                folder / "none.csv", index=False)
    return ROOT / "config" / "ci.yaml"


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_findings_print_and_leave_the_checkout_clean(tmp_path):
    config = finished_run(tmp_path)
    tracked = ROOT / "benchmarks" / "results" / "findings.json"
    before, content = git_status(), tracked.read_bytes()
    result = run_script("--run", str(tmp_path), "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = re.search(r"PMF - Pre, ID +([+-][\d.]+) ± ([\d.]+)", result.stdout)
    assert printed and float(printed[1]) == pytest.approx(10, abs=0.5) and float(printed[2]) > 0
    assert "holds  PMF - Pre, ID: CI above 0" in result.stdout
    assert "recorded" not in result.stdout
    assert git_status() == before and tracked.read_bytes() == content


def test_findings_are_recorded_when_asked(tmp_path):
    config = finished_run(tmp_path / "run")
    out = tmp_path / "findings.json"
    result = run_script("--run", str(tmp_path / "run"), "--config", str(config), "--record", str(out),
                        "--label", "mine")
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads(out.read_text())["mine"]["seeds"]["seed 0"]
    assert recorded["PMF - Pre, ID"]["mean"] == pytest.approx(10, abs=0.5)
    assert recorded["SMAT - PMF, OOD"]["mean"] == pytest.approx(1, abs=0.5)
    assert recorded["holds"]["row 1 - row 4, AVG > 0"]
