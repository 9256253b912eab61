"""The workflow on a real (single-node, throw-away) Slurm cluster through workflow/profiles/slurm: the CI
config's data and episode stages run as sbatch jobs and produce the same files as a local run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "config" / "ci.yaml"

_spec = importlib.util.spec_from_file_location("slurm_cluster", ROOT / "tests" / "slurm" / "cluster.py")
slurm_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slurm_cluster)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(slurm_cluster.missing_binaries()),
                       reason=f"Slurm binaries not installed ({', '.join(slurm_cluster.missing_binaries())}): "
                              "apt-get install slurmctld slurmd slurm-client munge"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's daemons run as root"),
]


@pytest.fixture(scope="module")
def cluster():
    # Directly under /tmp: munged needs every folder above its socket to be searchable by all users,
    # which pytest's private temporary folders are not.
    root = Path(tempfile.mkdtemp(prefix="smat-slurm-"))
    cluster = slurm_cluster.Cluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_data_and_episodes_run_as_slurm_jobs(cluster, tmp_path):
    datasets = list(yaml.safe_load(CI_CONFIG.read_text())["datasets"])
    targets = [f"results/episodes/{d}/{purpose}.json" for d in datasets for purpose in ("test", "hps")]
    command = [
        # A hung Snakemake ignores SIGTERM: `timeout -k` makes sure the test ends.
        "timeout", "-k", "15", "600",
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
        "--profile", str(ROOT / "workflow" / "profiles" / "slurm"), "--configfile", str(CI_CONFIG),
        # Poll fast on this idle cluster; it has no accounting (slurmdbd), so job states come from squeue.
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "5", "--seconds-between-status-checks", "5",
        "--slurm-no-account", "--latency-wait", "5", "--retries", "0", "--jobs", "4", *targets,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=cluster.env)
    assert result.returncode == 0, result.stderr[-5000:]

    submitted = [line for line in result.stderr.splitlines() if "has been submitted with SLURM jobid" in line]
    assert len(submitted) == 1 + 3 * len(datasets)  # build + per dataset: convert, test and hps episodes
    jobcomp = (cluster.root / "log" / "jobcomp.txt").read_text()
    assert jobcomp.count("JobState=COMPLETED") >= len(submitted)
    for dataset in datasets:
        manifest = json.loads((tmp_path / "resources" / "data" / dataset / "manifest.json").read_text())
        assert manifest["domain"] == dataset
        test = json.loads((tmp_path / "results" / "episodes" / dataset / "test.json").read_text())
        hps = json.loads((tmp_path / "results" / "episodes" / dataset / "hps.json").read_text())
        assert test["split"] == hps["split"] == "test" and test["seed"] != hps["seed"]
        assert len(hps["episodes"]) == yaml.safe_load(CI_CONFIG.read_text())["episodes"]["hps"]["n"]
